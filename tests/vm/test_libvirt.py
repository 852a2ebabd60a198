"""Real libvirt domains through a real libvirtd (started by scripts/libvirtd-up)."""

from __future__ import annotations

import subprocess

import pytest
import trio

from megafleet.vm.engine import Engine, guests_dir
from megafleet.vm.guestexec import exec_in_guest
from megafleet.vm.spec import GuestSpec
from megafleet.vm.state import VmState

from .vmhelpers import REPO, assert_nothing_left, live_pids

pytestmark = [pytest.mark.libvirt, pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def libvirtd():
    up = subprocess.run([str(REPO / "scripts" / "libvirtd-up")], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"libvirtd did not start: {up.stderr}")


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_two_libvirt_domains_boot_and_tear_down(tiny, libvirtd, root_only):
    engine = Engine(timeout_s=240)
    specs = [GuestSpec(name=f"mfvl{i}", image="tiny", driver="libvirt", mem_mb=128) for i in (1, 2)]
    try:
        report = trio.run(lambda: engine.apply(specs))
        assert len(report.ready) == 2, [(r.name, r.reason, r.console_tail) for r in report.failed]
        assert {"mfvl1", "mfvl2"} <= set(_domains())
        views = engine.list("mfvl*")
        assert [v.state for v in views] == ["running", "running"]
        assert all(v.pid and v.rss_bytes for v in views)
        # libvirt's QEMU got the image and the guest's settings.
        cmdline = open(f"/proc/{views[0].pid}/cmdline").read().replace("\0", " ")
        assert tiny.hash in cmdline and "megafleet.name=mfvl1" in cmdline
        assert VmState().get("mfvl1").handle["domain"] == "mfvl1"
        # The exec channel works the same under libvirt.
        r = trio.run(exec_in_guest, guests_dir() / "mfvl2" / "exec.sock", ["hostname"])
        assert (r.rc, r.stdout, r.stderr) == (0, b"mfvl2\n", b"")

        trio.run(lambda: engine.teardown("mfvl*"))
        assert not {"mfvl1", "mfvl2"} & set(_domains())
        assert live_pids([v.pid for v in views]) == []
        assert_nothing_left("mfvl")
    finally:
        trio.run(lambda: engine.teardown("mfvl*"))
