"""How runs end, for real: Ctrl-C during `up`'s guest phase, two `up`s racing
for one testbed, and a `vm boot` killed with -9 while it probes KVM. Each
asserts that `down` leaves nothing (namespaces, links, processes, cgroups,
ledger rows)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from .conftest import REPO, TAG, links_in, megafleet, megafleet_json, netns_with

FLEET = """
image tiny from "{repo}/examples/images/tiny.toml"
pool p 10.{net}.0.0/16
switch lan
host probe on lan
vm c[1..{containers}] image tiny driver container mem 64M on lan
"""
QEMUS = """vm q[1..{qemus}] image tiny driver qemu mem 128M on lan
"""


def write_fleet(tmp_path: Path, name: str, containers: int, qemus: int, net: int) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, bridges, guests)")
    path = tmp_path / f"{name}.fleet"
    path.write_text(FLEET.format(repo=REPO, containers=containers, net=net)
                    + (QEMUS.format(qemus=qemus) if qemus else ""))
    return path


def nothing_left(testbed: str) -> None:
    from megafleet import cgroup, sweep

    assert netns_with(testbed + "-") == []
    assert links_in(None, testbed) == []
    path = cgroup.testbed_path(testbed)
    assert path is None or not path.exists()
    # The collect tests' FerretDB (a fixture of the whole run) is recorded too.
    left = [f for f in sweep.leftovers() if f.owner not in ("up-controller", "collect-test")]
    assert left == [], left
    # No process of the testbed: guests' names appear in QEMU's argv.
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            assert not any(testbed.encode() in a for a in argv[:1]), argv


def popen_megafleet(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megafleet", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for_line(p: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    """Read lines from p's stdout (where `up` prints its progress) until one
    contains `needle`; all lines read."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    out, err = p.communicate(timeout=60)
    raise AssertionError(f"no {needle!r} (exit {p.returncode}) in:\n{''.join(lines)}{err}\n{out}")


def test_sigint_during_the_guest_phase_prints_an_interrupted_summary_and_down_leaves_nothing(tmp_path):
    testbed = f"mfui{TAG}"
    path = write_fleet(tmp_path, "intr", containers=20, qemus=2, net=151)
    up = popen_megafleet("up", str(path), "-N", testbed, "--no-ksm", "--boot-timeout", "60")
    try:
        seen = wait_for_line(up, "vm       local: starting", 300)
        time.sleep(0.5)
        t0 = time.monotonic()
        up.send_signal(signal.SIGINT)
        stdout, stderr = up.communicate(timeout=60)
        stopped_in = time.monotonic() - t0
        stdout = "".join(seen) + stdout
        assert up.returncode == 130, stdout + stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        last = stdout.strip().splitlines()[-1]
        assert last.startswith("interrupted: "), stdout
        assert f"'megafleet down {testbed}'" in last
        assert stopped_in < 30, stopped_in
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        down = megafleet_json("down", testbed, check=False)
    assert down["ok"], down
    nothing_left(testbed)


def test_a_second_sigint_aborts_at_once_without_a_traceback_and_down_leaves_nothing(tmp_path):
    testbed = f"mfua{TAG}"
    path = write_fleet(tmp_path, "abort", containers=20, qemus=0, net=154)
    up = popen_megafleet("up", str(path), "-N", testbed, "--no-ksm")
    try:
        wait_for_line(up, "vm       local: starting", 300)
        # The second while the first still stops the steps under way. The
        # first interrupt now takes only milliseconds, and a second SIGINT
        # pending with the first is one signal to trio's receiver: SIGTERM
        # (the other interrupt `up` handles) right behind it is read as the
        # second.
        t0 = time.monotonic()
        up.send_signal(signal.SIGINT)
        up.send_signal(signal.SIGTERM)
        stdout, stderr = up.communicate(timeout=60)
        aborted_in = time.monotonic() - t0
        assert up.returncode == 130, stdout + stderr
        assert "aborted: " in stderr and f"'megafleet down {testbed}'" in stderr, stderr
        assert "Traceback" not in stderr and "Error" not in stderr, stderr
        assert aborted_in < 5, aborted_in
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        down = megafleet_json("down", testbed, check=False)
    assert down["ok"], down
    nothing_left(testbed)


