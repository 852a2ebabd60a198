"""KSM regimes compared on a boot storm of identical tiny guests.

For each regime in turn — off, ksmtuned (Debian's, run for real with its
defaults), advisor (the kernel's scan-time advisor, defaults), fixed
(minimega's `optimize ksm`: pages_to_scan=100000, sleep_millisecs=10) and
megafleet (`megafleet ksm run`, told of the boot) — KSM is reset (run=2
unmerges everything), N guests are booted at once, and KSM's saving and ksmd's
CPU time are sampled every second over the same window.

Prints ONE JSON line: {"regimes": {name: {saved_mb_30, saved_mb_60,
saved_mb_120, saved_mb_300, t90_s, ksmd_cpu_s, mb_per_cpu_s, ...}}, "targets":
{...}, ...}. saved_mb_* are at that many seconds after the boot started (the
last sample at or before; the larger marks are absent when --window is
shorter); `true_saved_mb` is what our guests really save at those marks
(anonymous RSS minus PSS: ksmd's counters are only updated while it scans);
t90_s is when the saving first reached 90 % of its value at the end
of the window (null when that value is below 1 MB); `own_saved_mb` counts only
pages of this bench's guests (from /proc/PID/ksm_merging_pages), as a check on
what teammates' guests contributed to the host-wide counters.

Usage: bench/ksm.py [--guests 12] [--window 300] [--mem 128] [--regimes a,b]
Needs root (KSM sysfs) and the tiny image (examples/images/tiny.toml, or
MFK_KERNEL/MFK_INITRAMFS). Original KSM knobs are restored at the end, also on
SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "ksm"))

from ksm_guests import Guests, teardown_leftovers, tiny_image  # noqa: E402

from megafleet.ksm.daemon import send_event  # noqa: E402
from megafleet.ksm.keeper import KnobKeeper  # noqa: E402
from megafleet.ksm.sysfs import PAGE_SIZE, KsmSysfs  # noqa: E402
from megafleet.proc import RecordedProcess, start_time  # noqa: E402

REGIMES = ["off", "ksmtuned", "advisor", "fixed", "megafleet"]
MARKS = [30, 60, 120, 300]
KSMTUNED = "/usr/sbin/ksmtuned"
# The kernel's defaults, to start every regime from the same knobs.
BASE = {"advisor_mode": "none", "pages_to_scan": 100, "sleep_millisecs": 20, "run": 0}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Stop(Exception):
    pass


def _on_signal(signum, frame):
    raise Stop(signal.Signals(signum).name)


def reset(sysfs: KsmSysfs, keeper: KnobKeeper) -> None:
    """Unmerge everything (run=2) so the next regime starts from nothing."""
    if "advisor_mode" in sysfs.read().knobs:
        keeper.apply({"advisor_mode": "none"})
    keeper.apply({"run": 2})
    deadline = time.monotonic() + 60
    while sysfs.read().get("pages_shared") and time.monotonic() < deadline:
        time.sleep(0.5)
    keeper.apply({k: v for k, v in BASE.items() if k in sysfs.read().knobs})


def process_cpu_s(process: RecordedProcess | None) -> float:
    if process is None or not process.alive():
        return 0.0
    try:
        raw = Path(f"/proc/{process.pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Controller:
    """What drives KSM during one regime; started before the boot, stopped after."""

    def __init__(self, name: str, keeper: KnobKeeper, workdir: Path, guests: int):
        self.name, self.keeper, self.workdir, self.guests = name, keeper, workdir, guests
        self.process: RecordedProcess | None = None
        self.popen: subprocess.Popen | None = None
        self.cpu_at_start = 0.0

    def start(self) -> None:
        if self.name == "advisor":
            self.keeper.apply({"advisor_mode": "scan-time", "run": 1})
        elif self.name == "fixed":
            self.keeper.apply({"pages_to_scan": 100000, "sleep_millisecs": 10, "run": 1})
        elif self.name == "ksmtuned":
            # ksmtuned forks its loop and exits; PIDFILE (its own variable) tells
            # us the loop's pid, which is what we record and stop.
            pidfile = self.workdir / "ksmtuned.pid"
            subprocess.run([KSMTUNED], env={**os.environ, "PIDFILE": str(pidfile)},
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=10)
            for _ in range(50):
                if pidfile.exists() and pidfile.read_text().strip():
                    break
                time.sleep(0.1)
            self.process = RecordedProcess.of(int(pidfile.read_text()))
        elif self.name == "megafleet":
            env = {**os.environ, "MEGAFLEET_RUN": str(self.workdir),
                   "MEGAFLEET_STATE": str(self.workdir)}
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "megafleet", "ksm", "run", "--json",
                 "--record", str(self.workdir / "megafleet-trace.jsonl")],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.process = RecordedProcess(self.popen.pid, start_time(self.popen.pid) or 0)
            sock = self.workdir / "ksm.sock"
            for _ in range(100):
                if sock.exists():
                    break
                time.sleep(0.1)
            self.cpu_at_start = process_cpu_s(self.process)

    def before_boot(self) -> None:
        if self.name == "megafleet":
            if not send_event("boot", self.guests, self.workdir / "ksm.sock"):
                raise RuntimeError("megafleet ksm daemon is not listening")

    def own_cpu_s(self) -> float:
        return process_cpu_s(self.process) - self.cpu_at_start

    def stop(self) -> None:
        if self.process is not None:
            kids = [RecordedProcess.of(p) for p in children(self.process.pid)
                    if start_time(p) is not None]
            self.process.stop(grace=15)   # the daemon restores its knobs on SIGTERM
            for kid in kids:              # ksmtuned's pending `sleep 60`
                kid.stop(grace=2)
            if self.popen is not None:
                self.popen.wait(timeout=30)
            self.process = None


def own_merging_pages(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/ksm_merging_pages").read_text())
        except (OSError, ValueError):
            pass
    return total


def true_saved_mb(pids: list[int]) -> float:
    """What KSM really saves on our guests, independent of ksmd's counters
    (which ksmd only updates while it scans): anonymous resident memory minus
    its proportional share, summed over the guests (KSM pages are anonymous
    pages shared between processes; QEMU guests share nothing else anonymous)."""
    kb = 0
    for pid in pids:
        try:
            fields = dict(line.split(":", 1) for line in
                          Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
            kb += int(fields["Anonymous"].split()[0]) - int(fields["Pss_Anon"].split()[0])
        except (OSError, KeyError, ValueError):
            pass
    return round(kb / 1024, 1)


def ksmtuned_free_kb() -> int:
    """Free memory as ksmtuned counts it (MemFree + Buffers + Cached)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) for k in ("MemFree", "Buffers", "Cached"))


