"""Soak of `megafleet up` / `down`: N cycles of examples/campus-ospf.fleet, each
ended a random way, each checked for leftovers and for telemetry's boot count.
Prints one JSON line.

Each cycle picks one ending (seeded, --seed):
    clean         up runs to its end
    sigint-up     SIGINT to `up` at a random moment (as Ctrl-C)
    sigterm-up    SIGTERM to `up` at a random moment
    kill9-up      SIGKILL to `up` at a random moment
    kill9-daemon  SIGKILL to one of a host's own daemons (telemetry collector
                  or KSM daemon) at a random moment during or after `up`
    kill9-agent   (with --hosts N) SIGKILL to one host's megafleet agent at a
                  random moment during `up`
    sigint-agent  (with --hosts N) SIGINT to one host's megafleet agent at a
                  random moment during `up` (as Ctrl-C on that host)
The random moment is uniform over the length of the last clean `up`. Then
`megafleet down` (no testbed named: also the sweep) is timed, and checked:

    leftovers     namespaces and links of the testbed, processes of it (in its
                  cgroup, or a megafleet daemon of this run's state directory),
                  its cgroups (v2 and the v1 cpu mirror), ledger rows: any one
                  counts 1 (target 0)
    lost_events   per cycle, guests that ran just before `down` (by name, each
                  host's `vm ls`) with no boot event stored in that cycle
                  (target 0); extra_events, boots stored twice (target 0);
                  late_boots, boot events of guests that became ready between
                  that look and `down` (after a kill -9 of `up` its guests go on
                  booting: real boots, not errors)

JSON keys: cycles, leftovers, down_p95_s, down_max_s, lost_events, extra_events, late_boots,
clean_failed (clean cycles whose `up` did not exit 0: then the cycle tested
little), endings (count per ending), guests (per cycle), up_s (median clean
up), load (1-minute load average at the start: others' load changes the
timings), load_end (at the end).

Runs as root in its own state and run directories (nothing of a user's
testbeds is touched). Without --hosts everything runs on this machine (the
embedded default: controller and host in one process, so no agent). With
--hosts N, on N namespace hosts with their own sshd (gproc's test fleet),
each with its own state directory, reached through gproc agents.
    .venv/bin/python bench/soak.py [--cycles 50] [--staff 60 --lab 40] [--seed 1] [--hosts 2]
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
# Where the testbed runs: [] (this machine) or --hosts/--host-state arguments.
TARGET: list[str] = []
HOST_STATES: list[Path] = []          # with --hosts: each host's state directory


def megafleet(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafleet", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def start_up(defines: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "megafleet", "up", str(FLEET), "-N", TESTBED,
                                 "--telemetry-interval", "1", *defines, *TARGET], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT)


def ledgers():
    from megafleet.ledger import Ledger

    return [Ledger()] + [Ledger(d / "ledger.sqlite") for d in HOST_STATES if (d / "ledger.sqlite").exists()]


def daemons() -> list[tuple[int, int]]:
    """(pid, start) of this run's host daemons (collector, KSM daemon), from the ledgers."""
    return [(r.data["pid"], r.data["start"]) for led in ledgers() for r in led.list("up", "process")
            if "pid" in r.data]


def proc_start(pid: int) -> int:
    from megafleet.proc import start_time

    return start_time(pid) or -1


def kill_recorded(pid: int, start: int, sig: int = signal.SIGKILL) -> bool:
    from megafleet.proc import RecordedProcess

    return RecordedProcess(pid, start).signal(sig)


