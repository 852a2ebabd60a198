"""megafleet.cgroup on this host's real cgroup hierarchy: a testbed's processes
(and what they fork) land in its cgroup, one write kills them all, removal
leaves no directory and no record; the control cgroup weighs more."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from megafleet import cgroup
from megafleet.ledger import Ledger

TESTBED = f"mfucg{os.getpid() % 1000}"


@pytest.fixture
def cg():
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroups)")
    if not cgroup.available():
        pytest.skip(f"no cgroup v2 here: {cgroup.support().reason}")
    yield
    cgroup.kill(TESTBED)
    cgroup.remove(TESTBED)


def test_spawned_processes_and_their_forks_are_killed_in_one_write(cg):
    ledger = Ledger()
    with cgroup.scope(TESTBED):
        path = cgroup.testbed_path(TESTBED)
        # Recorded before (and while) it exists.
        assert [r.key for r in cgroup.recorded(ledger)] == [str(path)]
        assert {p.name for p in path.iterdir() if p.is_dir()} == set(cgroup.KINDS)
        # A busy loop that forks two sleepers at once: all three in the cgroup.
        child = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & while :; do :; done"],
                                 **cgroup.popen_kwargs("routers"))
        from megafleet import proc
        with cgroup.spawning("daemons"):
            proc.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"])
    deadline = time.monotonic() + 5
    while len(cgroup.procs(path)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(cgroup.procs(path / "routers")) == 3
    assert len(cgroup.procs(path / "daemons")) == 1
    if cgroup.support().cpu_v1:
        shares = (cgroup.support().cpu_v1 / cgroup.BASE / cgroup.group_name(TESTBED) / "cpu.shares")
        assert int(shares.read_text()) == cgroup.TESTBED_SHARES
    result = cgroup.kill(TESTBED)
    assert result.processes == 4 and result.emptied
    child.wait(timeout=5)
    assert child.returncode == -9
    assert cgroup.remove(TESTBED)
    assert not path.exists() and cgroup.recorded(ledger) == []


def test_enter_moves_a_running_process_and_outside_a_scope_nothing_happens(cg):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert cgroup.popen_kwargs("guests") == {}          # no testbed in scope
        assert not cgroup.enter(sleeper.pid, "guests")
        cgroup.create(TESTBED)
        assert cgroup.enter(sleeper.pid, "guests", TESTBED)
        assert cgroup.procs(cgroup.testbed_path(TESTBED)) == [sleeper.pid]
        with pytest.raises(ValueError):
            cgroup.leaf_dirs(TESTBED, "bogus")
    finally:
        cgroup.kill(TESTBED)
        sleeper.wait(timeout=5)
    assert cgroup.remove(TESTBED)


def test_control_cgroup_outweighs_testbeds(cg):
    child = subprocess.Popen(["sleep", "60"], **cgroup.control_kwargs())
    try:
        s = cgroup.support()
        line = next(l for l in open(f"/proc/{child.pid}/cgroup").read().splitlines() if l.startswith("0::"))
        assert line.endswith(f"/{cgroup.BASE}/{cgroup.CONTROL}")
        if s.cpu_v1:
            assert int((s.cpu_v1 / cgroup.BASE / cgroup.CONTROL / "cpu.shares").read_text()) > cgroup.TESTBED_SHARES
    finally:
        child.kill()
        child.wait()


def test_sweep_removes_cgroups_of_testbeds_no_longer_recorded(cg):
    cgroup.create(TESTBED)
    sleeper = subprocess.Popen(["sleep", "60"], **cgroup.popen_kwargs("guests", TESTBED))
    assert cgroup.sweep() == 1                     # no "up"/"net" record owns it
    sleeper.wait(timeout=5)
    assert not cgroup.testbed_path(TESTBED).exists() and cgroup.recorded() == []


def test_without_cgroup_v2_everything_is_a_no_op_with_one_notice(monkeypatch, capsys):
    monkeypatch.setattr(cgroup, "support", lambda: cgroup.Support(None, False, None, "no cgroup v2 hierarchy mounted"))
    monkeypatch.setattr(cgroup, "_noticed", [False])
    assert cgroup.create(TESTBED) is None
    assert cgroup.create(TESTBED) is None
    with cgroup.scope(TESTBED):
        assert cgroup.popen_kwargs("guests") == {} and cgroup.implicit_preexec() is None
    assert cgroup.kill(TESTBED).processes == 0 and cgroup.control_kwargs() == {}
    said: list[str] = []
    cgroup.notice(said.append)          # through the caller's progress (an agent's events)
    cgroup.notice(said.append)
    cgroup.notice()
    assert said == ["no cgroup v2 hierarchy mounted: testbed processes are stopped by pid"]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cgroup, "_noticed", [False])
    cgroup.notice()                     # else on stderr
    assert "stopped by pid" in capsys.readouterr().err
    assert cgroup.recorded() == []