HOG = """
import mmap, sys
size = int(sys.argv[1])
# Private anonymous memory, never MADV_MERGEABLE, so KSM does not scan it. Not
# mmap's default MAP_SHARED: shared anonymous memory is shmem, which /proc/meminfo
# counts under Cached - and ksmtuned counts Cached as free.
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, size, 4096):
    m[off] = 1                 # touch every page: resident, not just reserved
print("ready", flush=True)
sys.stdin.read()               # until the bench closes our stdin (or kills us)
"""


def start_hog(guests: int, mem_mb: int) -> tuple[subprocess.Popen, int]:
    """Memory pressure: hold enough memory that, once the guests are up, free
    memory is below ksmtuned's threshold (20 % of MemTotal) - the condition
    under which ksmtuned starts ksmd at all - with headroom left (three quarters of the
    threshold stays free, so nothing is pushed towards the OOM killer)."""
    total_kb = int(Path("/proc/meminfo").read_text().split()[1])
    thres_kb = max(total_kb * 20 // 100, 2048)
    guests_kb = guests * mem_mb * 1024    # measured: a tiny guest touches ~110 of its 128 MB by ready
    hog_kb = ksmtuned_free_kb() - guests_kb - thres_kb * 3 // 4
    if hog_kb <= 0:
        raise RuntimeError("--pressure: free memory is already below ksmtuned's threshold")
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(hog_kb * 1024)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    if hog.stdout.readline().strip() != "ready":
        hog.kill()
        raise RuntimeError("--pressure: the memory hog did not start")
    return hog, hog_kb // 1024


def stop_hog(hog: subprocess.Popen | None) -> None:
    if hog is not None:
        hog.kill()
        hog.wait()


def run_regime(name: str, args, sysfs: KsmSysfs, keeper: KnobKeeper, image) -> dict:
    reset(sysfs, keeper)
    hog, hog_mb = start_hog(args.guests, args.mem) if args.pressure else (None, 0)
    workdir = Path(tempfile.mkdtemp(prefix=f"mfk-bench-{name}-", dir="/tmp"))
    controller = Controller(name, keeper, workdir, args.guests)
    guests = Guests(f"mfk-b{name[:4]}")
    samples = []
    true_saved: dict = {}
    free_after_boot_mb = None
    try:
        controller.start()
        controller.before_boot()
        cpu0 = sysfs.read().ksmd_cpu_s or 0.0
        t0 = time.monotonic()
        guests.boot(args.guests, *image, mem_mb=args.mem)
        pids = [g.process.pid for g in guests.guests]
        ready_at = None
        while True:
            now = time.monotonic() - t0
            snap = sysfs.read()
            own = own_merging_pages(pids)
            if ready_at is None and guests.ready() == args.guests:
                ready_at = now
                free_after_boot_mb = ksmtuned_free_kb() // 1024
            samples.append((now, snap.saved_mb, (snap.ksmd_cpu_s or 0.0) - cpu0, own))
            for mark in MARKS:
                if mark <= args.window and now >= mark and mark not in true_saved:
                    true_saved[mark] = true_saved_mb(pids)
            if now >= args.window:
                true_saved["end"] = true_saved_mb(pids)
                break
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - now)))
        alive = len(guests.alive())
        for guest, why in guests.dead().items():
            log(f"{guest} died during the run: {why}")
        own_cpu = controller.own_cpu_s()
    finally:
        controller.stop()
        guests.stop()
        stop_hog(hog)
        trace = workdir / "megafleet-trace.jsonl"
        if args.keep_trace and trace.exists():
            trace.replace(args.keep_trace)
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()
    result = summarise(samples, args.window)
    result.update(guests_ready_s=None if ready_at is None else round(ready_at, 1),
                  guests_alive_at_end=alive, controller_cpu_s=round(own_cpu, 2),
                  true_saved_mb={str(k): v for k, v in true_saved.items()})
    if args.pressure:
        result.update(hog_mb=hog_mb, free_after_boot_mb=free_after_boot_mb)
    log(f"{name}: {json.dumps(result)}")
    return result


