"""Real QEMU guests (TCG on this host): a bulk boot with one failing guest, a
command run inside a guest, the teardown, and an engine killed with SIGKILL in
the middle of a boot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import trio

from .vmhelpers import REPO, assert_nothing_left, live_pids, qemu_pids
from megafleet.imagegen.contract import GuestConfig, NicConfig
from megafleet.ledger import Ledger
from megafleet.vm.driver import reap
from megafleet.vm.engine import Engine, guests_dir
from megafleet.vm.guestexec import exec_in_guest
from megafleet.vm.spec import GuestSpec, NicSpec
from megafleet.vm.state import OWNER, VmState

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

# The host is shared and busy: generous, since a TCG boot may take half a minute.
TIMEOUT_S = 240


@pytest.fixture
def tap(root_only):
    """A tap device, as the network layer would hand it over."""
    name = "mfvtap0"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    yield name
    subprocess.run(["ip", "link", "del", name], check=False)


def test_four_guests_boot_a_panicking_one_fails_then_teardown(tiny, panic_image, tap):
    mac = "52:54:00:0f:00:01"
    specs = [GuestSpec(name=f"mfvq{i}", image="tiny", driver="qemu", mem_mb=128) for i in range(1, 4)]
    specs.append(GuestSpec(name="mfvq4", image="tiny", driver="qemu", mem_mb=128,
                           nics=[NicSpec(mac=mac, kind="tap", ifname=tap)],
                           config=GuestConfig(name="mfvq4", nics=(NicConfig(mac, ("10.251.0.2/24",)),))))
    specs.append(GuestSpec(name="mfvqpanic", image="mfvpanic", driver="qemu", mem_mb=128))
    engine = Engine(timeout_s=TIMEOUT_S, retries=0)
    try:
        _boot_check_teardown(engine, specs)
    finally:
        trio.run(lambda: engine.teardown("mfvq*"))  # whatever happened above


def _boot_check_teardown(engine, specs):
    seen = []
    report = trio.run(lambda: engine.apply(specs, progress=lambda d, t, r: seen.append((d, t))))

    assert sorted(r.name for r in report.ready) == ["mfvq1", "mfvq2", "mfvq3", "mfvq4"]
    [failed] = report.failed
    assert failed.name == "mfvqpanic" and "exited before the ready line" in failed.reason
    assert "Kernel panic - not syncing: Attempted to kill init" in failed.console_tail
    assert "Kernel panic - not syncing: Attempted to kill init" in failed.reason
    assert seen[-1] == (5, 5)
    assert report.percentile(50) > 0

    views = {v.name: v for v in engine.list("mfvq*")}
    assert {n: v.state for n, v in views.items()} == {
        "mfvq1": "running", "mfvq2": "running", "mfvq3": "running", "mfvq4": "running",
        "mfvqpanic": "failed"}
    assert all(views[f"mfvq{i}"].rss_bytes > 0 and views[f"mfvq{i}"].pid for i in range(1, 5))
    assert VmState().get("mfvqpanic").console_tail == failed.console_tail
    # The NIC is attached to the tap the network layer gave.
    assert "ifname=mfvtap0" in " ".join(open(f"/proc/{views['mfvq4'].pid}/cmdline").read().split("\0"))
    # QMP answers for a running guest.
    qemu = engine.driver("qemu")
    assert trio.run(qemu.status, VmState().get("mfvq1").handle) == "running"
    # A command runs inside the guest through its exec channel, its argv intact.
    word = "it's a \"word\" $HOME `id`\nand a line"
    r = trio.run(exec_in_guest, guests_dir() / "mfvq4" / "exec.sock",
                 ["sh", "-c", 'hostname; ip -o -4 addr show eth0; echo "$1" >&2; exit 3', "sh", word])
    assert r.rc == 3 and r.stdout.decode().startswith("mfvq4\n"), r
    assert "10.251.0.2/24" in r.stdout.decode() and r.stderr.decode() == word + "\n"

    # Applying the same manifest again leaves the running guests alone.
    again = trio.run(lambda: engine.apply(specs[:4]))
    assert [r.outcome for r in again.results] == ["already"] * 4
    assert {v.pid for v in engine.list("mfvq[1-4]")} == {views[f"mfvq{i}"].pid for i in range(1, 5)}

    # `vm stop` stops through QMP and keeps the record.
    assert trio.run(lambda: engine.stop("mfvq3")) == ["mfvq3"]
    assert live_pids([views["mfvq3"].pid]) == []
    assert [(v.state, v.pid) for v in engine.list("mfvq3")] == [("stopped", None)]

    pids = [views[f"mfvq{i}"].pid for i in range(1, 5)]
    removed = trio.run(lambda: engine.teardown("mfvq*"))
    assert sorted(removed) == ["mfvq1", "mfvq2", "mfvq3", "mfvq4", "mfvqpanic"]
    assert live_pids(pids) == []
    assert_nothing_left("mfvq")
    assert not any(p.suffix == ".sock" for p in guests_dir().rglob("*"))
    # Teardown twice is harmless.
    assert trio.run(lambda: engine.teardown("mfvq*")) == []


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megafleet", "vm", *args]


def test_engine_killed_mid_boot_then_teardown_leaves_nothing(tiny):
    engine_proc = subprocess.Popen(
        _cli("boot", "--image", "tiny", "--count", "3", "--prefix", "mfvk", "--driver", "qemu",
             "--timeout", str(TIMEOUT_S), "--max-parallel", "2"),
        cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = Ledger()
    deadline = time.monotonic() + 120
    try:
        # Kill it as soon as it has started a guest (it boots 2 at a time).
        while time.monotonic() < deadline:
            started = [r for r in ledger.list(owner=OWNER, kind="process")
                       if r.data.get("guest", "").startswith("mfvk") and r.data.get("pid")]
            if started:
                break
            assert engine_proc.poll() is None, "the engine ended before starting a guest"
            time.sleep(0.05)
        else:
            pytest.fail("the engine started no guest within 120 s")
    finally:
        engine_proc.send_signal(signal.SIGKILL)
        engine_proc.wait()
    try:
        _check_truth_then_teardown()
    finally:
        trio.run(lambda: Engine().teardown("mfvk*"))


def _why_exited(*names: str) -> dict[str, str]:
    """What the guests' QEMU and console logs end with: why a guest that was
    started is gone (a run of the full suite once found every one exited)."""
    from megafleet.vm.engine import console_tail

    out = {}
    for name in names:
        gdir = guests_dir() / name
        out[name] = (f"qemu.log: {console_tail(gdir / 'qemu.log', 5)!r}; "
                     f"console: {console_tail(gdir / 'console.log', 8)!r}")
    return out


def _check_truth_then_teardown():
    # `vm ls` shows the truth: guests that were started keep running.
    views = {v.name: v for v in Engine().list("mfvk*")}
    assert set(views) == {"mfvk1", "mfvk2", "mfvk3"}
    running = [v for v in views.values() if v.pid]
    assert running, (views, _why_exited("mfvk1", "mfvk2"))
    assert all(v.state in ("starting", "running") for v in running)
    assert live_pids([v.pid for v in running]) == [v.pid for v in running]
    assert all(v.state == "exited" for v in views.values() if not v.pid)
    listed = subprocess.run(_cli("ls", "mfvk*", "--json"), cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert '"mfvk1"' in listed.stdout

    out = subprocess.run(_cli("teardown", "mfvk*"), cwd=REPO, capture_output=True, text=True, check=True)
    assert "removed 3 guest(s)" in out.stdout
    time.sleep(0.2)
    assert live_pids([v.pid for v in running]) == []
    for v in running:  # orphaned to this test process (subreaper): reap them
        reap(v.pid)
    assert qemu_pids("mfvk") == []
    assert_nothing_left("mfvk")
