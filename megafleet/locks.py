"""One controller per testbed per host: an exclusive lock held by `up`, `down`
and live changes of a testbed.

The lock is an flock(2) on ``<state>/locks/<testbed>.lock``: the kernel releases
it when its holder dies, however it dies, so a crash never leaves a testbed
locked. The file (recorded in the ledger, owner "lock") holds one line naming
the holder (``what``, pid, start time), which is what a second caller is told
while it waits::

    with locks.testbed_lock("campus", "up", on_wait=print):
        ...                                   # apply, tear down, change

    async with locks.atestbed_lock("campus", "down", wait=False):
        ...                                   # LockBusy at once if held

Re-entrant within one process (the embedded controller takes the lock, then the
host side it calls in the same process takes it again); across processes,
exclusive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Generator, Iterator

from megafleet import paths
from megafleet.names import check_name

OWNER = "lock"
# Held by this process: path -> [fd, depth].
_held: dict[str, list[int]] = {}


class LockBusy(RuntimeError):
    """The testbed's lock is held by another process (``holder`` describes it)."""

    def __init__(self, testbed: str, holder: str):
        self.testbed, self.holder = testbed, holder
        super().__init__(f"testbed {testbed!r} is busy: {holder} holds its lock")


def lock_path(testbed: str) -> Path:
    return paths.state_dir() / "locks" / f"{check_name(testbed, 'testbed name')}.lock"


def holder(testbed: str) -> str:
    """Who holds (or last held) the lock, as text: "up (pid 123, 4 s ago)"."""
    try:
        d = json.loads(lock_path(testbed).read_text() or "{}")
    except (OSError, ValueError):
        return "another megafleet process"
    if not d:
        return "another megafleet process"
    return f"{d.get('what', '?')} (pid {d.get('pid', '?')}, {time.time() - d.get('since', time.time()):.0f} s ago)"


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _take(key: str, fd: int) -> tuple[int, bool]:
    """Try to lock: (the fd to use from now on, whether it holds the lock). `forget` may
    have unlinked the file we opened: a lock on that inode would guard nothing,
    so then open the path afresh and try again."""
    while _try(fd):
        try:
            if os.stat(key).st_ino == os.fstat(fd).st_ino:
                return fd, True
        except FileNotFoundError:
            pass
        os.close(fd)
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    return fd, False


def _open(testbed: str) -> tuple[str, int]:
    path = lock_path(testbed)
    key = str(path)
    if key not in _held:
        from megafleet.ledger import Ledger

        path.parent.mkdir(parents=True, exist_ok=True)
        Ledger().record(OWNER, "file", testbed, path=key)
    return key, os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _mark(fd: int, what: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"what": what, "pid": os.getpid(), "since": time.time()}).encode(), 0)


def _release(key: str) -> None:
    entry = _held[key]
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.ftruncate(entry[0], 0)
        os.close(entry[0])          # releases the flock


POLL_S = 0.1       # how often a waiting caller tries the lock again


def _acquire(testbed: str, what: str, wait: bool, timeout: float | None,
             on_wait: Callable[[str], None] | None) -> Generator[float, None, str]:
    """The one acquire loop of both lock versions, without its sleep: it yields
    the seconds to sleep before the next try (the caller sleeps its own way:
    time.sleep in a thread, trio.sleep in trio) and returns the lock's key once
    held. Busy: LockBusy at once with wait=False, or after `timeout` seconds.
    Closing the generator early (the caller was cancelled during its sleep)
    closes the file descriptor it opened."""
    key, fd = _open(testbed)
    if key in _held:
        os.close(fd)
        _held[key][1] += 1
        return key
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    try:
        while not (got := _take(key, fd))[1]:
            fd = got[0]
            if not wait or (deadline is not None and time.monotonic() > deadline):
                raise LockBusy(testbed, holder(testbed))
            if not told and on_wait is not None:
                on_wait(f"waiting for {holder(testbed)}, which holds testbed {testbed}'s lock "
                        "(--no-wait fails instead)")
                told = True
            yield POLL_S
    except BaseException:           # LockBusy, or GeneratorExit from a cancelled caller
        os.close(fd)
        raise
    fd = got[0]
    _mark(fd, what)
    _held[key] = [fd, 1]
    return key


@contextlib.contextmanager
def testbed_lock(testbed: str, what: str, *, wait: bool = True, timeout: float | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `testbed`'s lock for the block (blocking version, for threads and
    plain scripts). `what` names the holder ("up", "down", "net change").
    Busy: with wait=False raise LockBusy at once; else call on_wait(message)
    once and wait (LockBusy after `timeout` seconds, if given)."""
    steps = _acquire(testbed, what, wait, timeout, on_wait)
    try:
        while True:
            time.sleep(next(steps))
    except StopIteration as done:
        key = done.value
    finally:
        steps.close()
    try:
        yield
    finally:
        _release(key)


@contextlib.asynccontextmanager
async def atestbed_lock(testbed: str, what: str, *, wait: bool = True, timeout: float | None = None,
                        on_wait: Callable[[str], None] | None = None) -> AsyncIterator[None]:
    """trio version of `testbed_lock`: waits with trio.sleep, so a waiting caller
    can still be cancelled (Ctrl-C)."""
    import trio

    steps = _acquire(testbed, what, wait, timeout, on_wait)
    try:
        while True:
            await trio.sleep(next(steps))
    except StopIteration as done:
        key = done.value
    finally:
        steps.close()
    try:
        yield
    finally:
        _release(key)


def forget(testbed: str) -> None:
    """Remove the lock file and its record when the testbed is gone (only when
    nobody holds the lock: an unheld lock file is harmless either way)."""
    from megafleet.ledger import Ledger

    path = lock_path(testbed)
    if str(path) in _held:
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        Ledger().forget(OWNER, "file", testbed)
        return
    try:
        if _try(fd):
            path.unlink(missing_ok=True)
            Ledger().forget(OWNER, "file", testbed)
    finally:
        os.close(fd)
