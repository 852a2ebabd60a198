"""Soak of `megafleet up` / `down`: N cycles of examples/campus-ospf.fleet, each
ended a random way, each checked for leftovers and for telemetry's boot count.
Prints one JSON line.

Each cycle picks one ending (seeded, --seed):
    clean         up runs to its end
    sigint-up     SIGINT to `up` at a random moment (as Ctrl-C)
    sigterm-up    SIGTERM to `up` at a random moment
    kill9-up      SIGKILL to `up` at a random moment
    kill9-daemon  SIGKILL to one of the host's own daemons (telemetry collector
                  or KSM daemon, the processes an agent runs for the testbed on
                  its host) at a random moment during or after `up`
The random moment is uniform over the length of the last clean `up`. Then
`megafleet down` (no testbed named: also the sweep) is timed, and checked:

    leftovers     namespaces and links of the testbed, processes of it (in its
                  cgroup, or a megafleet daemon of this run's state directory),
                  its cgroups (v2 and the v1 cpu mirror), ledger rows: any one
                  counts 1 (target 0)
    lost_events   per cycle, guests that reached "running" (`status` before
                  `down`) minus the boot events telemetry stored in that cycle,
                  when positive (target 0); extra_events the other way

JSON keys: cycles, leftovers, down_p95_s, down_max_s, lost_events, extra_events,
endings (count per ending), guests (per cycle), up_s (median clean up), load
(1-minute load average at the start: others' load changes the timings).

Runs as root in its own state and run directories (nothing of a user's
testbeds is touched).
    .venv/bin/python bench/soak.py [--cycles 50] [--staff 60 --lab 40] [--seed 1]
    .venv/bin/python bench/soak.py --quick          (5 cycles of a 20-guest campus)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "examples" / "campus-ospf.fleet"
TESTBED = "mfusoak"
ENDINGS = ["clean", "sigint-up", "sigterm-up", "kill9-up", "kill9-daemon"]


def megafleet(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafleet", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def start_up(defines: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "megafleet", "up", str(FLEET), "-N", TESTBED,
                                 "--telemetry-interval", "1", *defines], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT)


def daemons() -> list[tuple[int, int]]:
    """(pid, start) of this run's host daemons (collector, KSM daemon), from the ledger."""
    from megafleet.ledger import Ledger

    return [(r.data["pid"], r.data["start"]) for r in Ledger().list("up", "process") if "pid" in r.data]


def kill_recorded(pid: int, start: int) -> bool:
    from megafleet.proc import RecordedProcess

    return RecordedProcess(pid, start).signal(signal.SIGKILL)


def running_guests() -> int:
    r = megafleet("status", "--json", timeout=300)
    try:
        hosts = json.loads(r.stdout)["hosts"]
    except (ValueError, KeyError):
        return 0
    return sum(b["nodes"].get("running", 0) for h in hosts.values() if h["status"] == "ok"
               for b in h["value"]["testbeds"] if b["testbed"] == TESTBED)


def boot_events(since: datetime) -> int:
    from megafleet.collect import queries
    from megafleet.collect.stores import open_store

    store = open_store(None)
    try:
        return sum(row["boots"] for row in queries.boot_times(store, since))
    finally:
        store.close()


