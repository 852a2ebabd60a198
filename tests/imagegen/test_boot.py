"""Real guests: the tiny image boots under QEMU (TCG here, KVM where the probe
shows it works), applies hostname and address from the kernel command line and
reports them on its agent port. Also the container mode of the same init.
Every test checks that nothing it started is left behind."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from megafleet import paths, qemu
from megafleet.imagegen.boottest import boot_test
from megafleet.imagegen.cli import image as image_cli
from megafleet.imagegen.contract import AgentLine, GuestConfig, NicConfig, ReadyLine, parse_line
from megafleet.ledger import Ledger
from megafleet.proc import RecordedProcess

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
pytestmark = pytest.mark.qemu


def qemu_pids_named(name: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"mf-{name}".encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def assert_nothing_left(name: str) -> None:
    assert not Ledger().list(owner=qemu.LEDGER_OWNER), "ledger still lists processes"
    assert not qemu_pids_named(name), "a QEMU process is still running"
    assert not [p for p in paths.run_dir().iterdir() if p.name.startswith("mfi-boot-")]


def test_tiny_boots_and_applies_hostname_and_address(tiny_image):
    config = GuestConfig(name="mfi-b1", agent_interval=1,
                         nics=(NicConfig(mac="52:54:00:6d:66:11", addresses=("10.199.7.5/24",), mtu=1400),))
    result = boot_test(tiny_image, config=config, timeout=120)
    assert isinstance(result.ready, ReadyLine)
    assert result.ready.name == "mfi-b1"          # hostname applied (init reads it back)
    assert result.ready.fields["mode"] == "vm"
    assert result.ready.uptime > 0
    agent = result.agent
    assert isinstance(agent, AgentLine)
    assert agent.name == "mfi-b1"
    assert "eth0" in agent.interfaces
    # the address was applied to the NIC with that MAC (an IPv6 link-local
    # address may join it once the kernel's duplicate detection is done)
    assert [a for a in agent.addresses["eth0"] if not a.startswith("fe80:")] == ["10.199.7.5/24"]
    assert "eth0:1400" in agent.fields["mtu"].split(",")  # mtu= item applied
    assert agent.mem_total_kb > 0
    assert result.guest_rss_bytes > 0
    assert result.accel in ("kvm", "tcg")
    assert_nothing_left("mfi-b1")


def test_boot_test_command_builds_and_reports_json():
    result = CliRunner().invoke(image_cli, ["boot-test", "--build", str(EXAMPLES / "tiny.toml"),
                                            "--json", "--timeout", "120"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["image"] == "tiny"
    assert report["accel"] in ("kvm", "tcg")
    assert report["boot_to_ready_s"] > 0 and report["guest_rss_bytes"] > 0
    assert "10.199.0.2/24" in report["agent"]["addresses"]["eth0"]
    assert_nothing_left("mfi-boot")


def test_container_mode_reads_etc_cmdline(tiny_image, tmp_path, root_only):
    """The same init as PID 1 of a container (pid+mount+net namespaces, chroot):
    parameters from /etc/megafleet/cmdline, READY and AGENT lines on stdout."""
    if not shutil.which("unshare"):
        pytest.skip("unshare not installed")
    root = tmp_path / "root"
    shutil.copytree(tiny_image.rootfs(), root, symlinks=True)
    (root / "etc/megafleet/cmdline").write_text("megafleet.name=mfi-ct1 megafleet.agent=1\n")
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount", "--net",
                             "chroot", str(root), "/init"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={"PATH": os.environ["PATH"]})
    recorded = RecordedProcess.of(proc.pid)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            parsed = parse_line(line)
            if parsed:
                lines.append(parsed)
            if any(isinstance(p, AgentLine) for p in lines):
                break
    finally:
        recorded.signal(signal.SIGKILL)
        proc.wait(timeout=10)
    ready = [p for p in lines if isinstance(p, ReadyLine)]
    agents = [p for p in lines if isinstance(p, AgentLine)]
    assert ready and ready[0].name == "mfi-ct1" and ready[0].fields["mode"] == "container"
    assert 0 <= ready[0].uptime < 60
    assert agents and agents[0].name == "mfi-ct1" and "lo" in agents[0].interfaces
    assert not recorded.alive()
