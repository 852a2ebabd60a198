"""Pure logic of the builder: cpio writer/reader, modules.dep ordering, Debian
dependency fields, QEMU argv."""

import io
import stat

import pytest

from megafleet import qemu
from megafleet.imagegen import cpio, debs, kmod


def test_cpio_is_deterministic_and_round_trips(tmp_path):
    entries = [
        cpio.Entry("bin/sh", stat.S_IFLNK | 0o777, target="busybox"),
        cpio.Entry("bin", stat.S_IFDIR | 0o755),
        cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, data=b"\x7fELF" * 5),
        cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        cpio.Entry("dev", stat.S_IFDIR | 0o755),
    ]
    a, b = io.BytesIO(), io.BytesIO()
    cpio.write(entries, a)
    cpio.write(list(reversed(entries)), b)
    assert a.getvalue() == b.getvalue()
    assert len(a.getvalue()) % 4 == 0
    back = list(cpio.read(a.getvalue()))
    assert [e.path for e in back] == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console"]
    assert back[1].data == b"\x7fELF" * 5 and back[2].target == "busybox"
    assert back[4].rdev == (5, 1) and stat.S_ISCHR(back[4].mode)
    cpio.extract(back, tmp_path)
    assert (tmp_path / "bin/busybox").read_bytes() == b"\x7fELF" * 5
    assert (tmp_path / "bin/sh").is_symlink()
    assert not (tmp_path / "dev/console").exists()  # device nodes are left out


def test_cpio_matches_gnu_cpio_reader(tmp_path):
    """Our archive is readable by GNU cpio (the format the kernel also reads)."""
    import shutil
    import subprocess
    if not shutil.which("cpio"):
        pytest.skip("cpio not installed")
    buf = io.BytesIO()
    cpio.write([cpio.Entry("etc", stat.S_IFDIR | 0o755),
                cpio.Entry("etc/hostname", stat.S_IFREG | 0o644, data=b"mfi\n")], buf)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=buf.getvalue(),
                             capture_output=True, check=True).stdout.decode().split()
    assert listing == ["etc", "etc/hostname"]


