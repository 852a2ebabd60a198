"""Density benchmark: how many guests one host runs, measured the way a user gets
them (`megafleet up` of a description, `megafleet vm boot`). Prints one JSON line.

Parts (--part, repeatable; default: containers, lan1000, bare):

  containers      N container guests (5,000; --quick 300) on switches of 1,000
                  each (one switch of N once bridge trees have landed, see
                  --switch-size) through `megafleet up`, then `megafleet down`:
                    containers_n, containers_ready, containers_up_s, containers_down_s
                  the same N through `megafleet vm boot --driver container` with
                  no network, then `vm teardown`, in the same run:
                    containers_vm_boot_s, containers_up_vs_vm_boot (ratio)
                  ready rate (guests/s) over the first and the last 100 guests
                  of the `up` (from the engine's record of each guest's ready
                  time: 100 / time from the 1st to the 101st ready, and from the
                  last-but-100th to the last), their ratio (last/first), and the
                  same of the vm boot:
                    ready_rate_first100, ready_rate_last100, ready_rate_ratio,
                    vm_boot_ready_rate_ratio
                  with --rounds N, N rounds of both, the medians of these
                  figures, and each round's under containers_rounds
  containers10k   the same through `up` for 10,000 (--quick 600):
                    containers10k_n, containers10k_ready, containers10k_up_s,
                    containers10k_down_s
  lan1000         examples/lan1000.fleet (1,000 containers on one switch and a
                  router; --quick 100): lan1000_up_s, lan1000_down_s,
                  lan1000_ready_rate_ratio
  bare            5,000 bare `unshare` busybox processes in new PID, mount, UTS,
                  IPC and network namespaces, started at once (--quick 300):
                  bare_unshare_s, the floor of any container start
  idle_container  idle CPU of 20 containers with the default settings (telemetry
                  read by the host, counted too) against 20 with the agent
                  disabled, over the same 20 s (--quick 10 s):
                  idle_cpu_ratio_container, idle_cpu_container_default_s,
                  idle_cpu_container_noagent_s
  qemu, routers   bench/density_qemu.py and bench/density_routers.py: their
                  `run(args)` dict is merged in when the part is selected

Conditions: every `up` runs with --no-ksm (the KSM daemon's scan would take a
CPU from the boots that `vm boot`, the reference, does not pay). Before each
timed step the bench waits until the kernel has finished destroying the
network namespaces of the previous one (rtnetlink answers a link dump within
50 ms and the host is idle, three seconds running): namespace teardown runs
in the kernel after the processes are gone, holds the rtnl lock every guest's
start needs, and its kworkers take CPU for a minute or more after that.
`settle_s` reports that wait per step. `load_before` is the 1-minute load
average at the start: a figure measured while others load the machine must
say so.

Targets (2-core host): containers_up_s <= 30, containers_down_s <= 15,
containers_up_vs_vm_boot <= 1.2, ready_rate_ratio >= 0.8, lan1000_up_s <= 10,
10,000 containers up.

Run as root, under the shared lock for full sizes:
    flock /tmp/megafleet-heavy.lock .venv/bin/python bench/density.py
    .venv/bin/python bench/density.py --quick --part containers
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PYTHON = sys.executable
TINY = REPO / "examples" / "images" / "tiny.toml"
LAN1000 = REPO / "examples" / "lan1000.fleet"
DEFAULT_PARTS = ("containers", "lan1000", "bare")
ALL_PARTS = ("containers", "containers10k", "lan1000", "bare", "idle_container", "qemu", "routers")
EXTERNAL = {"qemu": "density_qemu", "routers": "density_routers"}
BIG_HOST_MEM = 10_000_000  # MB for placement: containers are not what limits memory here


class BenchError(RuntimeError):
    pass


# --- running megafleet --------------------------------------------------------------

@dataclass
class Timed:
    seconds: float
    stdout: str
    stderr: str
    returncode: int


def megafleet(*args: str, timeout: float = 1800) -> Timed:
    """`megafleet ARGS` as a user runs it (own process), timed by wall clock."""
    t = time.monotonic()
    proc = subprocess.run([PYTHON, "-m", "megafleet", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return Timed(time.monotonic() - t, proc.stdout, proc.stderr, proc.returncode)


def _json_out(run: Timed, what: str) -> dict:
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"{what}: exit {run.returncode}, no JSON: {run.stderr.strip()[-2000:]}") from None


def _busy_cpus(seconds: float) -> float:
    """CPUs' worth of time not idle on the host over the next `seconds` (from
    /proc/stat; waiting for I/O counts as busy: the guests' directories are on
    a disk here, and the removal of thousands of them keeps it busy)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return sum(values), values[3]
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    share = 1 - (idle1 - idle0) / max(1, total1 - total0)
    return share * (os.cpu_count() or 1)


