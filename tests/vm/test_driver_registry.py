"""The driver registry is the one place that knows a driver (issue 13): each entry
makes its Driver, the rest of megafleet asks the entry or the Driver what it
needs (exec route, teardown, telemetry, summary column, admission), and no
module outside the driver modules branches on a driver's name."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from megafleet.proc import RecordedProcess
from megafleet.vm import admission
from megafleet.vm.driver import (DEFAULT_DRIVER, DRIVER_KINDS, DRIVER_NAMES, Driver, ExecRoute,
                                 driver_kind, handle_process)
from megafleet.vm.guestexec import GuestExecError

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megafleet"
# Modules allowed to name a driver in a comparison: the registry and the drivers.
DRIVER_MODULES = {"vm/driver.py", "vm/qemu_driver.py", "vm/libvirt_driver.py", "vm/container_driver.py"}
# Importers compare their own option values (`--linux container`), which name
# what they write into a .fleet file, not a driver the code runs.
OPTION_VALUES = {"netlang/importers/clab.py"}


def test_every_entry_makes_its_own_driver():
    assert DEFAULT_DRIVER in DRIVER_NAMES
    for name, kind in DRIVER_KINDS.items():
        cls = kind.driver_class()
        assert issubclass(cls, Driver) and cls.name == name
        assert kind.summary_column in ("vms", "containers")
        # Every boot class admission meets has a number of boots per CPU.
        boot_class = kind.boot_kind or "tcg"
        assert admission.boots_per_cpu(boot_class) > 0
    with pytest.raises(ValueError, match="unknown driver 'firecracker'.*qemu"):
        driver_kind("firecracker")


def _driver_name_comparisons(path: Path, root: Path = REPO) -> list[str]:
    """`x == "container"`, `x != "qemu"`, `x in ("libvirt", ...)` in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for op, right in zip(node.ops, node.comparators):
            values = []
            if isinstance(right, ast.Constant):
                values = [right.value]
            elif isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                values = [e.value for e in right.elts if isinstance(e, ast.Constant)]
            left = node.left.value if isinstance(node.left, ast.Constant) else None
            if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) and \
                    ({v for v in values + [left] if isinstance(v, str)} & set(DRIVER_NAMES)):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_the_drivers_branches_on_a_driver_name():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel in DRIVER_MODULES or rel in OPTION_VALUES:
            continue
        found += _driver_name_comparisons(path)
    assert found == [], "ask the driver registry (megafleet.vm.driver) instead:\n" + "\n".join(found)


def test_the_scan_finds_a_branch_on_a_driver_name(tmp_path):
    # The check above is only worth something if it sees the kind of line it forbids.
    bad = tmp_path / "bad.py"
    bad.write_text('def f(v):\n    if v["driver"] == "container":\n        return 1\n'
                   '    return v.driver in ("qemu", "libvirt")\n')
    assert [line.split(": ", 1)[0] for line in _driver_name_comparisons(bad, tmp_path)] == ["bad.py:2", "bad.py:4"]


def test_exec_route_is_the_drivers():
    qemu, libvirt, container = (DRIVER_KINDS[n].driver_class() for n in ("qemu", "libvirt", "container"))
    # QEMU and libvirt guests: their exec channel, as the driver recorded it.
    for cls in (qemu, libvirt):
        route = cls.exec_route("g1", 1234, {"exec": "/run/g1/exec.sock"})
        assert route == ExecRoute(sock=Path("/run/g1/exec.sock"))
        with pytest.raises(GuestExecError, match="g1: no exec channel"):
            cls.exec_route("g1", 1234, {})
    # A container: the host enters its namespaces, in its cgroup.
    route = container.exec_route("c1", 4321, {})
    assert route.sock is None and route.cgroup_pid == 4321
    assert route.prefix[:3] == ("nsenter", "-t", "4321") and "-n" in route.prefix
    with pytest.raises(GuestExecError, match="c1: no init process"):
        container.exec_route("c1", None, {})