def make_modules(tmp_path):
    d = tmp_path / "6.1.0-test"
    d.mkdir()
    (d / "modules.dep").write_text(
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "
        "kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/fs/fuse/fuse-thing.ko:\n")
    (d / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    return d


def test_modules_load_in_dependency_order(tmp_path):
    plan = kmod.plan(make_modules(tmp_path), ["virtio_net", "virtio_console", "virtio", "fuse-thing"])
    assert plan.version == "6.1.0-test"
    assert plan.load_order == (
        "kernel/drivers/virtio/virtio_ring.ko", "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko",
        "kernel/drivers/char/virtio_console.ko", "kernel/fs/fuse/fuse-thing.ko")
    assert plan.builtin == ("virtio",)


def test_missing_module_is_named(tmp_path):
    with pytest.raises(kmod.ModuleError, match="module 'virtio_nett' not found in kernel 6.1.0-test"):
        kmod.plan(make_modules(tmp_path), ["virtio_nett"])


def test_depends_field_parsing():
    assert debs._parse_depends("libc6 (>= 2.34), libfoo1 | libbar1 [amd64], python3:any, ") == (
        ("libc6",), ("libfoo1", "libbar1"), ("python3",))


def test_qemu_argv_is_lean_and_complete():
    argv = qemu.qemu_argv("/k", "/i", "quiet megafleet.name=mfi-a", name="mfi-a", mem_mb=64,
                          accel="tcg", qmp_socket="/r/q.sock", console_log="/r/c.log",
                          agent_socket="/r/a.sock",
                          nics=[qemu.Nic("52:54:00:00:00:01", tap="mfi-tap0"),
                                {"mac": "52:54:00:00:00:02", "vde": "/r/sw"}])
    joined = " ".join(argv)
    for part in ("-nodefaults", "-no-user-config", "-display none", "-vga none",
                 "q35,mem-merge=on", "tcg,tb-size=", "-m 64",
                 "console=ttyS0 quiet megafleet.name=mfi-a panic=-1",
                 "file,id=con0,path=/r/c.log", "unix:/r/q.sock,server=on,wait=off",
                 "socket,id=agent0,path=/r/a.sock,server=on,wait=off",
                 "virtserialport,chardev=agent0,name=org.megafleet.agent",
                 "virtio-serial-pci,max_ports=3",
                 "tap,id=n0,ifname=mfi-tap0,script=no,downscript=no",
                 "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01", "vde,id=n1,sock=/r/sw"):
        assert part in joined, part
    micro = " ".join(qemu.qemu_argv("/k", "/i", "", name="mfi-a", machine="microvm",
                                    nics=[qemu.Nic("52:54:00:00:00:01")]))
    assert "virtio-net-device" in micro and "user,id=n0,restrict=on" in micro


def test_qemu_argv_keeps_the_callers_kernel_parameters():
    argv = qemu.qemu_argv("/k", "/i", "console=hvc0 audit=1 megafleet.name=mfi-a", name="mfi-a")
    append = argv[argv.index("-append") + 1].split()
    assert append.count("audit=1") == 1 and "audit=0" not in append
    assert "console=ttyS0" not in append and "i8042.nokbd" in append


def test_tcg_guests_get_the_hosts_tsc_frequency():
    """Under TCG the guest's TSC runs at the host's: the guest kernel is told
    (tsc_early_khz) instead of calibrating against the emulated PIT; under KVM
    it is not (kvmclock), and a caller's own value wins."""
    khz = qemu.host_tsc_khz()
    tcg = qemu.qemu_argv("/k", "/i", "", name="mfi-a", accel="tcg")
    kvm = qemu.qemu_argv("/k", "/i", "", name="mfi-a", accel="kvm")
    mine = qemu.qemu_argv("/k", "/i", "tsc_early_khz=1000000", name="mfi-a", accel="tcg")
    append = lambda argv: argv[argv.index("-append") + 1].split()  # noqa: E731
    if khz:
        assert f"tsc_early_khz={khz}" in append(tcg) and 100_000 < khz < 10_000_000
    assert not any(p.startswith("tsc_early_khz") for p in append(kvm))
    assert [p for p in append(mine) if p.startswith("tsc_early_khz")] == ["tsc_early_khz=1000000"]


def test_qemu_argv_rejects_bad_names():
    with pytest.raises(ValueError):
        qemu.qemu_argv("/k", "/i", "", name="bad name")
    with pytest.raises(ValueError):
        qemu.qemu_argv("/k", "/i", "", name="mfi-a", nics=[qemu.Nic("52:54:00:00:00:01", tap="x;rm")])


def test_scratch_sweep_removes_only_dead_creators(tmp_path):
    import subprocess

    from megafleet.imagegen import scratch

    mine = scratch.make(tmp_path, ".tmp")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "half-written").write_text("x")
    other = tmp_path / f".x-{dead.pid}-abc"
    other.mkdir()
    assert scratch.sweep(tmp_path, ".tmp") == 1
    assert mine.exists() and other.exists() and not stale.exists()


def test_kernel_fragment_options_and_what_kconfig_dropped():
    from megafleet.imagegen import kbuild

    fragment = b"# comment\nCONFIG_NET=y\nCONFIG_HZ=100\n# CONFIG_SMP is not set\nCONFIG_VIRTIO_NET=y\n"
    assert kbuild.fragment_options(fragment) == {"CONFIG_NET": "y", "CONFIG_HZ": "100",
                                                 "CONFIG_SMP": "n", "CONFIG_VIRTIO_NET": "y"}
    final = "CONFIG_NET=y\nCONFIG_HZ=100\n# CONFIG_VIRTIO_NET is not set\n"
    assert kbuild.dropped_options(fragment, final) == ["CONFIG_VIRTIO_NET"]
    assert kbuild.dropped_options(fragment, final + "CONFIG_VIRTIO_NET=y\n") == []
    # The shipped fragment: everything the guest contract needs, no modules.
    shipped = kbuild.fragment_options(kbuild.shipped_fragment("minimal"))
    for option in ("CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_CONSOLE", "CONFIG_SERIAL_8250_CONSOLE",
                   "CONFIG_BLK_DEV_INITRD", "CONFIG_RD_ZSTD", "CONFIG_DEVTMPFS", "CONFIG_IPV6"):
        assert shipped[option] == "y", option
    assert shipped["CONFIG_MODULES"] == "n"
    a = kbuild.cache_key("ab" * 32, fragment, "12.2.0")
    assert a == kbuild.cache_key("ab" * 32, fragment, "12.2.0")
    assert a != kbuild.cache_key("ab" * 32, fragment + b"CONFIG_X=y\n", "12.2.0")
    assert a != kbuild.cache_key("ab" * 32, fragment, "13.1.0")