def running_guests() -> set[str]:
    """Names of the testbed's guests that run now, on every host (each host's
    vm state, as `megafleet vm ls` reads it: checked against /proc)."""
    names: set[str] = set()
    for d in [None] + HOST_STATES:
        env = dict(os.environ) if d is None else {**os.environ, "MEGAFLEET_STATE": str(d)}
        r = subprocess.run([sys.executable, "-m", "megafleet", "vm", "ls", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        try:
            names |= {g["name"] for g in json.loads(r.stdout) if g["state"] == "running"}
        except (ValueError, KeyError, TypeError):
            pass
    return names


def boot_events(since: datetime) -> list[str]:
    """The guest of each successful boot event stored since `since` (a name
    twice: one boot stored twice)."""
    from megafleet.collect import queries
    from megafleet.collect.stores import open_store

    uri = next((TARGET[i + 1] for i, a in enumerate(TARGET) if a == "--telemetry"), None)
    store = open_store(uri)
    try:
        return [e["meta"]["guest"] for e in queries.events(store, since, "boot") if e.get("ok")]
    finally:
        store.close()


def _netns_of(fleet, host: str | None) -> list[str]:
    if host is None:
        try:
            return os.listdir("/run/netns")
        except FileNotFoundError:
            return []
    # A host's sshd (and the agents it starts) has a mount namespace of its own.
    out = subprocess.run(["nsenter", "-t", str(fleet.sshd[host].pid), "-m", "ls", "-1", "/run/netns"],
                         capture_output=True, text=True).stdout
    return out.split()


def leftovers(state: Path, fleet=None) -> list[str]:
    """What is left of the testbed after `down`, as readable lines."""
    import hashlib

    from megafleet import cgroup

    found = []
    for host in [None] + (list(fleet.names) if fleet else []):
        found += [f"netns {n}" + (f" on {host}" if host else "") for n in _netns_of(fleet, host)
                  if n.startswith(TESTBED + "-")]
        argv = ["ip", "-o", "link", "show"] if host is None else ["ip", "-n", host, "-o", "link", "show"]
        names = [line.split(":")[1].strip().split("@")[0]
                 for line in subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()
                 if ":" in line]
        found += [f"link {n}" + (f" on {host}" if host else "") for n in names if n.startswith(TESTBED)]
    s = cgroup.support()
    for d in [state] + HOST_STATES:
        group = f"{TESTBED}.{hashlib.sha1(str(d.resolve()).encode()).hexdigest()[:8]}"
        for root in (s.v2, s.cpu_v1):
            if root is not None and (root / cgroup.BASE / group).exists():
                found.append(f"cgroup {root / cgroup.BASE / group}")
    group = f"/{cgroup.BASE}/{TESTBED}."
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
    found += [f"ledger {r.owner}/{r.kind}/{r.key}" for led in ledgers() for r in led.list()
              if r.owner != "gproc-testfleet"]      # the test fleet's own hosts, not the testbed
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
    ap.add_argument("--hosts", type=int, default=0, metavar="N",
                    help="Run on N namespace hosts through gproc agents (adds the kill9-agent and sigint-agent endings).")
    ap.add_argument("--quick", action="store_true", help="5 cycles of a campus of 20 guests")
    ap.add_argument("--endings", default=None, metavar="E1,E2",
                    help=f"Only these endings after the first clean cycle (of {', '.join(ENDINGS)}, "
                         "kill9-agent, sigint-agent).")
    ap.add_argument("--verbose", action="store_true", help="A line per cycle on stderr.")
    args = ap.parse_args()
    if args.quick:
        args.cycles, args.staff, args.lab = min(args.cycles, 5), 4, 2
    if os.geteuid() != 0:
        sys.exit("soak needs root (namespaces, containers, cgroups)")
    if args.endings:
        wanted = {e.strip() for e in args.endings.split(",") if e.strip()}
        known = set(ENDINGS) | ({"kill9-agent", "sigint-agent"} if args.hosts else set())
        if not wanted or wanted - known:
            sys.exit(f"--endings {args.endings}: expected some of {', '.join(sorted(known))}")
    base = Path(tempfile.mkdtemp(prefix="mfusoak-"))
    state, run = base / "state", base / "run"
    os.environ["MEGAFLEET_STATE"], os.environ["MEGAFLEET_RUN"] = str(state), str(run)
    state.mkdir()
    run.mkdir()
    defines = ["-D", f"staff={args.staff}", "-D", f"lab={args.lab}"]
    rng = random.Random(args.seed)
    fleet = None
    endings_used = list(ENDINGS)
    if args.hosts:
        from megafleet.gproc.testfleet import TestFleet

        fleet = TestFleet("mfusk", args.hosts, base / "fleet", subnet="10.149.77.0/24")
        fleet.up()
        # The test fleet's hosts take 10 guests each: room for the whole campus.
        from megafleet.gproc import inventory

        inv = inventory.load(fleet.inventory_path)
        roomy = base / "hosts.toml"
        roomy.write_text(inventory.render([h.__class__(**{**h.__dict__, "capacity": 100_000}) for h in inv.hosts],
                                          identity=inv.identity, known_hosts=inv.known_hosts))
        TARGET.extend(["--hosts", str(roomy), "--host-state", str(base / "h" / "{host}"),
                       "--telemetry", f"sqlite:{base / 'telemetry.sqlite'}"])
        HOST_STATES.extend(base / "h" / h / "state" for h in fleet.names)
        endings_used += ["kill9-agent", "sigint-agent"]
    if args.endings:
        endings_used = [e for e in endings_used if e in wanted]
    try:
        result = soak(args, base, state, defines, rng, fleet, endings_used)
    finally:
        if fleet is not None:
            megafleet("down", *TARGET[:4], timeout=900)
            fleet.down()
    print(json.dumps(result))


def soak(args, base: Path, state: Path, defines: list[str], rng: random.Random, fleet,
         endings_used: list[str]) -> dict:
    load = float(open("/proc/loadavg").read().split()[0])
    downs: list[float] = []
    ups: list[float] = []
    guests: list[int] = []
    endings: dict[str, int] = {e: 0 for e in ["clean", *endings_used]}
    left_total = lost = extra = late = clean_failed = 0
    details = []
    for cycle in range(args.cycles):
        ending = "clean" if not ups else rng.choice(endings_used)
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
        elif ending in ("kill9-agent", "sigint-agent"):
            deadline = time.monotonic() + moment
            while time.monotonic() < deadline and up.poll() is None:
                time.sleep(0.1)
            pid = fleet.agent_pid(rng.randrange(fleet.count))
            if pid is not None:
                kill_recorded(pid, proc_start(pid),
                              signal.SIGKILL if ending == "kill9-agent" else signal.SIGINT)
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
        if ending == "clean" and up.returncode != 0:
            clean_failed += 1       # a failure of its own, not of the ending: a soak of nothing proves nothing
        booted = running_guests()
        guests.append(len(booted))
        # No pause before down: the collector's last look when down stops it
        # must store every boot `status` just counted.
        t1 = time.monotonic()
        down = megafleet("down", "--json", *TARGET[:4], timeout=900)
        downs.append(time.monotonic() - t1)
        events = boot_events(since)
        stored = set(events)
        left = leftovers(state, fleet)
        left_total += len(left)
        lost += len(booted - stored)
        extra += len(events) - len(stored)
        late += len(stored - booted)
        row = {"cycle": cycle, "ending": ending, "up_rc": up.returncode, "guests": len(booted),
               "boot_events": len(events), "lost": sorted(booted - stored)[:5],
               "late": len(stored - booted), "down_s": round(downs[-1], 2), "down_rc": down.returncode,
               "leftovers": left[:5]}
        if up.returncode not in (0, 130, -signal.SIGKILL):
            row["up_said"] = (log.read_text(errors="replace").strip().splitlines() or [""])[-1][:200]
        details.append(row)
        if args.verbose:
            print(json.dumps(row), file=sys.stderr)
        if left:
            # Clean up for the next cycle, so one failure is counted once.
            megafleet("down", *TARGET[:4], timeout=900)
    (base / "cycles.json").write_text(json.dumps(details, indent=1))
    return ({"cycles": args.cycles, "leftovers": left_total, "down_p95_s": round(p95(downs), 2),
                      "down_max_s": round(max(downs), 2) if downs else 0.0, "lost_events": lost,
                      "extra_events": extra, "late_boots": late, "clean_failed": clean_failed, "endings": endings, "guests": guests,
                      "up_s": round(statistics.median(ups), 2) if ups else None,
                      "staff": args.staff, "lab": args.lab, "seed": args.seed, "load": load,
                      "hosts": args.hosts or 1, "details": str(base / "cycles.json"),
                      "load_end": float(open("/proc/loadavg").read().split()[0])})


if __name__ == "__main__":
    main()
