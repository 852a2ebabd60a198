"""Density benchmark, QEMU part: prints one JSON line (bench/density.py merges
the dict `run(args)` returns with the container and router parts).

    idle_cpu_ratio_qemu     CPU of an idle guest's QEMU process with the default
                            agent and exec channel, over the same image without
                            (megafleet.agent=0, no exec port), measured together
                            over the same window (megafleet.vm.idlecpu)
    idle_cpu_pct_agent/bare the two, in % of one core
    qemu_n                  QEMU guests asked of `megafleet up`: the most that fit
                            this host's memory budget (--host-mem, default 80 % of
                            RAM) with the memory model placement and admission
                            share (guest RAM x (1 - ksm sharing) + QEMU overhead),
                            at most --count
    qemu_ready              of those, how many printed their ready line
    qemu_up_s               `megafleet up` wall time (compile to all ready)
    qemu_host_mem_used_mb   host memory in use once they are up (MemTotal -
                            MemAvailable), minus the same before `up` (counts
                            whatever else the host started meanwhile)
    qemu_pss_mb             the guests' QEMU processes' proportional set size
                            (KSM-merged pages shared out): their own memory
    ksm_saved_mb            what KSM saves then ((pages_sharing) x page size)
    qemu_down_s             `megafleet down` wall time

Targets (2-core, 24 GiB host): idle_cpu_ratio_qemu <= 1.25; 200 QEMU guests all
ready, within the host's memory, in <= 600 s.

Run as root:  .venv/bin/python bench/density_qemu.py [--count 200] [--quick]
    --quick         10 s idle window and 8 guests (a smoke run)
    --skip-idle / --skip-up   one part only
A run of more than ~50 guests should hold the shared heavy lock:
    flock /tmp/megafleet-heavy.lock .venv/bin/python bench/density_qemu.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GUEST_MEM_MB = 96          # the smallest the Debian kernel boots with (the qemu driver's minimum)
TESTBED = "mfbdq"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This part's options (bench/density.py adds them to its own parser)."""
    parser.add_argument("--count", type=int, default=200, help="QEMU guests at most (default 200)")
    parser.add_argument("--quick", action="store_true", help="10 s idle window, 8 guests")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--host-mem", type=int, default=None,
                        help="memory budget in MB (default: what `up` uses, 80 %% of RAM)")
    parser.add_argument("--ksm-sharing", type=float, default=0.75,
                        help="expected KSM sharing of guest RAM for `up` (default 0.75: a -m 96 "
                             "tiny guest's RAM is all resident, mostly zero or the same kernel "
                             "and initramfs pages as its siblings')")
    parser.add_argument("--boot-timeout", type=float, default=600.0)
    parser.add_argument("--up-limit", type=float, default=900.0,
                        help="cut `up` after this many seconds and report what was ready")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-up", action="store_true")


def _meminfo_used_mb() -> int:
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) // 1024


def _ksm_saved_mb() -> int:
    try:
        sharing = int(Path("/sys/kernel/mm/ksm/pages_sharing").read_text())
    except (OSError, ValueError):
        return 0
    return sharing * os.sysconf("SC_PAGE_SIZE") // (1 << 20)