def summarise(samples: list[tuple[float, float, float, int]], window: float) -> dict:
    def at(mark: float) -> tuple[float, float, float, int]:
        before = [s for s in samples if s[0] <= mark]
        return before[-1] if before else samples[0]

    end = at(window)
    result = {}
    for mark in MARKS:
        if mark <= window:
            result[f"saved_mb_{mark}"] = round(at(mark)[1], 1)
    final = end[1]
    t90 = None
    if final >= 1.0:
        t90 = round(next(s[0] for s in samples if s[1] >= 0.9 * final), 1)
    cpu = end[2]
    # own guests: pages merged minus one copy per guest-set is unknowable per
    # process; report merged pages of our guests (an upper bound of their saving)
    result.update(t90_s=t90, ksmd_cpu_s=round(cpu, 2),
                  mb_per_cpu_s=round(final / cpu, 1) if cpu > 0.05 else None,
                  own_merging_mb=round(end[3] * PAGE_SIZE / 2**20, 1),
                  saved_mb_end=round(final, 1))
    return result


def targets(regimes: dict) -> dict:
    mf = regimes.get("megafleet")
    if not mf:
        return {}
    others = {k: v for k, v in regimes.items() if k != "megafleet"}
    end = f"saved_mb_{max(m for m in MARKS if f'saved_mb_{m}' in mf)}"
    best = max(others.items(), key=lambda kv: kv[1].get(end, 0), default=None)
    out = {}
    if best:
        out["saving_vs_best"] = {"best": best[0], "ratio": round(mf[end] / best[1][end], 3)
                                 if best[1][end] else None, "met": mf[end] >= best[1][end]}
    tuned = regimes.get("ksmtuned")
    if tuned:
        out["t90_vs_ksmtuned"] = {
            "ratio": round(mf["t90_s"] / tuned["t90_s"], 3) if mf["t90_s"] and tuned["t90_s"] else None,
            "met": (mf["t90_s"] is not None and tuned["t90_s"] is not None
                    and mf["t90_s"] <= tuned["t90_s"] / 2),
            "note": None if tuned["t90_s"] else "ksmtuned saved < 1 MB: no t90 to compare"}
    advisor = regimes.get("advisor")
    if advisor:
        out["cpu_vs_advisor"] = {
            "ratio": round(mf["ksmd_cpu_s"] / advisor["ksmd_cpu_s"], 3) if advisor["ksmd_cpu_s"] else None,
            "met": mf["ksmd_cpu_s"] <= advisor["ksmd_cpu_s"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=12)
    parser.add_argument("--window", type=float, default=300)
    parser.add_argument("--mem", type=int, default=128, help="MB per guest")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--pressure", action="store_true",
                        help="hold memory so that free memory is below ksmtuned's threshold once "
                             "the guests are up (without it, ksmtuned never starts ksmd on a host "
                             "with more than 20%% of its memory free)")
    parser.add_argument("--keep-trace", help="save the megafleet daemon's trace (JSON lines) here")
    args = parser.parse_args()
    chosen = args.regimes.split(",")
    unknown = [r for r in chosen if r not in REGIMES]
    if unknown:
        parser.error(f"--regimes: unknown {unknown}; choose from {REGIMES}")
    if os.geteuid() != 0:
        parser.error("needs root: KSM knobs are written")
    signal.signal(signal.SIGTERM, _on_signal)
    sysfs = KsmSysfs()
    state = Path(tempfile.mkdtemp(prefix="mfk-bench-state-"))
    keeper = KnobKeeper(sysfs, state / "ksm-originals.json")
    image = tiny_image()
    regimes = {}
    started = time.time()
    try:
        for name in chosen:
            log(f"regime {name}: {args.guests} guests, {args.window:.0f} s")
            regimes[name] = run_regime(name, args, sysfs, keeper, image)
    finally:
        reset(sysfs, keeper)
        keeper.restore()
        teardown_leftovers()
        state.rmdir()
    print(json.dumps({"bench": "ksm", "guests": args.guests, "mem_mb": args.mem, "pressure": args.pressure,
                      "window_s": args.window, "wall_s": round(time.time() - started),
                      "regimes": regimes, "targets": targets(regimes),
                      "caveat": "shared 2-CPU host: teammates' tests compete for CPU and "
                                "their QEMU guests add mergeable memory to the host-wide "
                                "KSM counters"}))


if __name__ == "__main__":
    main()
