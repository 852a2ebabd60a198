"""`megafleet doctor` runs every check for real and reports them as JSON."""

import json
from pathlib import Path

from click.testing import CliRunner

from megafleet import doctor, paths
from megafleet.ledger import Ledger


def test_doctor_json_has_every_check():
    result = CliRunner().invoke(doctor.doctor, ["--json"])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert set(report) == {"qemu", "accel", "ksm", "network", "libvirtd", "telemetry"}
    for name, check in report.items():
        assert isinstance(check["ok"], bool), name
        assert check["detail"], name
    assert report["accel"]["accel"] in ("kvm", "tcg")
    assert report["telemetry"]["store"] in ("sqlite", "mongodb")
    assert result.exit_code == (0 if all(c["ok"] for c in report.values()) else 1)


def test_network_check_leaves_nothing_behind():
    result = doctor.check_network()
    assert isinstance(result["ok"], bool)
    netns = Path("/run/netns")
    assert not [p for p in (netns.iterdir() if netns.exists() else []) if p.name.startswith("mfi-doctor-")]
    assert not Ledger().list(owner="imagegen", kind="netns")


def test_accel_verdict_is_cached_per_boot():
    first = doctor.check_accel()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    if "not probed" not in first["detail"]:  # (no image in the cache to probe with)
        cache = json.loads((paths.state_dir() / "accel-probe.json").read_text())
        assert cache["boot_id"] == boot_id and cache["accel"] == first["accel"]
        assert doctor.check_accel() == first


def test_table_output():
    result = CliRunner().invoke(doctor.doctor, [])
    lines = result.output.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert [l.split()[0] for l in lines[1:]] == ["qemu", "accel", "ksm", "network", "libvirtd", "telemetry"]


def test_network_check_removes_a_crashed_runs_namespace(root_only):
    import subprocess

    from megafleet import proc

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mfi-doctor-{dead.pid}"
    ledger = Ledger()
    ledger.record("imagegen", "netns", stale, what="doctor check")
    proc.run(["ip", "netns", "add", stale])
    try:
        assert doctor.check_network()["ok"]
        assert not Path(f"/run/netns/{stale}").exists()
        assert not ledger.list(owner="imagegen", kind="netns")
    finally:
        proc.run(["ip", "netns", "del", stale], check=False)


def test_leftovers_lists_what_is_recorded_and_present_and_sweep_removes_orphans():
    import subprocess

    from megafleet import sweep
    from megafleet.proc import RecordedProcess

    ledger = Ledger()
    gone = subprocess.Popen(["true"])
    gone.wait()                                    # a creator that has died
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        rp = RecordedProcess.of(sleeper.pid)
        ledger.record("imagegen", "process", str(rp.pid), start=rp.start, what="mfi test probe",
                      by=gone.pid)
        ledger.record("imagegen", "process", "999999999", start=1, what="long gone")
        result = CliRunner().invoke(doctor.doctor, ["--leftovers", "--json"])
        assert result.exit_code == 1, result.output
        # Other tests of the same run may hold recorded processes of their own
        # (the collect tests' FerretDB): look at what this test recorded.
        (found,) = [x for x in json.loads(result.stdout)["leftovers"] if x["owner"] == "imagegen"]
        assert found["key"] == str(rp.pid) and found["state"] == "running" and found["orphan"]
        assert sweep.sweep(ledger)["processes"] == 1
        sleeper.wait(timeout=5)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ledger.list("imagegen") == []
    result = CliRunner().invoke(doctor.doctor, ["--leftovers", "--json"])
    assert [x for x in json.loads(result.stdout)["leftovers"] if x["owner"] == "imagegen"] == []
    if not json.loads(result.stdout)["leftovers"]:
        result = CliRunner().invoke(doctor.doctor, ["--leftovers"])
        assert result.exit_code == 0 and "no leftovers" in result.output
