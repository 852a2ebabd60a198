"""Benchmark of imagegen against debootstrap, in one run. Prints ONE JSON line.

    .venv/bin/python bench/imagegen.py [--boots N] [--no-debootstrap]

Keys (issue 2): cold_build_s (tiny, empty image cache, .deb cache warm),
warm_rebuild_s (same spec again: a cache hit), initramfs_bytes (tiny),
router_initramfs_bytes, boot_to_ready_s (median of N boots), guest_rss_bytes,
accel, debootstrap_bytes and debootstrap_build_s (`debootstrap --variant=minbase`
with the same extra packages, its package cache warm as ours is, built in this
run). Extra keys give the context: ratios against the targets, the uncompressed
size of tiny, the router build time, each boot's time.

Targets: tiny initramfs <= 8 MiB; router <= 40 MiB; warm rebuild <= 1 s;
boot-to-ready under TCG <= 6 s; tiny at least 10x smaller than the debootstrap
root. The machine is shared: times vary with the load (reported as loadavg).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megafleet import paths, qemu  # noqa: E402
from megafleet.imagegen import debs, store  # noqa: E402
from megafleet.imagegen.boottest import boot_test  # noqa: E402
from megafleet.imagegen.spec import load  # noqa: E402

EXAMPLES = REPO / "examples" / "images"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources)."""
    for f in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if f.exists():
            for line in f.read_text().splitlines():
                m = re.match(r"\s*(URIs:|deb)\s+(\S+/debian)\s*", line)
                if m:
                    return m.group(2)
    return "http://deb.debian.org/debian"


def dir_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
    return total


def unmount_below(root: Path) -> None:
    """debootstrap mounts /proc and /sys in its target; leave no mount behind."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(str(root) + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def debootstrap(extra: list[str], cache: Path) -> tuple[int, float]:
    cache.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="mfi-debootstrap-", dir="/var/tmp"))
    argv = ["debootstrap", "--variant=minbase", f"--cache-dir={cache}"]
    if extra:
        argv.append("--include=" + ",".join(extra))
    argv += ["bookworm", str(target), mirror()]
    try:
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            raise RuntimeError("debootstrap failed: " + proc.stderr.strip()[-500:])
        unmount_below(target)
        # The root as it would be shipped: without the downloaded .debs.
        shutil.rmtree(target / "var/cache/apt/archives", ignore_errors=True)
        return dir_bytes(target), seconds
    finally:
        unmount_below(target)
        shutil.rmtree(target, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boots", type=int, default=3, help="guests to boot (median reported)")
    parser.add_argument("--no-debootstrap", action="store_true", help="skip the reference")
    args = parser.parse_args()

    result: dict = {"load_before": os.getloadavg()[0]}
    shared_debs = str(debs.deb_cache_dir())  # warm .deb cache, shared with the fresh cache
    debootstrap_cache = paths.cache_dir() / "debootstrap-debs"  # kept warm across runs
    result["debootstrap_cache_warm"] = any(debootstrap_cache.glob("*.deb"))
    real_cache = os.environ.get("MEGAFLEET_CACHE")
    scratch = Path(tempfile.mkdtemp(prefix="mfi-bench-", dir=paths.cache_dir()))
    os.environ["MEGAFLEET_DEB_CACHE"] = shared_debs
    try:
        # Warm the .deb cache first (not timed), so cold_build_s measures the build.
        for spec in ("tiny.toml", "router.toml"):
            s = load(EXAMPLES / spec)
            for pkg in debs.resolve(["busybox-static"] + s.packages, s.exclude_packages):
                debs.fetch(pkg)
        os.environ["MEGAFLEET_CACHE"] = str(scratch)
        log("cold build of tiny (empty image cache, .deb cache warm)")
        start = time.monotonic()
        tiny = store.build(EXAMPLES / "tiny.toml")
        result["cold_build_s"] = round(time.monotonic() - start, 3)
        start = time.monotonic()
        again = store.build(EXAMPLES / "tiny.toml")
        result["warm_rebuild_s"] = round(time.monotonic() - start, 3)
        assert again.cache_hit and again.hash == tiny.hash
        result["initramfs_bytes"] = tiny.manifest["initramfs"]["bytes"]
        result["tiny_uncompressed_bytes"] = tiny.manifest["initramfs"]["cpio_bytes"]
        result["kernel_bytes"] = tiny.manifest["kernel"]["bytes"]

        log("cold build of router")
        start = time.monotonic()
        router = store.build(EXAMPLES / "router.toml")
        result["router_build_s"] = round(time.monotonic() - start, 3)
        result["router_initramfs_bytes"] = router.manifest["initramfs"]["bytes"]

        accel, reason = qemu.probe_accel()
        result["accel"] = accel
        result["accel_reason"] = reason
        boots, rss = [], []
        for i in range(args.boots):
            log(f"boot {i + 1}/{args.boots} under {accel}")
            r = boot_test(tiny, accel=accel, timeout=120)
            boots.append(r.boot_to_ready_s)
            rss.append(r.guest_rss_bytes)
        result["boot_to_ready_s"] = round(statistics.median(boots), 3)
        result["boot_to_ready_all_s"] = boots
        result["guest_rss_bytes"] = int(statistics.median(rss))
        result["guest_mem_mb"] = 128
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if real_cache is None:
            os.environ.pop("MEGAFLEET_CACHE", None)
        else:
            os.environ["MEGAFLEET_CACHE"] = real_cache

    if not args.no_debootstrap:
        extra = load(EXAMPLES / "tiny.toml").packages + ["busybox-static"]
        log("debootstrap --variant=minbase (reference)")
        result["debootstrap_bytes"], seconds = debootstrap(extra, debootstrap_cache)
        result["debootstrap_build_s"] = round(seconds, 3)
        result["size_ratio_vs_debootstrap"] = round(result["debootstrap_bytes"] / result["initramfs_bytes"], 1)
        result["size_ratio_uncompressed_vs_debootstrap"] = round(
            result["debootstrap_bytes"] / result["tiny_uncompressed_bytes"], 1)
        result["build_speedup_vs_debootstrap"] = round(seconds / result["cold_build_s"], 1)
    mib = 1 << 20
    result["targets_met"] = {
        "tiny_le_8MiB": result["initramfs_bytes"] <= 8 * mib,
        "router_le_40MiB": result["router_initramfs_bytes"] <= 40 * mib,
        "warm_rebuild_le_1s": result["warm_rebuild_s"] <= 1.0,
        "boot_le_6s": result["boot_to_ready_s"] <= 6.0,
        "tiny_10x_smaller": (result.get("size_ratio_vs_debootstrap", 0) >= 10),
    }
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
