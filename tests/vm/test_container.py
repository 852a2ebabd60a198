"""Real container guests: namespaces, overlay on the image's rootfs, the image's
init in container mode; 50 at once, a veth handed over, a killed engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from megafleet.imagegen.contract import GuestConfig, NicConfig
from megafleet.ledger import Ledger
from megafleet.vm.driver import reap
from megafleet.vm.engine import Engine, guests_dir
from megafleet.vm.spec import GuestSpec, NicSpec
from megafleet.vm.state import OWNER

from .vmhelpers import REPO, assert_nothing_left, live_pids

pytestmark = pytest.mark.root

NAMESPACES = ("net", "pid", "mnt", "uts", "ipc")


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_fifty_containers_boot_and_tear_down(tiny, root_only):
    engine = Engine(timeout_s=120)
    specs = [GuestSpec(name=f"mfvc{i}", image="tiny", driver="container") for i in range(50)]
    try:
        report = trio.run(lambda: engine.apply(specs))
        assert len(report.ready) == 50, [(r.name, r.reason) for r in report.failed]
        views = engine.list("mfvc*")
        assert len(views) == 50 and all(v.state == "running" and v.pid for v in views)
        pids = [v.pid for v in views]
        # Each guest has its own namespaces of every kind, none shared with the host.
        for kind in NAMESPACES:
            inodes = {_ns(pid, kind) for pid in pids}
            assert len(inodes) == 50 and _ns("self", kind) not in inodes, kind
        # The image's init ran in container mode with this guest's settings.
        first = views[0]
        console = (guests_dir() / first.name / "console.log").read_text()
        assert f"MEGAFLEET-READY name={first.name}" in console and "mode=container" in console
        hostname = subprocess.run(["nsenter", "-t", str(first.pid), "-u", "hostname"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        assert hostname == first.name
        # Its root is the overlay, its writes land in its own upper layer only.
        subprocess.run(["nsenter", "-t", str(first.pid), "-m", "-p", "touch", "/mfv-written"], check=True)
        assert (guests_dir() / first.name / "upper" / "mfv-written").exists()
        assert not (Path(tiny.rootfs()) / "mfv-written").exists()
        # The overlays live in the containers' mount namespaces, not the host's.
        assert str(guests_dir()) + "/" not in Path("/proc/self/mountinfo").read_text()
        # Its root is the image's, also one level up ("/.." of the moved root
        # leads back into it, not to the host's root underneath), and none of
        # the host's mounts shows inside.
        root = Path(f"/proc/{first.pid}/root")
        assert sorted(os.listdir(root / "..")) == sorted(os.listdir(root)) and (root / "init").exists()
        # (/proc twice: the mount point made for it, then its PID namespace's
        # proc on top, mounted by its PID 1.)
        inside = Path(f"/proc/{first.pid}/mountinfo").read_text().splitlines()
        assert [line.split()[4] for line in inside] == ["/", "/sys", "/dev", "/proc", "/run", "/tmp", "/proc"]
        # That /proc is its own PID namespace's: its init is PID 1 there.
        status = (root / "proc" / "1" / "status").read_text()
        assert f"NSpid:\t{first.pid}\t1" in Path(f"/proc/{first.pid}/status").read_text()
        assert "Name:\tinit" in status
        # Its /dev has the host's harmless devices, with the host's modes.
        for dev in ("null", "zero", "full", "random", "urandom", "tty"):
            assert (root / "dev" / dev).stat().st_rdev == Path("/dev", dev).stat().st_rdev
            assert (root / "dev" / dev).stat().st_mode == Path("/dev", dev).stat().st_mode

        removed = trio.run(lambda: engine.teardown("mfvc*"))
        assert len(removed) == 50
        assert live_pids(pids) == []
        assert_nothing_left("mfvc")
    finally:
        trio.run(lambda: engine.teardown("mfvc*"))


@pytest.fixture
def veth(root_only):
    """A veth pair as the network layer would hand it over: host end addressed."""
    host, guest = "mfvvh0", "mfvvg0"
    subprocess.run(["ip", "link", "add", host, "type", "veth", "peer", "name", guest], check=True)
    subprocess.run(["ip", "addr", "add", "10.252.0.1/24", "dev", host], check=True)
    subprocess.run(["ip", "link", "set", host, "up"], check=True)
    yield host, guest
    subprocess.run(["ip", "link", "del", host], check=False, capture_output=True)


def test_container_gets_its_veth_and_answers_on_it(tiny, veth):
    host, guest_end = veth
    mac = "52:54:00:0f:0c:01"
    spec = GuestSpec(name="mfvnet1", image="tiny", driver="container",
                     nics=[NicSpec(mac=mac, kind="veth", ifname=host)],
                     config=GuestConfig(name="mfvnet1", nics=(NicConfig(mac, ("10.252.0.2/24",)),)))
    engine = Engine(timeout_s=120)
    try:
        report = trio.run(lambda: engine.apply([spec]))
        assert len(report.ready) == 1, report.failed
        pid = engine.list("mfvnet1")[0].pid
        # The guest end left the host, renamed eth0 with the MAC asked for.
        assert not Path(f"/sys/class/net/{guest_end}").exists()
        links = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link", "show", "eth0"],
                               capture_output=True, text=True, check=True).stdout
        assert mac in links
        # The init configured it: the guest answers on its address (inside our own netns pair).
        ping = subprocess.run(["ping", "-c", "3", "-i", "0.5", "-W", "5", "10.252.0.2"], capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        trio.run(lambda: engine.teardown("mfvnet*"))
        assert_nothing_left("mfvnet")
    finally:
        trio.run(lambda: engine.teardown("mfvnet*"))


def test_engine_killed_mid_boot_of_containers(tiny, root_only):
    engine_proc = subprocess.Popen(
        [sys.executable, "-m", "megafleet", "vm", "boot", "--image", "tiny", "--count", "400",
         "--prefix", "mfvkc", "--driver", "container", "--max-parallel", "8"],
        cwd=REPO, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = Ledger()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            started = [r for r in ledger.list(owner=OWNER, kind="process")
                       if r.data.get("guest", "").startswith("mfvkc") and r.data.get("pid")]
            if len(started) >= 20:
                break
            assert engine_proc.poll() is None, "the engine finished before it was killed"
            time.sleep(0.02)
        engine_proc.send_signal(signal.SIGKILL)
        engine_proc.wait()
        views = Engine().list("mfvkc*")
        assert len(views) == 400
        alive = [v for v in views if v.pid]
        assert 20 <= len(alive) < 400
        assert live_pids([v.pid for v in alive]) == [v.pid for v in alive]

        removed = trio.run(lambda: Engine().teardown("mfvkc*"))
        assert len(removed) == 400
        assert live_pids([v.pid for v in alive]) == []
        for v in alive:
            reap(v.pid)
        assert_nothing_left("mfvkc")
    finally:
        if engine_proc.poll() is None:
            engine_proc.kill()
            engine_proc.wait()
        trio.run(lambda: Engine().teardown("mfvkc*"))