def settle(timeout: float = 300.0, busy_max: float = 0.3) -> float:
    """Wait until the kernel's namespace teardown of earlier steps is over:
    a link dump (which needs the rtnl lock) answers within 50 ms and the host
    is idle (under `busy_max` CPUs busy or waiting for the disk over a second:
    the teardown's kworkers run for a minute or more after rtnl answers again,
    and would take CPU from the step that follows), three times in a row, after
    a sync. Returns the seconds waited."""
    t0 = time.monotonic()
    os.sync()       # what the step before left to write, written now
    calm = 0
    while calm < 3 and time.monotonic() - t0 < timeout:
        t = time.monotonic()
        socket.if_nameindex()
        fast = time.monotonic() - t < 0.05
        calm = calm + 1 if fast and _busy_cpus(1.0) < busy_max else 0
    return round(time.monotonic() - t0, 1)


def ready_rates(prefix: str = "") -> dict:
    """Ready rate (guests/s) over the first and the last 100 guests of a boot,
    from the vm engine's record of the time each guest's ready line was seen
    (its last update): 100 / (time of the 101st ready - time of the 1st), and
    the same over the last 101. The boot's start-up (helpers, image lookup) is
    left out of both alike. With fewer than 202 guests, halves instead of 100."""
    from megafleet.vm.state import VmState

    times = sorted(r.updated for r in VmState().list(prefix + "*") if r.state == "running")
    if len(times) < 4:
        return {}
    k = 100 if len(times) >= 202 else (len(times) - 1) // 2
    first = k / max(1e-3, times[k] - times[0])
    last = k / max(1e-3, times[-1] - times[-k - 1])
    return {"first": round(first, 1), "last": round(last, 1), "ratio": round(last / first, 3), "k": k}


# --- descriptions ----------------------------------------------------------------------

