"""megafleet.locks: one holder per testbed across processes, re-entrant in one,
released when its holder dies (even by SIGKILL), waiters told for whom they wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from megafleet import locks
from megafleet.ledger import Ledger

TESTBED = f"mfulk{os.getpid() % 1000}"

HOLD = """
import sys, time
from megafleet import locks
with locks.testbed_lock(sys.argv[1], "up"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder() -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, TESTBED], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_process_fails_with_no_wait_or_waits_with_a_message():
    child = _holder()
    try:
        with pytest.raises(locks.LockBusy) as err:
            with locks.testbed_lock(TESTBED, "down", wait=False):
                pass
        assert f"pid {child.pid}" in str(err.value) and "up" in str(err.value)
        told = []
        with pytest.raises(locks.LockBusy):
            with locks.testbed_lock(TESTBED, "down", timeout=0.5, on_wait=told.append):
                pass
        assert len(told) == 1 and "waiting for up" in told[0]
    finally:
        child.send_signal(signal.SIGKILL)    # the kernel lets go of the lock
        child.wait()
    t0 = time.monotonic()
    with locks.testbed_lock(TESTBED, "down", timeout=5):
        with locks.testbed_lock(TESTBED, "down again", wait=False):   # re-entrant
            pass
    assert time.monotonic() - t0 < 5
    locks.forget(TESTBED)
    assert not locks.lock_path(TESTBED).exists()
    assert Ledger().list(locks.OWNER) == []


def test_async_waiter_gets_the_lock_when_the_holder_goes():
    child = _holder()
    told = []

    async def main():
        async with trio.open_nursery() as nursery:
            async def release():
                await trio.sleep(0.5)
                child.terminate()
            nursery.start_soon(release)
            async with locks.atestbed_lock(TESTBED, "down", on_wait=told.append):
                return True

    try:
        assert trio.run(main)
        assert len(told) == 1
    finally:
        child.kill()
        child.wait()
    locks.forget(TESTBED)
    assert Ledger().list(locks.OWNER) == []


def _open_fds() -> int:
    """File descriptors of this process open on the test's lock file."""
    path = str(locks.lock_path(TESTBED))
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == path
        except OSError:
            pass
    return n


def test_cancelled_async_waiter_closes_its_file_and_does_not_hold():
    """Both versions share one acquire loop (locks._acquire): a trio waiter
    cancelled during its sleep closes the lock file it opened and holds nothing."""
    child = _holder()
    try:
        before = _open_fds()
        assert before == 0

        async def main():
            with trio.move_on_after(0.3) as scope:
                async with locks.atestbed_lock(TESTBED, "down"):
                    raise AssertionError("got a lock another process holds")
            return scope.cancelled_caught

        assert trio.run(main)
        assert _open_fds() == before and locks._held == {}
        with pytest.raises(locks.LockBusy):                 # the sync version's timeout
            with locks.testbed_lock(TESTBED, "down", timeout=0.3):
                pass
        assert _open_fds() == before and locks._held == {}
    finally:
        child.kill()
        child.wait()
    with locks.testbed_lock(TESTBED, "down", wait=False):
        assert list(locks._held.values())[0][1] == 1
    assert locks._held == {}
    locks.forget(TESTBED)
    assert Ledger().list(locks.OWNER) == []
