"""The collector's interface pass: one rtnetlink link dump
(megafleet/collect/linkstats.py, what the interface sampler reads now)
against reading the same counters and kinds from sysfs (what it read before
2026-12-07, kept here as the reference). Prints one JSON line.

In a scratch network namespace with a sysfs of its own (a private mount
namespace: nothing of it reaches the host, and it all goes when this process
ends), N veth pairs (2,500; --quick 250: twice as many links). Each round
times one pass of each way in CPU seconds of this process (user + system):

  reference   for every link in /sys/class/net: its kind as the sampler told
              it (bridge/ directory, tun_flags, uevent DEVTYPE, iflink
              against ifindex) and its eight counters, one file each
  dump        linkstats.read_links(): kinds and counters of every link

Keys: links, rounds, reference_pass_ms and dump_pass_ms (medians of the
rounds, CPU ms per pass), dump_vs_reference (ratio of the medians, lower is
better), reference_dentries and dump_dentries (dentries the dcache gained
over the first pass of each, /proc/sys/fs/dentry-state: on the host's sysfs,
which is never unmounted, the sysfs reads' dentries and inodes outlive the
interfaces until memory pressure prunes them; the dump leaves none).

Run as root:
    .venv/bin/python bench/linkstats.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from megafleet.collect.linkstats import read_links  # noqa: E402
from megafleet.collect.samplers import COUNTERS  # noqa: E402

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_PRIVATE = 16384, 1 << 18
libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def scratch_namespace() -> None:
    """This process into a new network namespace, with that namespace's sysfs
    on /sys in a private mount namespace."""
    _check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
    _check(libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "mount --make-rprivate /")
    _check(libc.mount(b"sysfs", b"/sys", b"sysfs", ctypes.c_ulong(0), None), "mount sysfs")


def sysfs_kind(base: Path) -> str:
    """An interface's kind from sysfs, as the interface sampler told it before."""
    if (base / "bridge").is_dir():
        return "bridge"
    if (base / "tun_flags").exists():
        return "tap" if int((base / "tun_flags").read_text().strip(), 16) & 0x2 else "tun"
    for line in (base / "uevent").read_text().splitlines():
        if line.startswith("DEVTYPE="):
            return line.split("=", 1)[1]
    virtual = "/virtual/" in os.readlink(base)
    if virtual and (base / "iflink").read_text().strip() != (base / "ifindex").read_text().strip():
        return "veth"
    return "other"


def sysfs_pass(sys_net: Path = Path("/sys/class/net")) -> int:
    """One pass the old way: kinds and counters of every interface; how many."""
    n = 0
    for name in sorted(os.listdir(sys_net)):
        sysfs_kind(sys_net / name)
        for stat in COUNTERS:
            with open(sys_net / name / "statistics" / stat, "rb") as f:
                int(f.read())
        n += 1
    return n


def dentries() -> int:
    return int(Path("/proc/sys/fs/dentry-state").read_text().split()[0])


def timed(fn) -> tuple[float, int]:
    """(CPU ms of this process, dentries gained) over one call of fn."""
    d0, t0 = dentries(), time.process_time()
    fn()
    return (time.process_time() - t0) * 1000, dentries() - d0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2500, help="veth pairs to make (default 2,500)")
    ap.add_argument("--rounds", type=int, default=3, help="passes of each way (default 3)")
    ap.add_argument("--quick", action="store_true", help="250 pairs")
    args = ap.parse_args()
    pairs = 250 if args.quick else args.pairs
    scratch_namespace()
    batch = "".join(f"link add mfls{i} type veth peer name mflp{i}\n" for i in range(pairs))
    subprocess.run(["ip", "-batch", "-"], input=batch.encode(), check=True)
    # The first pass of each, on a cold dcache: the dentries each leaves.
    _, dump_dentries = timed(read_links)
    _, reference_dentries = timed(sysfs_pass)
    links = len(read_links())
    if sysfs_pass() != links:
        raise SystemExit("linkstats bench: sysfs and the dump see different links")
    reference, dump = [], []
    for _ in range(args.rounds):
        reference.append(timed(sysfs_pass))
        dump.append(timed(read_links))
    ref_ms = statistics.median(ms for ms, _ in reference)
    dump_ms = statistics.median(ms for ms, _ in dump)
    print(json.dumps({"links": links, "rounds": args.rounds,
                      "reference_pass_ms": round(ref_ms, 1), "dump_pass_ms": round(dump_ms, 1),
                      "dump_vs_reference": round(dump_ms / ref_ms, 4),
                      "reference_dentries": reference_dentries, "dump_dentries": dump_dentries}))


if __name__ == "__main__":
    main()