def leftovers(state: Path) -> list[str]:
    """What is left of the testbed after `down`, as readable lines."""
    from megafleet import cgroup
    from megafleet.ledger import Ledger

    found = []
    try:
        found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(TESTBED + "-")]
    except FileNotFoundError:
        pass
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(TESTBED)]
    group = cgroup.group_name(TESTBED)
    s = cgroup.support()
    for root in (s.v2, s.cpu_v1):
        if root is not None and (root / cgroup.BASE / group).exists():
            found.append(f"cgroup {root / cgroup.BASE / group}")
    marker = f"MEGAFLEET_STATE={state}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cg = Path(f"/proc/{pid}/cgroup").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"/{group}/" in cg or (marker in env.split(b"\0") and int(pid) != os.getpid()):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80]
            found.append(f"process {pid} {cmd.decode(errors='replace')}")
    found += [f"ledger {r.owner}/{r.kind}/{r.key}" for r in Ledger().list()]
    return found


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))] if values else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--staff", type=int, default=60)
    ap.add_argument("--lab", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5 cycles of a campus of 20 guests")
    ap.add_argument("--verbose", action="store_true", help="A line per cycle on stderr.")
    args = ap.parse_args()
    if args.quick:
        args.cycles, args.staff, args.lab = min(args.cycles, 5), 4, 2
    if os.geteuid() != 0:
        sys.exit("soak needs root (namespaces, containers, cgroups)")
    base = Path(tempfile.mkdtemp(prefix="mfusoak-"))
    state, run = base / "state", base / "run"
    os.environ["MEGAFLEET_STATE"], os.environ["MEGAFLEET_RUN"] = str(state), str(run)
    state.mkdir()
    run.mkdir()
    defines = ["-D", f"staff={args.staff}", "-D", f"lab={args.lab}"]
    rng = random.Random(args.seed)
    load = float(open("/proc/loadavg").read().split()[0])
    downs: list[float] = []
    ups: list[float] = []
    guests: list[int] = []
    endings: dict[str, int] = {e: 0 for e in ENDINGS}
    left_total = lost = extra = 0
    details = []
    for cycle in range(args.cycles):
        ending = "clean" if not ups else rng.choice(ENDINGS)
        endings[ending] += 1
        since = datetime.now(timezone.utc)
        log = base / f"up-{cycle}.log"
        t0 = time.monotonic()
        up = start_up(defines, log)
        moment = rng.uniform(0.2, (statistics.median(ups) if ups else 30.0))
        if ending in ("sigint-up", "sigterm-up", "kill9-up"):
            try:
                up.wait(timeout=moment)
            except subprocess.TimeoutExpired:
                up.send_signal({"sigint-up": signal.SIGINT, "sigterm-up": signal.SIGTERM,
                                "kill9-up": signal.SIGKILL}[ending])
        elif ending == "kill9-daemon":
            deadline = time.monotonic() + moment
            while time.monotonic() < deadline and up.poll() is None:
                time.sleep(0.1)
            found = daemons()
            if found:
                kill_recorded(*rng.choice(found))
        try:
            up.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        if ending == "clean" and up.returncode in (0, 1):
            ups.append(time.monotonic() - t0)
        booted = running_guests()
        guests.append(booted)
        # Give the collector one interval to see the last boots before down.
        time.sleep(1.5)
        t1 = time.monotonic()
        down = megafleet("down", "--json", timeout=900)
        downs.append(time.monotonic() - t1)
        counted = boot_events(since)
        left = leftovers(state)
        left_total += len(left)
        lost += max(0, booted - counted)
        extra += max(0, counted - booted)
        row = {"cycle": cycle, "ending": ending, "up_rc": up.returncode, "guests": booted,
               "boot_events": counted, "down_s": round(downs[-1], 2), "down_rc": down.returncode,
               "leftovers": left[:5]}
        details.append(row)
        if args.verbose:
            print(json.dumps(row), file=sys.stderr)
        if left:
            # Clean up for the next cycle, so one failure is counted once.
            megafleet("down", timeout=900)
    (base / "cycles.json").write_text(json.dumps(details, indent=1))
    print(json.dumps({"cycles": args.cycles, "leftovers": left_total, "down_p95_s": round(p95(downs), 2),
                      "down_max_s": round(max(downs), 2) if downs else 0.0, "lost_events": lost,
                      "extra_events": extra, "endings": endings, "guests": guests,
                      "up_s": round(statistics.median(ups), 2) if ups else None,
                      "staff": args.staff, "lab": args.lab, "seed": args.seed, "load": load,
                      "details": str(base / "cycles.json")}))


if __name__ == "__main__":
    main()
