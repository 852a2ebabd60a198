import subprocess

import pytest

from megafleet import proc
from megafleet.ledger import Ledger
from megafleet.names import InvalidName, check_name, ifname


def test_ledger_records_and_forgets(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record("vm", "process", "web1", pid=123)
    ledger.record_many("net", "bridge", [("br0", {}), ("br1", {"mtu": 1450})])
    assert [r.key for r in ledger.list("net")] == ["br0", "br1"]
    assert ledger.list("vm", "process")[0].data == {"pid": 123}
    # Re-recording updates in place (idempotent apply).
    ledger.record("vm", "process", "web1", pid=124)
    assert [r.data for r in ledger.list("vm")] == [{"pid": 124}]
    ledger.forget("vm", "process", "web1")
    ledger.forget("vm", "process", "web1")  # forgetting twice is fine
    assert ledger.list("vm") == []
    # A second handle on the same file sees the same records (crash recovery).
    assert len(Ledger(tmp_path / "l.sqlite").list()) == 2


def test_recorded_process_never_signals_a_recycled_pid():
    child = subprocess.Popen(["sleep", "30"])
    rec = proc.RecordedProcess.of(child.pid)
    assert rec.alive()
    fake = proc.RecordedProcess(child.pid, rec.start + 1)  # same pid, other process
    assert not fake.signal()
    rec.stop(grace=2)
    child.wait(timeout=5)
    assert not rec.alive()


def test_run_rejects_non_argv_and_reports_stderr():
    with pytest.raises(TypeError):
        proc.run("echo hi")  # type: ignore[arg-type]
    with pytest.raises(proc.CommandFailed, match="ls exited"):
        proc.run(["ls", "/nonexistent-megafleet"])


def test_names():
    assert check_name("web-1.a_b") == "web-1.a_b"
    for bad in ["", "1abc", "a/b", "a b", "../x", "a;b", "x" * 64]:
        with pytest.raises(InvalidName):
            check_name(bad)
    assert ifname("mf", "short") == "mfshort"
    long = ifname("mf", "a-very-long-switch-name", "and-a-port")
    assert len(long) <= 15 and long == ifname("mf", "a-very-long-switch-name", "and-a-port")
    assert long != ifname("mf", "a-very-long-switch-name", "and-another")
