"""Guest kernel benchmark: megafleet's minimal kernel (imagegen `kernel.build =
"minimal"`, examples/images/tiny-minimal.toml) against Debian's cloud kernel
(examples/images/tiny.toml), same initramfs contents, same QEMU command line
(`megafleet vm boot --driver qemu`), measured in the same run. Prints one JSON line:

    kernel_build_s            building tiny-minimal (0 when cached; a first build
                              compiles the kernel: minutes)
    cloud_/minimal_boot_cpu_s QEMU process CPU from start to the ready line
                              (mean over --count guests each): what a boot storm
                              costs the host's CPUs
    cloud_/minimal_boot_s     wall time from start to ready (p50 of the engine's report)
    cloud_/minimal_rss_mb     QEMU process RSS once ready (mean)
    cloud_/minimal_idle_pct   idle CPU of one guest, % of a core, over --idle-seconds
                              (mean), both sets measured over the same window
    cloud_/minimal_bzimage_kb kernel image size
    boot_cpu_ratio, rss_ratio, idle_ratio   minimal / cloud (< 1: the minimal
                              kernel costs less)

Under TCG (this machine: /dev/kvm is PVM, an ordinary kernel needs TCG) the boot
CPU is what limits how many QEMU guests come up per minute (issue 12: 200 in
<= 600 s). Both sets boot one after the other, each with the host otherwise
as the run found it (`load_before`).

Run as root:  .venv/bin/python bench/kernel.py [--count 4] [--idle-seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
IMAGES = {"cloud": REPO / "examples/images/tiny.toml", "minimal": REPO / "examples/images/tiny-minimal.toml"}


class BenchError(RuntimeError):
    pass


def megafleet(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", "megafleet", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"megafleet {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def boot_set(label: str, image: str, count: int, mem: int) -> dict:
    """Boot `count` guests of `image`; their boot CPU, boot wall time, RSS, pids."""
    from megafleet.vm.idlecpu import cpu_seconds

    prefix = f"mfbk{label[0]}"
    report = json.loads(megafleet("vm", "boot", "--image", image, "--count", str(count), "--driver", "qemu",
                                  "--prefix", prefix, "--mem", str(mem), "--timeout", "300", "--json").stdout)
    if report.get("ready") != count:
        raise BenchError(f"{label}: {report.get('ready')} of {count} ready: {report.get('guests', [])[:1]}")
    views = json.loads(megafleet("vm", "ls", f"{prefix}*", "--json").stdout)
    pids = [v["pid"] for v in views]
    return {"prefix": prefix, "pids": pids, "boot_s": report.get("boot_p50_s"),
            "boot_cpu_s": statistics.mean(cpu_seconds(p) for p in pids),
            "rss_mb": statistics.mean(rss_mb(p) for p in pids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4, help="guests of each kernel (default 4)")
    parser.add_argument("--mem", type=int, default=96, help="guest RAM in MiB (default 96, the cloud kernel's least)")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/kernel.py needs root (QEMU guests, taps)")
    from megafleet.imagegen import store
    from megafleet.vm.idlecpu import cpu_seconds

    out: dict = {"bench": "kernel", "count": args.count, "mem_mb": args.mem,
                 "load_before": os.getloadavg()[0]}
    t0 = time.monotonic()
    megafleet("image", "build", str(IMAGES["minimal"]))
    out["kernel_build_s"] = round(time.monotonic() - t0, 1)
    megafleet("image", "build", str(IMAGES["cloud"]))
    sets = {}
    try:
        for label in ("cloud", "minimal"):
            image = store.find(f"tiny-minimal" if label == "minimal" else "tiny")
            out[f"{label}_bzimage_kb"] = round(image.kernel.stat().st_size / 1024)
            sets[label] = boot_set(label, image.hash, args.count, args.mem)
        time.sleep(5)           # both sets settled after their boots
        before = {label: [cpu_seconds(p) for p in s["pids"]] for label, s in sets.items()}
        time.sleep(args.idle_seconds)
        for label, s in sets.items():
            used = [cpu_seconds(p) - b for p, b in zip(s["pids"], before[label])]
            out[f"{label}_idle_pct"] = round(100 * statistics.mean(used) / args.idle_seconds, 3)
            out[f"{label}_boot_cpu_s"] = round(s["boot_cpu_s"], 3)
            out[f"{label}_boot_s"] = s["boot_s"]
            out[f"{label}_rss_mb"] = round(s["rss_mb"], 1)
    finally:
        for s in sets.values():
            subprocess.run([PYTHON, "-m", "megafleet", "vm", "teardown", f"{s['prefix']}*"], cwd=REPO,
                           capture_output=True)
    out["boot_cpu_ratio"] = round(out["minimal_boot_cpu_s"] / out["cloud_boot_cpu_s"], 3)
    out["rss_ratio"] = round(out["minimal_rss_mb"] / out["cloud_rss_mb"], 3)
    out["idle_ratio"] = round(out["minimal_idle_pct"] / max(out["cloud_idle_pct"], 1e-6), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
