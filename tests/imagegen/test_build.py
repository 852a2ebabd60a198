"""Real builds: apt fetches the kernel and busybox, the image lands in the cache.
Checks content addressing, cache hits, byte-identical rebuilds from scratch, the
manifest, spec errors found by apt / modules.dep (cache untouched), and rm."""

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from megafleet import paths
from megafleet.imagegen import debs, store
from megafleet.imagegen.cli import image as image_cli
from megafleet.imagegen.spec import SpecError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"

KERNEL = '[kernel]\npackage = "linux-image-cloud-amd64"\nmodules = ["virtio_net"]\n'


def cache_state() -> dict[str, bytes]:
    """Every file of the image cache except the package caches (which are inputs)."""
    root = paths.cache_dir()
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if rel.parts[0] in ("debs", "unpacked", "rootfs") or not f.is_file():
            continue
        out[str(rel)] = f.read_bytes()
    return out


def test_tiny_image_files_match_manifest(tiny_image):
    m = tiny_image.manifest
    assert tiny_image.name == "tiny" and m["hash"] == tiny_image.hash
    assert tiny_image.dir == paths.cache_dir() / "images" / tiny_image.hash
    data = tiny_image.initramfs.read_bytes()
    assert m["initramfs"]["bytes"] == len(data)
    assert m["initramfs"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert data[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    assert m["kernel"]["sha256"] == hashlib.sha256(tiny_image.kernel.read_bytes()).hexdigest()
    names = [p["name"] for p in m["packages"]]
    assert "busybox-static" in names and any(n.startswith("linux-image-6.") for n in names)
    assert all(p["version"] for p in m["packages"])
    order = m["modules"]["load_order"]
    # dependencies resolved from modules.dep come before the modules asked for
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_net")
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    assert json.loads((tiny_image.dir / "manifest.json").read_text()) == m


def test_rebuild_is_a_cache_hit(tiny_image):
    again = store.build(EXAMPLES / "tiny.toml")
    assert again.cache_hit
    assert again.hash == tiny_image.hash
    assert store.find("tiny").hash == tiny_image.hash
    assert store.find(tiny_image.hash[:10]).hash == tiny_image.hash


def test_two_builds_from_scratch_give_identical_bytes(tmp_path, monkeypatch):
    shared_debs = str(debs.deb_cache_dir())
    results = []
    for run in ("one", "two"):
        monkeypatch.setenv("MEGAFLEET_CACHE", str(tmp_path / run))
        monkeypatch.setenv("MEGAFLEET_DEB_CACHE", shared_debs)
        img = store.build(EXAMPLES / "tiny.toml")
        assert not img.cache_hit
        results.append({f: (img.dir / f).read_bytes()
                        for f in ("vmlinuz", "initramfs.img", "manifest.json")})
        assert img.dir.parent == tmp_path / run / "images"
    assert results[0] == results[1]


def test_rootfs_is_the_unpacked_initramfs(tiny_image):
    root = tiny_image.rootfs()
    assert root == paths.cache_dir() / "rootfs" / tiny_image.hash
    assert (root / "init").read_bytes().startswith(b"#!/bin/sh")
    assert (root / "bin/sh").is_symlink() or (root / "bin/sh").exists()
    assert (root / "usr/lib/megafleet/agent").exists()
    assert tiny_image.rootfs() == root  # unpacked once


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An image cache of this test alone (teammates' tests may build into the
    shared one meanwhile), sharing the .deb cache."""
    shared_unpacked = paths.cache_dir() / "unpacked"  # trees of .debs: inputs, like the .debs
    monkeypatch.setenv("MEGAFLEET_DEB_CACHE", str(debs.deb_cache_dir()))
    monkeypatch.setenv("MEGAFLEET_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "unpacked").symlink_to(shared_unpacked)
    return tmp_path / "cache"


def build_error(tmp_path, text: str) -> tuple[Path, str]:
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    before = cache_state()
    with pytest.raises(SpecError) as info:
        store.build(spec)
    assert cache_state() == before, "a failed build changed the cache"
    return spec, str(info.value)


def test_misspelled_package_is_named_and_cache_untouched(tmp_path, tiny_image, private_cache):
    spec, msg = build_error(tmp_path, 'name = "mfi-bad"\npackages = ["frrr"]\n' + KERNEL)
    assert msg == (f"{spec}:2: key 'packages': unknown Debian package 'frrr' (apt-cache knows "
                   "no such package; check the spelling, or run apt-get update)")


def test_missing_module_is_named_and_cache_untouched(tmp_path, tiny_image, private_cache):
    spec, msg = build_error(tmp_path, 'name = "mfi-bad"\n[kernel]\n'
                            'package = "linux-image-cloud-amd64"\nmodules = ["virtio_nett"]\n')
    assert msg.startswith(f"{spec}:4: key 'kernel.modules': module 'virtio_nett' not found in kernel 6.")
    assert msg.endswith("(neither in modules.dep nor built in)")


def test_misspelled_kernel_package(tmp_path, private_cache):
    spec, msg = build_error(tmp_path, 'name = "mfi-bad"\n[kernel]\npackage = "linux-image-cloudd-amd64"\n')
    assert msg == f"{spec}:3: key 'kernel.package': unknown Debian package 'linux-image-cloudd-amd64'"


def test_cli_build_ls_inspect_rm(tmp_path, monkeypatch, tiny_image):
    """The CLI on a private cache: build (then a cache hit), ls, inspect, rm."""
    monkeypatch.setenv("MEGAFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEGAFLEET_DEB_CACHE", str(debs.deb_cache_dir()))
    spec = tmp_path / "mfi-small.toml"
    spec.write_text(f'name = "mfi-small"\nparents = ["{EXAMPLES / "tiny.toml"}"]\ncompress_level = 3\n'
                    '[files."/etc/motd"]\ntext = "hello from mfi\\n"\n'
                    '[services.hello]\ncommand = "echo hi"\nstart = false\n')
    runner = CliRunner()
    first = runner.invoke(image_cli, ["build", str(spec), "--json"])
    assert first.exit_code == 0, first.output
    built = json.loads(first.stdout)
    assert built["name"] == "mfi-small" and built["cache_hit"] is False
    again = json.loads(runner.invoke(image_cli, ["build", str(spec), "--json"]).stdout)
    assert again["cache_hit"] is True and again["hash"] == built["hash"]

    listing = runner.invoke(image_cli, ["ls"])
    assert listing.exit_code == 0 and "mfi-small" in listing.output and built["hash"][:12] in listing.output
    inspected = json.loads(runner.invoke(image_cli, ["inspect", "mfi-small", "--json"]).stdout)
    assert inspected["hash"] == built["hash"] and inspected["services"]["hello"]["start"] is False
    root = store.find("mfi-small").rootfs()
    assert (root / "etc/motd").read_text() == "hello from mfi\n"
    assert (root / "etc/megafleet/services/hello").read_text() == "echo hi\n"

    removed = runner.invoke(image_cli, ["rm", "mfi-small"])
    assert removed.exit_code == 0 and "removed mfi-small" in removed.output
    assert not list((tmp_path / "cache" / "images").iterdir())
    assert not (tmp_path / "cache" / "rootfs" / built["hash"]).exists()
    missing = runner.invoke(image_cli, ["inspect", "mfi-small"])
    assert missing.exit_code == 1 and "no image named 'mfi-small'" in missing.output


def test_cli_reports_spec_errors(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "mfi-bad"\nkernal = {}\n')
    result = CliRunner().invoke(image_cli, ["build", str(spec)])
    assert result.exit_code == 1
    assert f"Error: {spec}:2: key 'kernal': unknown key" in result.output


def test_exclude_packages_prunes_the_dependency_closure():
    """frr's closure pulls perl and cron through logrotate; excluding them prunes
    the subtree (apt-cache, no download)."""
    full = {p.name for p in debs.resolve(["frr"])}
    pruned = {p.name for p in debs.resolve(["frr"], ["logrotate", "perl-base", "perl"])}
    assert "frr" in pruned and "libyang2" in pruned
    assert "logrotate" in full and "logrotate" not in pruned
    assert not {"perl-base", "perl", "cron"} & pruned


def test_local_kernel_and_modules_dir(tmp_path, monkeypatch, tiny_image):
    """kernel.vmlinuz + kernel.modules_dir instead of a package: here the unpacked
    Debian kernel from the cache serves as a local kernel."""
    pkg = next(p for p in tiny_image.manifest["packages"] if p.get("role") == "kernel")
    tree = paths.cache_dir() / "unpacked" / pkg["sha256"]
    version = tiny_image.manifest["kernel"]["version"]
    spec = tmp_path / "local.toml"
    spec.write_text(f'name = "mfi-local"\ncompress_level = 3\n[kernel]\n'
                    f'vmlinuz = "{tree}/boot/vmlinuz-{version}"\n'
                    f'modules_dir = "{tree}/lib/modules/{version}"\nmodules = ["virtio_console"]\n')
    monkeypatch.setenv("MEGAFLEET_DEB_CACHE", str(debs.deb_cache_dir()))
    monkeypatch.setenv("MEGAFLEET_CACHE", str(tmp_path / "cache"))
    img = store.build(spec)
    assert img.kernel.read_bytes() == tiny_image.kernel.read_bytes()
    assert img.manifest["kernel"]["package"] is None
    assert img.manifest["modules"]["load_order"] == ["virtio_ring", "virtio", "virtio_console"]