def _pss_mb(testbed: str) -> int:
    """Proportional memory of the testbed's QEMU processes (/proc/PID/smaps_rollup
    Pss: a page shared by n processes, KSM's merged pages too, counts 1/n in
    each): what the guests take, whatever else the host runs meanwhile."""
    from megafleet.vm.engine import Engine

    total_kb = 0
    for view in Engine().list("*"):
        if not view.pid:
            continue
        try:
            for line in Path(f"/proc/{view.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb // 1024


def fitting_count(count: int, budget_mb: int, ksm_sharing: float) -> int:
    """The most guests of GUEST_MEM_MB (at most `count`) whose footprints fit
    `budget_mb`, by the model placement and admission use."""
    from megafleet.vm.driver import DRIVER_KINDS
    each = DRIVER_KINDS["qemu"].footprint_mb(GUEST_MEM_MB, ksm_sharing)
    # A small host-namespace node shares the LAN (the address the guests get).
    return max(0, min(count, int((budget_mb - 4) // each)))


async def idle_part(seconds: float) -> dict:
    from megafleet.imagegen import store
    from megafleet.vm import idlecpu

    image = await trio.to_thread.run_sync(store.build, REPO / "examples" / "images" / "tiny.toml")
    r = await idlecpu.measure_idle(image, seconds=seconds, settle=10.0, prefix="mfbdq-idle")
    return {"idle_cpu_ratio_qemu": round(r.ratio, 3),
            "idle_cpu_pct_agent": round(r.percent(r.agent_cpu_s), 3),
            "idle_cpu_pct_bare": round(r.percent(r.bare_cpu_s), 3),
            "idle_seconds": round(r.seconds, 1), "idle_accel": r.accel,
            "idle_agent_interval_s": r.agent_interval}


async def up_part(count: int, host_mem: int | None, ksm_sharing: float, boot_timeout: float,
                  work: Path, up_limit: float = 900.0) -> dict:
    from megafleet import up

    budget = host_mem or int(up.local_mem_mb() * 0.8)     # what `up` offers the local host
    n = fitting_count(count, budget, ksm_sharing)
    path = work / f"{TESTBED}.fleet"
    path.write_text(f'image tiny from "{REPO}/examples/images/tiny.toml"\n'
                    "switch lan subnet 10.212.0.0/22\n"          # 1022 addresses
                    f"host probe on lan\n"
                    f"vm q[1..{n}] image tiny mem {GUEST_MEM_MB}M on lan\n")
    out = up.Output(quiet=True)
    used_before = _meminfo_used_mb()
    target = up.Target(host_mem_mb=budget, ksm_sharing=ksm_sharing)
    t = time.monotonic()
    summary: dict = {}
    try:
        # A run longer than `up_limit` is cut (heavy runs stay short on a shared
        # host): what was ready by then is reported, with qemu_up_s null.
        with trio.move_on_after(up_limit):
            summary = (await up.up(path, target, name=TESTBED, out=out, verify=False,
                                   vm_options={"timeout_s": boot_timeout, "retries": 0})).to_json()
        up_s = round(time.monotonic() - t, 1) if summary else None
        if not summary:
            from megafleet.vm.engine import Engine
            summary = {"ready": sum(1 for v in Engine().list("q*") if v.state == "running"),
                       "failed": None, "cut_after_s": up_limit}
        used_after = _meminfo_used_mb()
        saved = _ksm_saved_mb()
        pss = _pss_mb(TESTBED)
    finally:
        t = time.monotonic()
        down = await up.down(TESTBED, None, out)
        down_s = time.monotonic() - t
    failed = summary.get("failed") or []
    return {"qemu_n": n, "qemu_ready": summary.get("ready"), "qemu_failed": len(failed),
            "qemu_first_failure": failed[0] if failed else None,
            "qemu_up_s": up_s, "qemu_cut_after_s": summary.get("cut_after_s"),
            "qemu_host_mem_used_mb": used_after - used_before, "qemu_pss_mb": pss,
            "ksm_saved_mb": saved, "qemu_down_s": round(down_s, 1), "qemu_down_ok": down.ok,
            "qemu_budget_mb": budget, "qemu_ksm_sharing": ksm_sharing, "qemu_mem_mb": GUEST_MEM_MB,
            "qemu_phases": summary.get("phases")}


async def main(args) -> dict:
    result: dict = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2)}
    quick = getattr(args, "quick", False)
    if not getattr(args, "skip_idle", False):
        result.update(await idle_part(10.0 if quick else getattr(args, "idle_seconds", 20.0)))
    if not getattr(args, "skip_up", False):
        count = min(getattr(args, "count", 200), 8) if quick else getattr(args, "count", 200)
        base = Path(tempfile.mkdtemp(prefix="mfbdq-"))
        # Own state and run directories: nothing here touches a user's testbeds.
        for name, env in (("state", "MEGAFLEET_STATE"), ("run", "MEGAFLEET_RUN")):
            (base / name).mkdir()
            os.environ[env] = str(base / name)
        try:
            result.update(await up_part(count, getattr(args, "host_mem", None),
                                        getattr(args, "ksm_sharing", 0.75),
                                        getattr(args, "boot_timeout", 600.0), base,
                                        getattr(args, "up_limit", 900.0)))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    result["load_after"] = round(os.getloadavg()[0], 2)
    result["targets_qemu"] = {"idle_cpu_ratio_qemu": 1.25, "qemu_ready": 200, "qemu_up_s": 600}
    return result


def run(args) -> dict:
    """The QEMU part of the density benchmark as a dict (argparse namespace with
    the options of `add_arguments`; missing ones take their defaults)."""
    return trio.run(main, args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/density_qemu.py needs root (QEMU taps, namespaces)")
    print(json.dumps(run(args)))