def test_sigterm_during_the_guest_phase_loses_no_boot_event(tmp_path):
    """SIGTERM to `up` while its guests start: every guest that runs afterwards
    has exactly one boot event in the store once `down` is done, also a guest
    whose pid the engine never read (the signal came while its launcher was
    reporting it) and although the collector samples only every 120 s (its
    last look is when `down` stops it). The soak's lost_events, as a test."""
    testbed = f"mfut{TAG}"
    path = write_fleet(tmp_path, "term", containers=80, qemus=0, net=153)
    since = datetime.now(timezone.utc).isoformat()
    up = popen_megafleet("up", str(path), "-N", testbed, "--no-ksm", "--telemetry-interval", "120")
    try:
        wait_for_line(up, "vm       local: starting", 300)
        # SIGTERM as soon as the first guest runs, while the others start.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and up.poll() is None:
            if any(g["state"] == "running" for g in megafleet_json("vm", "ls")):
                break
            time.sleep(0.05)
        up.send_signal(signal.SIGTERM)
        stdout, stderr = up.communicate(timeout=60)
        assert up.returncode == 130, stdout + stderr
        assert stdout.strip().splitlines()[-1].startswith("interrupted: "), stdout
        # Nor from the container helper whose engine stopped reading it.
        assert "Traceback" not in stderr and "Error" not in stderr, stderr
        running = {g["name"] for g in megafleet_json("vm", "ls") if g["state"] == "running"}
        assert running, "no guest ran: the signal came too early to test anything"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        down = megafleet_json("down", testbed, check=False)
    assert down["ok"], down
    events = megafleet_json("telemetry", "events", "--kind", "boot", "--since", since, "-n", "0")
    booted = sorted(e["meta"]["guest"] for e in events if e.get("ok"))
    assert running <= set(booted), f"ran without a boot event: {sorted(running - set(booted))}"
    assert len(booted) == len(set(booted)), f"a boot stored twice: {booted}"
    nothing_left(testbed)


def test_two_ups_racing_one_waits_and_nothing_is_applied_twice(tmp_path):
    testbed = f"mfur{TAG}"
    path = write_fleet(tmp_path, "race", containers=6, qemus=0, net=152)
    args = ("up", str(path), "-N", testbed, "--no-ksm", "--json")
    first = popen_megafleet(*args)
    try:
        # The first holds the lock: a second with --no-wait fails cleanly...
        from megafleet import locks
        deadline = time.monotonic() + 120
        while "up (pid" not in locks.holder(testbed) and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = megafleet("up", str(path), "-N", testbed, "--no-wait", check=False)
        assert busy.returncode == 1 and "busy" in busy.stderr and "Traceback" not in busy.stderr, busy.stderr
        # ... and one without waits, saying for whom, then finds everything up.
        second = popen_megafleet(*args)
        out1, err1 = first.communicate(timeout=300)
        out2, err2 = second.communicate(timeout=300)
        assert first.returncode == 0 and second.returncode == 0, err1 + err2
        assert "waiting for up (pid" in err2 or "already up" in err2, err2
        s1, s2 = json.loads(out1), json.loads(out2)
        assert s1["ready"] == s2["ready"] == 6
        assert "network already up; nothing changed" in err2
        # Nothing twice: one namespace node, six guests, one guest record each.
        assert netns_with(testbed + "-") == [f"{testbed}-probe"]
        from megafleet.vm.state import VmState
        assert sorted(r.name for r in VmState().list()) == [f"c{i}" for i in range(1, 7)]
        status = megafleet_json("status", testbed)
        (bed,) = status["hosts"]["local"]["value"]["testbeds"]
        assert bed["nodes"] == {"up": 1, "running": 6}
        # A `down` while another controller holds the testbed: --no-wait is
        # refused cleanly; without it, it waits (saying for whom), then goes.
        holder = subprocess.Popen([sys.executable, "-c", HOLD, testbed], cwd=REPO, stdout=subprocess.PIPE,
                                  text=True)
        assert holder.stdout.readline().strip() == "held"
        refused = megafleet("down", testbed, "--no-wait", check=False)
        assert refused.returncode == 1 and "busy" in refused.stdout + refused.stderr, refused.stdout
        assert "Traceback" not in refused.stderr
        # diff reads under the lock too: --no-wait fails (2: 1 means "differs").
        busy_diff = megafleet("diff", str(path), "-N", testbed, "--no-wait", check=False)
        assert busy_diff.returncode == 2 and "busy" in busy_diff.stderr, busy_diff.stdout + busy_diff.stderr
        assert "Traceback" not in busy_diff.stderr
        waiting = popen_megafleet("down", testbed)
        wait_for_line(waiting, "waiting for", 60)
        holder.terminate()
        holder.wait()
        out, err = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, out + err
    finally:
        for p in (first,) + ((second,) if "second" in locals() else ()):
            if p.poll() is None:
                p.kill()
                p.wait()
        down = megafleet_json("down", testbed, check=False)
    assert down["ok"], down
    nothing_left(testbed)