def bridge_trees_landed() -> bool:
    """Has the bridge-tree work (switches over 1,024 ports) been committed here?"""
    try:
        log = subprocess.run(["git", "log", "--oneline", "-i", "-E", "--grep",
                              "bridge[- ]trees?|trees? of bridges"], cwd=REPO,
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(log.strip())


def containers_fleet(n: int, per_switch: int) -> str:
    """N container guests on switches of `per_switch` (the last may be smaller),
    each switch its own /16, guests named a1.., b1.., ... per switch."""
    lines = [f"# bench/density.py: {n} container guests, {per_switch} per switch",
             f'image tiny from "{TINY}"']
    k = 0
    left = n
    while left > 0:
        m = min(per_switch, left)
        letter = "abcdefghijklmnopqrstuvwxyz"[k]
        lines.append(f"switch s{letter} subnet 10.{100 + k}.0.0/16")
        lines.append(f"vm {letter}[1..{m}] image tiny driver container mem 64M on s{letter}")
        left -= m
        k += 1
    return "\n".join(lines) + "\n"


# --- parts ---------------------------------------------------------------------------------

def up_down(path: Path, name: str, extra: tuple[str, ...] = ()) -> dict:
    """`megafleet up` then `megafleet down` of one description (timed)."""
    result: dict = {"settle_up_s": settle()}
    up = megafleet("up", str(path), "-N", name, "--no-ksm", "--json", "--host-mem", str(BIG_HOST_MEM), *extra)
    summary = _json_out(up, f"up {path.name}")
    failed = summary.get("failed") or []
    result.update(up_s=round(up.seconds, 2), ready=summary.get("ready"), failed=len(failed),
                  failed_reason=failed[0].get("reason") if failed else None,
                  phases=summary.get("phases"), rates=ready_rates())
    down = megafleet("down", name, "--json")
    result["down_s"] = round(down.seconds, 2)
    result["down_ok"] = _json_out(down, f"down {name}").get("ok")
    return result


def part_containers(args, n: int, key: str, with_reference: bool) -> dict:
    per_switch = args.switch_size or (n if bridge_trees_landed() else 1000)
    out: dict = {f"{key}_n": n, f"{key}_per_switch": min(per_switch, n)}
    with tempfile.TemporaryDirectory(prefix="mfbd-") as tmp:
        path = Path(tmp) / f"{key}.fleet"
        path.write_text(containers_fleet(n, per_switch))
        if with_reference:
            settled = settle()
            boot = megafleet("vm", "boot", "--image", "tiny", "--count", str(n), "--driver", "container",
                             "--prefix", "mfbdv", "--json", "--mem", "64")
            report = _json_out(boot, "vm boot")
            rates = ready_rates("mfbdv")
            teardown = megafleet("vm", "teardown", "mfbdv*")
            if report.get("ready") != n:
                raise BenchError(f"vm boot: {report.get('ready')} of {n} ready")
            out.update({"containers_vm_boot_s": round(boot.seconds, 2),
                        "containers_vm_teardown_s": round(teardown.seconds, 2),
                        "vm_boot_ready_rate_first100": rates.get("first"),
                        "vm_boot_ready_rate_last100": rates.get("last"),
                        "vm_boot_ready_rate_ratio": rates.get("ratio"),
                        "settle_vm_boot_s": settled})
        r = up_down(path, "mfbd" + ("x" if key != "containers" else "c"))
    out.update({f"{key}_complete": r["ready"] == n,
                f"{key}_ready": r["ready"], f"{key}_failed": r["failed"], f"{key}_up_s": r["up_s"],
                f"{key}_down_s": r["down_s"],
                f"{key}_down_ok": r["down_ok"], f"settle_{key}_up_s": r["settle_up_s"],
                f"{key}_phases": r["phases"]})
    if r["failed_reason"]:
        out[f"{key}_failed_reason"] = r["failed_reason"][:300]
    if key == "containers":
        out.update(ready_rate_first100=r["rates"].get("first"), ready_rate_last100=r["rates"].get("last"),
                   ready_rate_ratio=r["rates"].get("ratio"))
        # A ratio only of two complete boots (an interrupted or partly failed
        # `up` would look faster than it is).
        if "containers_vm_boot_s" in out and r["ready"] == n:
            out["containers_up_vs_vm_boot"] = round(r["up_s"] / out["containers_vm_boot_s"], 3)
    return out


def part_lan1000(args) -> dict:
    n = 100 if args.quick else 1000
    r = up_down(LAN1000, "mfbdl", ("-D", f"guests={n}"))
    return {"lan1000_n": n, "lan1000_ready": r["ready"], "lan1000_failed": r["failed"],
            "lan1000_failed_reason": (r["failed_reason"] or "")[:300] or None, "lan1000_up_s": r["up_s"],
            "lan1000_down_s": r["down_s"], "lan1000_ready_rate_ratio": r["rates"].get("ratio"),
            "lan1000_phases": r["phases"], "settle_lan1000_up_s": r["settle_up_s"]}


def part_bare(args) -> dict:
    """N `unshare` processes, each a busybox `sleep` in new PID, mount, UTS, IPC
    and network namespaces, started at once; timed until every one has exec'd
    busybox. Killed and reaped afterwards (not timed)."""
    n = 300 if args.quick else 5000
    busybox = shutil.which("busybox")
    if busybox is None:
        raise BenchError("bare: no busybox on this host")
    settled = settle()
    procs: list[subprocess.Popen] = []
    t = time.monotonic()
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(
                ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "--kill-child",
                 busybox, "sleep", "3600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        pending = {p.pid for p in procs}
        deadline = time.monotonic() + 600
        while pending and time.monotonic() < deadline:
            for pid in list(pending):
                try:
                    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                    if kids and Path(f"/proc/{kids[0]}/exe").resolve() == Path(busybox).resolve():
                        pending.discard(pid)
                except OSError:
                    pass
            time.sleep(0.02)
        seconds = time.monotonic() - t
        if pending:
            raise BenchError(f"bare: {len(pending)} of {n} unshare processes never ran busybox")
    finally:
        for p in procs:
            p.kill()          # --kill-child takes the sleep with it
        for p in procs:
            p.wait()
    return {"bare_unshare_n": n, "bare_unshare_s": round(seconds, 2), "settle_bare_s": settled}


def part_idle_container(args) -> dict:
    """The container half of idle_cpu_ratio_*: see tests/vm/test_container_host.py."""
    import threading

    import trio

    from megafleet.collect.containers import ContainerSampler
    from megafleet.collect.sources import vm_container_source
    from megafleet.imagegen.contract import GuestConfig
    from megafleet.vm.engine import Engine
    from megafleet.vm.spec import GuestSpec

    n, window = 20, (10.0 if args.quick else 20.0)
    tick = 1 / os.sysconf("SC_CLK_TCK")
    specs = ([GuestSpec(name=f"mfbdi{i}", image="tiny", driver="container") for i in range(n)]
             + [GuestSpec(name=f"mfbdn{i}", image="tiny", driver="container",
                          config=GuestConfig(name=f"mfbdn{i}", agent_interval=0)) for i in range(n)])
    engine = Engine(timeout_s=120)

    def tree_ticks(pid: int) -> int:
        total, stack = 0, [pid]
        while stack:
            p = stack.pop()
            try:
                f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += sum(int(x) for x in f[11:15])
                stack += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
            except OSError:
                continue
        return total

    try:
        report = trio.run(lambda: engine.apply(specs))
        if len(report.ready) != 2 * n:
            raise BenchError(f"idle: {len(report.ready)} of {2 * n} containers ready")
        time.sleep(2)
        pids = {v.name: v.pid for v in engine.list("mfbd[in]*")}
        sampler = ContainerSampler("bench", vm_container_source(engine, "mfbdi*"), interval=5.0)
        stop, cpu = threading.Event(), [0.0]

        def loop() -> None:
            while not stop.is_set():
                t = time.thread_time()
                sampler.sample(int(time.time() * 1000))
                cpu[0] += time.thread_time() - t
                stop.wait(5.0)

        before = {k: tree_ticks(p) for k, p in pids.items()}
        thread = threading.Thread(target=loop)
        thread.start()
        time.sleep(window)
        stop.set()
        thread.join()
        used = {k: (tree_ticks(p) - before[k]) * tick for k, p in pids.items()}
    finally:
        trio.run(lambda: engine.teardown("mfbd[in]*"))
    default = sum(v for k, v in used.items() if k.startswith("mfbdi")) + cpu[0]
    quiet = sum(v for k, v in used.items() if k.startswith("mfbdn"))
    floor = n * tick  # the clock-tick resolution of n processes' counters
    return {"idle_cpu_ratio_container": round(default / max(quiet, floor), 3),
            "idle_cpu_container_default_s": round(default, 3),
            "idle_cpu_container_noagent_s": round(quiet, 3),
            "idle_cpu_container_sampler_s": round(cpu[0], 3),
            "idle_cpu_container_n": n, "idle_cpu_container_window_s": window}


def part_external(part: str, args) -> dict:
    module = EXTERNAL[part]
    path = Path(__file__).with_name(module + ".py")
    if not path.exists():
        return {f"{part}_error": f"bench/{module}.py is not there"}
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ns = argparse.Namespace(quick=args.quick, **({"routers": 40} if args.quick and part == "routers" else {}))
    return mod.run(ns)


# --- main -----------------------------------------------------------------------------------

# The figures of a round that --rounds reports as medians (each round's are kept).
ROUND_KEYS = ("containers_vm_boot_s", "containers_up_s", "containers_up_vs_vm_boot", "containers_down_s",
              "ready_rate_ratio", "ready_rate_first100", "ready_rate_last100", "vm_boot_ready_rate_ratio")


def medians(rounds: list[dict]) -> dict:
    """One round's dict as is; of several, the last round's with the
    ROUND_KEYS replaced by their medians over the rounds, and every round's
    figures under `containers_rounds`. A ratio is the median of the rounds'
    ratios (each measured against its own reference), not a ratio of medians."""
    if len(rounds) == 1:
        return rounds[0]
    out = dict(rounds[-1])
    for key in ROUND_KEYS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 3)
    out["containers_rounds"] = [{k: r.get(k) for k in ROUND_KEYS} for r in rounds]
    return out


def run(args) -> dict:
    result: dict = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2),
                    "quick": args.quick, "parts": list(args.parts)}
    base = Path(tempfile.mkdtemp(prefix="mfbd-"))
    # Own state and run directories: nothing here touches a user's testbeds.
    for name, env in (("state", "MEGAFLEET_STATE"), ("run", "MEGAFLEET_RUN")):
        (base / name).mkdir()
        os.environ[env] = str(base / name)
    try:
        build = megafleet("image", "build", str(TINY))
        if build.returncode != 0:
            raise BenchError(f"image build: {build.stderr.strip()[-2000:]}")
        for part in args.parts:
            try:
                if part == "containers":
                    rounds = [part_containers(args, 300 if args.quick else 5000, "containers", True)
                              for _ in range(args.rounds)]
                    result.update(medians(rounds))
                elif part == "containers10k":
                    result.update(part_containers(args, 600 if args.quick else 10000, "containers10k", False))
                elif part == "lan1000":
                    result.update(part_lan1000(args))
                elif part == "bare":
                    result.update(part_bare(args))
                elif part == "idle_container":
                    result.update(part_idle_container(args))
                else:
                    result.update(part_external(part, args))
            except (BenchError, subprocess.TimeoutExpired) as exc:
                result[f"{part}_error"] = str(exc)
                # Whatever the failed step left up goes before the next part.
                megafleet("down", "--json")
                megafleet("vm", "teardown")
    finally:
        megafleet("down", "--json")
        megafleet("vm", "teardown")
        shutil.rmtree(base, ignore_errors=True)
    result["load_after"] = round(os.getloadavg()[0], 2)
    result["targets"] = {"containers_up_s": 30, "containers_down_s": 15, "containers_up_vs_vm_boot": 1.2,
                         "ready_rate_ratio": 0.8, "lan1000_up_s": 10}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", dest="parts", action="append", choices=ALL_PARTS,
                        help=f"part to run (repeatable; default: {', '.join(DEFAULT_PARTS)})")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="containers part: N rounds of `vm boot` then `up`, medians reported (default 1)")
    parser.add_argument("--switch-size", type=int, default=None,
                        help="guests per switch for the container parts (default 1,000, or all on "
                             "one switch once bridge trees are in the git log)")
    args = parser.parse_args()
    args.parts = args.parts or list(DEFAULT_PARTS)
    if os.geteuid() != 0:
        sys.exit("bench/density.py needs root (namespaces, containers)")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
