"""A libvirt guest under experiment control (a real libvirtd, started by
scripts/libvirtd-up as tests/vm/test_libvirt.py does): on a switch with a
namespace host, `up` verifies it reachable live; `node restart` boots it again
as a new QEMU process of the same domain with the same address, reachable
again; `down` leaves neither domain nor namespace."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.experiment.test_live import _guest_addr, _guest_pid, _wait_ping, nothing_left
from tests.up.conftest import REPO, TAG, megafleet, megafleet_json

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.qemu, pytest.mark.slow]

T = f"mfx{TAG}l"
GUEST = f"mfxlv{TAG}"
FLEET = f"""\
image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.64.0.0/16
switch lan
host h on lan
vm {GUEST} image tiny driver libvirt mem 128M on lan
reachable h {GUEST}
"""


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
                         capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_libvirt_guest_verified_reachable_and_restarted_with_its_address(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, libvirtd)")
    started = subprocess.run([str(REPO / "scripts" / "libvirtd-up")], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.fail(f"libvirtd did not start: {started.stderr}")
    path = tmp_path / "lv.fleet"
    path.write_text(FLEET)
    try:
        summary = megafleet_json("up", str(path), "-N", T, "--no-ksm", "--boot-timeout", "180", check=False,
                                 timeout=600)
        assert summary["ok"], summary
        assert summary["verify"]["checks"] == 1 and summary["verify"]["passed"] == 1, summary["verify"]
        assert GUEST in _domains()
        addr, pid = _guest_addr(T, GUEST), _guest_pid(GUEST)
        assert pid is not None

        done = megafleet_json("node", "restart", GUEST, "-t", T, timeout=600)
        assert [(d["node"], d["action"]) for d in done] == [(GUEST, "restart")]
        assert _guest_pid(GUEST) not in (None, pid)
        assert GUEST in _domains()
        assert _guest_addr(T, GUEST) == addr
        assert _wait_ping(T, "h", addr, 30)
        assert megafleet_json("verify", T, "--within", "20")["ok"]
    finally:
        megafleet("down", T, check=False)
    nothing_left(T)
    assert GUEST not in _domains()