def test_only_host_sampled_guests_reach_the_container_sampler():
    assert {n for n, k in DRIVER_KINDS.items() if k.host_sampled} == {"container"}
    assert {n for n, k in DRIVER_KINDS.items() if k.summary_column == "containers"} == {"container"}


def _stubborn_processes(tmp_path: Path, n: int = 2) -> tuple[list[subprocess.Popen], list[dict]]:
    """Sleeping children that ignore SIGTERM, and ledger-like records naming the
    first by pid and start time, the others by pidfile."""
    ignore_term = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "print(1, flush=True); time.sleep(60)")
    children, records = [], []
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-c", ignore_term], stdout=subprocess.PIPE)
        children.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == b"1"
        if i == 0:
            proc = RecordedProcess.of(p.pid)
            records.append({"guest": f"g{i}", "pid": proc.pid, "pid_start": proc.start})
        else:
            pidfile = tmp_path / f"pid{i}"
            pidfile.write_text(f"{p.pid}\n")
            records.append({"guest": f"g{i}", "pidfile": str(pidfile)})
    return children, records


@pytest.mark.parametrize("driver, at_once", [("container", True), ("qemu", False)])
def test_teardown_ends_recorded_processes_with_the_drivers_signal(tmp_path, driver, at_once):
    """A driver's `remove` ends the processes its ledger records name (by pid and
    start time, or by pidfile): a container's init by SIGKILL at once, QEMU by
    SIGTERM and, after a grace period, SIGKILL. Real processes that ignore
    SIGTERM show which."""
    import trio

    drv = DRIVER_KINDS[driver].make()
    assert drv.kill_on_teardown is at_once
    children, records = _stubborn_processes(tmp_path)
    try:
        assert [handle_process(r).pid for r in records] == [c.pid for c in children]
        seconds = trio.run(_timed_remove, drv, records)
        assert (seconds < 2.0) if at_once else (seconds >= 3.0)
        assert all(handle_process(r) is None or not handle_process(r).alive() for r in records)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()
    assert all(c.poll() is not None for c in children)


async def _timed_remove(driver: Driver, records: list[dict]) -> float:
    import trio
    t0 = trio.current_time()
    await driver.remove(records)
    return trio.current_time() - t0


def test_a_guest_of_a_driver_this_megafleet_does_not_know_is_still_seen_and_removed(tmp_path):
    """A record whose driver is not in the registry (written by another version)
    is checked and ended as the recorded process it is: `vm ls` shows it, stop
    and teardown end it, the ledger forgets it."""
    import trio

    from megafleet.ledger import Ledger
    from megafleet.vm.engine import Engine
    from megafleet.vm.state import OWNER, GuestRecord, VmState

    children, records = _stubborn_processes(tmp_path, n=2)
    try:
        engine = Engine(state=VmState(tmp_path / "vm.sqlite"), ledger=Ledger(tmp_path / "ledger.sqlite"))
        rows = []
        for i, (child, rec) in enumerate(zip(children, records)):
            name = f"mfvold{i}"
            proc = RecordedProcess.of(child.pid)
            rows.append(GuestRecord(name=name, driver="firecracker", image="tiny", spec={}, state="running",
                                    pid=proc.pid, pid_start=proc.start, handle={"gdir": str(tmp_path)}))
            engine.ledger.record(OWNER, "process", name, **{**rec, "guest": name, "driver": "firecracker"})
        engine.state.put_many(rows)
        assert [(v.name, v.state) for v in engine.list()] == [("mfvold0", "running"), ("mfvold1", "running")]
        # stop --force: SIGKILL (the process ignores SIGTERM)
        procs = [RecordedProcess.of(c.pid) for c in children]
        assert trio.run(lambda: engine.stop("mfvold0", force=True)) == ["mfvold0"]
        assert not procs[0].alive() and procs[1].alive()
        assert [v.state for v in engine.list()] == ["stopped", "running"]
        assert trio.run(engine.teardown) == ["mfvold0", "mfvold1"]
        assert not procs[1].alive()
        assert engine.list() == [] and engine.ledger.list(owner=OWNER) == []
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()