HOLD = """
import sys, time
from megafleet import locks
with locks.testbed_lock(sys.argv[1], "a test's live change"):
    print("held", flush=True)
    time.sleep(120)
"""


def _probe_qemus(parent: int) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        ppid = int(next(l.split()[1] for l in status.splitlines() if l.startswith("PPid:")))
        if b"mfi-kvmprobe" in argv and ppid == parent:
            out.append(int(pid))
    return out


def test_kill_9_during_the_kvm_probe_then_down_leaves_no_qemu(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm: the probe does not boot a guest")
    from megafleet.proc import RecordedProcess

    megafleet("image", "build", str(REPO / "examples/images/tiny.toml"), timeout=1800)
    # A fresh state directory: no cached verdict, so `vm boot` probes KVM.
    state = tempfile.mkdtemp(prefix="mfus-")
    env = {**os.environ, "MEGAFLEET_STATE": state}
    boot = popen_megafleet("vm", "boot", "--image", "tiny", "--prefix", f"mfuk{TAG}-", env=env)
    try:
        deadline = time.monotonic() + 60
        probes: list[int] = []
        while not probes and time.monotonic() < deadline and boot.poll() is None:
            probes = _probe_qemus(boot.pid)
            time.sleep(0.05)
        try:
            if not probes:
                raise ProcessLookupError
            probe = RecordedProcess.of(probes[0])
        except ProcessLookupError:
            # Where QEMU refuses KVM at once (an assertion in its MSR set-up
            # on some boots of this PVM host) the probe lives milliseconds:
            # there is no "during" to kill -9 in. Its verdict shows it ran.
            verdict = Path(state) / "accel-probe.json"
            assert verdict.exists(), "the probe did not start"
            pytest.skip(f"the KVM probe ended at once here: {json.loads(verdict.read_text())['reason']}")
        boot.send_signal(signal.SIGKILL)
        boot.wait()
        r = subprocess.run([sys.executable, "-m", "megafleet", "down", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 5
        while probe.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not probe.alive(), "the probe's QEMU outlived kill -9 and down"
        left = subprocess.run([sys.executable, "-m", "megafleet", "doctor", "--leftovers", "--json"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert json.loads(left.stdout)["leftovers"] == [], left.stdout
        assert left.returncode == 0
    finally:
        if boot.poll() is None:
            boot.kill()
            boot.wait()
        subprocess.run([sys.executable, "-m", "megafleet", "vm", "teardown"], cwd=REPO, env=env,
                       capture_output=True, timeout=120)
        import shutil
        shutil.rmtree(state, ignore_errors=True)
