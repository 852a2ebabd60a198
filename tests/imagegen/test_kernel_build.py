"""imagegen's built kernel (`kernel.build = "minimal"`, megafleet.imagegen.kbuild):
the tiny-minimal example image compiles megafleet's minimal kernel from
Debian's linux-source (minutes on a first run; cached by content hash in the
test cache afterwards), and a guest of it boots under QEMU, applies its
hostname and address and reports on its agent port (a virtio-serial port of
the built-in virtio_console driver) with no module loaded."""

from pathlib import Path

import pytest

from megafleet.imagegen.boottest import boot_test
from megafleet.imagegen.contract import AgentLine, GuestConfig, NicConfig, ReadyLine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"
pytestmark = pytest.mark.qemu


@pytest.mark.timeout(3600)      # a first build compiles a kernel
def test_minimal_kernel_image_builds_and_boots(tiny_image):
    from megafleet.imagegen import store

    image = store.build(EXAMPLES / "tiny-minimal.toml")
    kernel = image.manifest["kernel"]
    assert kernel["package"] == "linux-source-6.1" and kernel["version"].endswith("-megafleet-minimal")
    assert image.manifest["modules"]["load_order"] == []          # everything built in
    assert (image.dir / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"   # a bzImage
    # The same userland as tiny: only the kernel differs (and the modules it needs no more).
    assert image.kernel.read_bytes() != tiny_image.kernel.read_bytes()

    config = GuestConfig(name="mfi-km1", agent_interval=1,
                         nics=(NicConfig(mac="52:54:00:6d:66:21", addresses=("10.199.9.5/24",)),))
    result = boot_test(image, config=config, mem_mb=96, timeout=120)
    assert isinstance(result.ready, ReadyLine) and result.ready.name == "mfi-km1"
    assert result.ready.fields["mode"] == "vm"
    assert isinstance(result.agent, AgentLine) and result.agent.name == "mfi-km1"
    assert [a for a in result.agent.addresses["eth0"] if not a.startswith("fe80:")] == ["10.199.9.5/24"]
    assert "Kernel panic" not in result.console
