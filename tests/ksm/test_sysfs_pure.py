"""The sysfs layer and the knob keeper against a stand-in KSM directory (pure:
no root, no kernel). The real directory is exercised in test_real.py."""

from __future__ import annotations

import json
import os

import pytest

from megafleet.ksm.keeper import KnobKeeper
from megafleet.ksm.sysfs import (KnobError, KsmError, KsmSysfs, PF_KTHREAD, meminfo,
                                 parse_assignment, validate)

KNOB_FILES = {"run": "0", "pages_to_scan": "100", "sleep_millisecs": "20",
              "advisor_mode": "[none] scan-time", "advisor_target_scan_time": "200",
              "use_zero_pages": "0"}
COUNTER_FILES = {"pages_sharing": "300", "pages_shared": "100", "ksm_zero_pages": "20",
                 "full_scans": "7", "general_profit": "1200000"}


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "ksm"
    proc = tmp_path / "proc"
    root.mkdir()
    for name, value in KNOB_FILES.items():
        (root / name).write_text(value + "\n")
        os.chmod(root / name, 0o644)
    for name, value in COUNTER_FILES.items():
        (root / name).write_text(value + "\n")
        os.chmod(root / name, 0o444)
    # a kernel thread ksmd, and a user process that merely calls itself ksmd
    for pid, flags, utime, stime in ((37, PF_KTHREAD | 0x40, 150, 50), (900, 0x400000, 9999, 0)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text("ksmd\n")
        fields = ["S", "2", "0", "0", "0", "-1", str(flags)] + ["0"] * 4 + [str(utime), str(stime)]
        fields += ["0"] * 6 + ["27"] + ["0"] * 20
        (proc / str(pid) / "stat").write_text(f"{pid} (ksmd) " + " ".join(fields) + "\n")
    (proc / "meminfo").write_text("MemTotal:  1000 kB\nMemAvailable:  400 kB\nAnonPages: 77 kB\n"
                                  "HugePages_Total:  0\n")
    return KsmSysfs(root, proc)


def test_read_splits_counters_and_knobs(fake):
    snap = fake.read()
    assert snap.counters["pages_sharing"] == 300
    assert "pages_sharing" not in snap.knobs
    assert snap.knobs["advisor_mode"] == "none"        # the bracketed choice
    assert snap.knobs["pages_to_scan"] == 100
    assert snap.saved_bytes == (300 + 20) * 4096
    assert snap.sharing_ratio == 3.0


def test_ksmd_is_the_kernel_thread_not_a_namesake(fake):
    assert fake.ksmd_pid() == 37
    assert fake.ksmd_cpu_s() == pytest.approx(200 / os.sysconf("SC_CLK_TCK"))


def test_meminfo_reads_kb(fake):
    mem = meminfo(fake.proc)
    assert mem["MemTotal"] == 1000 and mem["MemAvailable"] == 400 and mem["AnonPages"] == 77


@pytest.mark.parametrize("text, message", [
    ("pages_to_scan=-5", "whole number"),
    ("pages_to_scan=0", "out of range"),
    ("run=3", "one of 0, 1, 2"),
    ("advisor_mode=fast", "one of none, scan-time"),
    ("merge_across_nodes=0", "unknown KSM knob"),
    ("pages_to_scan", "expected KNOB=VALUE"),
])
def test_bad_assignments_name_the_knob_and_problem(text, message):
    with pytest.raises(KnobError, match=message):
        parse_assignment(text)


def test_validate_canonicalises():
    assert validate("pages_to_scan", " 0100 ") == "100"
    assert validate("advisor_mode", "scan-time") == "scan-time"


def test_keeper_records_before_change_and_restores_in_order(fake, tmp_path):
    record = tmp_path / "originals.json"
    keeper = KnobKeeper(fake, record)
    changed = keeper.apply({"pages_to_scan": 5000, "sleep_millisecs": 10, "run": 1})
    assert changed == {"pages_to_scan": "5000", "sleep_millisecs": "10", "run": "1"}
    assert json.loads(record.read_text()) == {"pages_to_scan": "100", "sleep_millisecs": "20",
                                              "run": "0"}
    assert (fake.root / "run").read_text() == "1"
    # A second change keeps the first originals, not the intermediate values.
    keeper.apply({"pages_to_scan": 7000})
    assert json.loads(record.read_text())["pages_to_scan"] == "100"
    # Unchanged values are not rewritten.
    assert keeper.apply({"pages_to_scan": 7000}) == {}
    restored = keeper.restore()
    assert restored == {"pages_to_scan": "100", "sleep_millisecs": "20", "run": "0"}
    assert (fake.root / "pages_to_scan").read_text() == "100"
    assert not record.exists()
    assert keeper.restore() == {}          # twice is fine


def test_keeper_restore_after_a_crash_uses_the_record(fake, tmp_path):
    record = tmp_path / "originals.json"
    KnobKeeper(fake, record).apply({"use_zero_pages": 1})
    # a new keeper (a new daemon after a crash) restores what the first changed
    assert KnobKeeper(fake, record).restore() == {"use_zero_pages": "0"}


def test_keeper_refuses_unknown_knob_before_writing_anything(fake, tmp_path):
    keeper = KnobKeeper(fake, tmp_path / "o.json")
    with pytest.raises(KnobError):
        keeper.apply({"run": 1, "bogus": 3})
    assert (fake.root / "run").read_text().strip() == "0"
    assert not (tmp_path / "o.json").exists()


def test_missing_knob_is_a_clear_error_and_changes_nothing(fake, tmp_path):
    (fake.root / "smart_scan").unlink(missing_ok=True)
    keeper = KnobKeeper(fake, tmp_path / "o.json")
    with pytest.raises(KsmError, match="no KSM knob 'smart_scan'"):
        keeper.apply({"run": 1, "smart_scan": 1})
    assert (fake.root / "run").read_text().strip() == "0"


def test_corrupt_record_is_named(fake, tmp_path):
    record = tmp_path / "o.json"
    record.write_text("{not json")
    with pytest.raises(KsmError, match=r"o\.json.*line 1"):
        KnobKeeper(fake, record).restore()


def test_no_ksm_directory(tmp_path):
    with pytest.raises(KsmError, match="no KSM here"):
        KsmSysfs(tmp_path / "nothing").read()


# --- the daemon loop on the stand-in directory ------------------------------------

def test_daemon_loop_applies_decisions_takes_events_and_restores(fake, tmp_path):
    import trio

    from megafleet.ksm import policy
    from megafleet.ksm.daemon import AlreadyRunning, Daemon, send_event, socket_path

    record = tmp_path / "originals.json"
    got = []

    async def main():
        daemon = Daemon(fake, KnobKeeper(fake, record), policy.Config(sample_interval_s=0.05),
                        on_sample=got.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            # the daemon starts with a probe: ksmd on, at its own rate
            assert (fake.root / "run").read_text() == "1"
            assert record.exists()
            # a second daemon on the same host is refused
            with pytest.raises(AlreadyRunning):
                await Daemon(fake, KnobKeeper(fake, tmp_path / "other.json")).run()
            assert await trio.to_thread.run_sync(send_event, "boot", 5)
            with pytest.raises(Exception, match="refused"):
                await trio.to_thread.run_sync(_send_raw, b"reboot 5\n")
            while not any(s["mode"] == "storm" for s in got):
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    async def bounded():
        with trio.fail_after(20):
            await main()

    trio.run(bounded)
    storm = next(s for s in got if s["mode"] == "storm")
    assert storm["reason"] == "event: boot of 5"
    assert storm["saved_mb"] == (300 + 20) * 4096 / 2**20
    # everything as before: knobs, no record, no socket
    assert (fake.root / "run").read_text().strip() == "0"
    assert (fake.root / "pages_to_scan").read_text().strip() == "100"
    assert not record.exists()
    assert not socket_path().exists()


def _send_raw(data: bytes) -> None:
    import socket as s

    from megafleet.ksm.daemon import socket_path
    from megafleet.ksm.sysfs import KsmError

    with s.socket(s.AF_UNIX, s.SOCK_STREAM) as sock:
        sock.connect(str(socket_path()))
        sock.sendall(data)
        reply = sock.recv(256).decode()
    if not reply.startswith("ok"):
        raise KsmError(f"daemon refused: {reply}")
