"""`down` of a testbed that saturates the host: 300 container guests, each
running a busy loop (started through `megafleet exec`, so in the guest's
cgroup), keep both CPUs busy; `down` must finish within 60 s and leave nothing.

Heavy (300 guests, CPUs saturated for a minute or two): it takes the team's
shared heavy-run lock (/tmp/megafleet-heavy.lock) for its whole length."""

from __future__ import annotations

import fcntl
import json
import os
import time

import pytest

from .conftest import REPO, TAG, megafleet, megafleet_json
from .test_endings_live import nothing_left

GUESTS = 300
HEAVY_LOCK = "/tmp/megafleet-heavy.lock"

FLEET = f"""
image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.153.0.0/16
switch lan[1..3]
vm a[1..100] image tiny driver container mem 32M on lan1
vm b[1..100] image tiny driver container mem 32M on lan2
vm c[1..100] image tiny driver container mem 32M on lan3
"""


@pytest.fixture
def heavy():
    with open(HEAVY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def runnable() -> int:
    return int(open("/proc/loadavg").read().split()[3].split("/")[0])


@pytest.mark.timeout(3600)       # includes waiting for the heavy-run lock
def test_down_of_a_saturated_host_finishes_within_60_s_and_leaves_nothing(tmp_path, heavy):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    testbed = f"mfus{TAG}"
    path = tmp_path / "busy.fleet"
    path.write_text(FLEET)
    try:
        summary = megafleet_json("up", str(path), "-N", testbed, "--no-ksm", "--host-mem", "20000",
                                 "--boot-timeout", "180", check=False, timeout=1200)
        assert summary["ready"] == GUESTS, summary["failed"][:3]
        # A busy loop in every guest, detached from the exec session; started
        # a minute later, so that the exec sessions (in the guests' cgroups,
        # low CPU weight) are not starved by the loops of the guests before.
        t_exec = time.monotonic()
        r = megafleet("exec", "*", "--testbed", testbed, "--timeout", "120", "--json", "--",
                      "sh", "-c", "(sleep 60; while :; do :; done) </dev/null >/dev/null 2>&1 &",
                      check=False, timeout=900)
        nodes = json.loads(r.stdout)["nodes"]
        assert [n for n in nodes if n["error"] or n["rc"]] == [] and len(nodes) == GUESTS, r.stdout[-2000:]
        busy = 0
        deadline = t_exec + 180
        while busy < GUESTS * 0.8 and time.monotonic() < deadline:
            time.sleep(1)
            busy = runnable()
        assert busy >= GUESTS * 0.8, f"only {busy} runnable: the host is not saturated"
        time.sleep(5)
        t0 = time.monotonic()
        down = megafleet_json("down", testbed, check=False, timeout=300)
        seconds = time.monotonic() - t0
        print(f"down of {GUESTS} busy guests ({busy} runnable): {seconds:.1f} s")
        assert down["ok"], down
        assert seconds < 60, seconds
    finally:
        megafleet("down", testbed, check=False, timeout=600)
    nothing_left(testbed)
