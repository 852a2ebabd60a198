"""Starting the routing daemons of namespace routers, with admission control.

Each router of a plan (`Plan.frr`: router -> daemon -> configuration text) runs
either FRR (zebra first, then ospfd/ospf6d/bgpd, which connect to zebra's
socket) or BIRD (one `bird` process, when the daemons are {"bird": ...}; see
bird.py). Daemons detach (`-d` / BIRD's default) and write a pid file, which is
recorded in the ledger (owner "net", key TESTBED/frr/ROUTER/DAEMON) after the
key was recorded before the start, so `down` finds them after any crash.

Why admission control: starting hundreds of routers at once used to end in a
storm: every started router sends hellos and floods LSAs while the next ones
are still being started, a start (fork, exec, configuration read) then takes
seconds instead of milliseconds, and at ~1,500 FRR daemons the host saturated
before the last one had started. Here:

- at most `Admission.window` routers are starting at once (a router is "up"
  when each of its daemons has written its pid file and FRR's zebra or BIRD
  has opened its control socket); the next starts when one is up;
- no new router starts while the host's runnable threads (`procs_running` in
  /proc/stat, which includes the daemons already up) exceed
  `Admission.runnable_per_cpu` x CPUs: the starts wait for the routing work
  they caused to drain instead of adding to it. On a busy host this starts
  routers nearly one by one, which is what converges best: each new router
  learns the whole database from a neighbour and installs each route about
  once, where routers started together churn their routes while the database
  fills in, and every route change takes the kernel's one rtnl lock (750
  BIRD routers started within 13 s put ~600 of them in D state on it; started
  one by one in 77 s, the load average stayed under 30 and the mesh converged
  as soon as the last one was up);
- progress: a line every `progress_s` seconds ("routers: 312/750 up, 8
  starting, 3 runnable, 41.2 s") and one at the end.
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trio

from megafleet import cgroup, proc
from megafleet.ledger import Ledger
from megafleet.netlang.live import LiveError

Progress = Callable[[str], None]
FRR_BIN = Path("/usr/lib/frr")
BIRD_BIN = "bird"


class RouterStartError(LiveError):
    """A router's daemon did not start (the message names router and daemon)."""


@dataclass(frozen=True)
class Admission:
    """How many routers start at once (`window`) and under what load: no start
    while more than `runnable_per_cpu` x CPUs threads are runnable.
    `progress_s`: seconds between progress lines."""

    window: int = 0                  # 0: 2 x CPUs
    runnable_per_cpu: float = 2.0
    progress_s: float = 5.0

    def slots(self) -> int:
        return self.window or 2 * (os.cpu_count() or 1)


@dataclass
class StartReport:
    """What `start` did: routers started, seconds, the most runnable threads
    seen, and seconds spent waiting for the load to drain."""

    routers: int = 0
    daemons: int = 0
    seconds: float = 0.0
    max_runnable: int = 0
    waited_s: float = 0.0


def runnable() -> int:
    """Threads runnable right now on this host (procs_running of /proc/stat)."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"procs_running "):
                return int(line.split()[1])
    return 0


def daemon_keys(testbed: str, router: str, daemons: dict[str, str]) -> list[str]:
    """Ledger keys of one router's daemons, in start order (zebra first)."""
    order = ["zebra"] + sorted(d for d in daemons if d != "zebra") if "zebra" in daemons else sorted(daemons)
    return [f"{testbed}/frr/{router}/{d}" for d in order]


async def start(p, ledger: Ledger, progress: Progress, admission: Admission | None = None) -> StartReport:
    """Start the daemons of every namespace router in `p.frr` (a netlang.live
    Plan: name, netns, frr), at most `admission.slots()` routers at once and
    only while the host's runnable load allows (see the module text). Raises
    RouterStartError naming the router and daemon when one does not start;
    the routers started so far stay recorded for `down`."""
    from megafleet.netlang.live import OWNER, run_base

    admission = admission or Admission()
    report = StartReport()
    if not p.frr:
        return report
    t0 = time.monotonic()
    base = run_base(p.name) / "frr"
    ledger.record(OWNER, "dir", f"{p.name}/frr", path=str(base))
    # Parents must let the frr and bird users through; each router's directory
    # belongs to the user its daemons run as.
    for d in (base.parent.parent, base.parent, base):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o711)
    # Record before create, all keys in one transaction.
    rows = []
    for router, daemons in p.frr.items():
        for key in daemon_keys(p.name, router, daemons):
            rows.append((key, {"pidfile": str(base / router / (key.rsplit("/", 1)[1] + ".pid"))}))
    ledger.record_many(OWNER, "process", rows)
    total = len(p.frr)
    limit = admission.runnable_per_cpu * (os.cpu_count() or 1)
    slots = trio.CapacityLimiter(admission.slots())
    # One ledger writer thread at a time (sqlite): the starts themselves overlap.
    ledger_lock = trio.Lock()
    state: dict[str, Any] = {"up": 0, "starting": 0, "last": t0}
    failures: list[str] = []

    def say(force: bool = False) -> None:
        now = time.monotonic()
        if force or now - state["last"] >= admission.progress_s:
            state["last"] = now
            progress(f"routers: {state['up']}/{total} up, {state['starting']} starting, "
                     f"{runnable()} runnable, {now - t0:.1f} s")

    async def one(router: str, daemons: dict[str, str]) -> None:
        try:
            pids = await trio.to_thread.run_sync(_start_router, p, router, daemons, base)
            async with ledger_lock:
                await trio.to_thread.run_sync(_record, ledger, OWNER, p.name, router, daemons, base, pids)
            report.daemons += len(pids)
            state["up"] += 1
        except RouterStartError as exc:
            failures.append(str(exc))
        finally:
            state["starting"] -= 1
            slots.release_on_behalf_of(router)

    async with trio.open_nursery() as nursery:
        for router, daemons in p.frr.items():
            if failures:
                break
            await slots.acquire_on_behalf_of(router)
            waited = time.monotonic()
            while True:
                load = runnable()
                report.max_runnable = max(report.max_runnable, load)
                # Let a first router start even on a busy host.
                if load <= limit or state["starting"] == 0:
                    break
                say()
                await trio.sleep(0.05)
            report.waited_s += time.monotonic() - waited
            state["starting"] += 1
            nursery.start_soon(one, router, daemons)
            say()
    report.routers = state["up"]
    report.seconds = time.monotonic() - t0
    if failures:
        raise RouterStartError(f"{len(failures)} router(s) did not start (first: {failures[0]}); "
                               f"{state['up']} of {total} started and stay recorded for 'down'")
    say(force=True)
    return report


def _record(ledger: Ledger, owner: str, testbed: str, router: str, daemons: dict[str, str], base: Path,
            pids: dict[str, proc.RecordedProcess]) -> None:
    for key in daemon_keys(testbed, router, daemons):
        daemon = key.rsplit("/", 1)[1]
        rp = pids[daemon]
        ledger.record(owner, "process", key, pidfile=str(base / router / f"{daemon}.pid"),
                      pid=rp.pid, start=rp.start)


def _user(name: str) -> tuple[int, int]:
    return pwd.getpwnam(name).pw_uid, grp.getgrnam(name).gr_gid


def _wait_for(path: Path, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise RouterStartError(what)
        time.sleep(0.02)


def _pid_of(pidfile: Path, seconds: float, what: str) -> proc.RecordedProcess:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return proc.RecordedProcess.of(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError, ProcessLookupError):
            if time.monotonic() > deadline:
                raise RouterStartError(what) from None
            time.sleep(0.02)


def _start_router(p, router: str, daemons: dict[str, str], base: Path) -> dict[str, proc.RecordedProcess]:
    """Start one router's daemons (blocking; run in a thread). Returns daemon -> process."""
    d = base / router
    ns = p.netns[router]
    if "bird" in daemons:
        return {"bird": _start_bird(ns, router, daemons["bird"], d)}
    return _start_frr(ns, router, daemons, d)


def _write_bird_conf(d: Path, conf_text: str, uid: int, gid: int) -> Path:
    conf = d / "bird.conf"
    # The log file is named here, where the directory is known (bird.py writes
    # what the router does, not where the testbed keeps its files).
    conf.write_text(f'log "{d / "bird.log"}" {{ info, warning, error, fatal, bug }};\n' + conf_text)
    os.chown(conf, uid, gid)
    return conf


def _start_bird(ns: str, router: str, conf_text: str, d: Path) -> proc.RecordedProcess:
    uid, gid = _user("bird")
    d.mkdir(exist_ok=True)
    os.chown(d, uid, gid)
    os.chmod(d, 0o700)
    conf, sock, pidfile = _write_bird_conf(d, conf_text, uid, gid), d / "bird.ctl", d / "bird.pid"
    # BIRD detaches once its configuration is read and the control socket is
    # open; it drops to the bird user keeping the network capabilities it needs.
    result = proc.run(["ip", "netns", "exec", ns, BIRD_BIN, "-c", str(conf), "-s", str(sock),
                       "-P", str(pidfile), "-u", "bird", "-g", "bird"], check=False,
                      **cgroup.popen_kwargs("routers"))   # the testbed's cgroup, if in scope
    if result.returncode != 0:
        raise RouterStartError(f"bird for router {router} did not start: "
                               f"{(result.stderr or result.stdout).strip()[-300:]}")
    rp = _pid_of(pidfile, 10, f"bird for router {router} wrote no pid to {pidfile}; see {d / 'bird.log'}")
    _wait_for(sock, 10, f"bird for router {router} did not open {sock}; see {d / 'bird.log'}")
    return rp


def _start_frr(ns: str, router: str, daemons: dict[str, str], d: Path,
               only: set[str] | None = None) -> dict[str, proc.RecordedProcess]:
    """Start the router's FRR daemons (zebra first), or those of `only` (zebra
    already running)."""
    uid, gid = _user("frr")
    d.mkdir(exist_ok=True)
    os.chown(d, uid, gid)
    os.chmod(d, 0o700)
    out = {}
    for daemon in ["zebra"] + sorted(x for x in daemons if x != "zebra"):
        if only is not None and daemon not in only:
            continue
        conf = d / f"{daemon}.conf"
        conf.write_text(daemons[daemon])
        os.chown(conf, uid, gid)
        pidfile = d / f"{daemon}.pid"
        # -d: the daemon detaches (it is not our child, so nothing is left to
        # reap in a long-lived caller) and writes its pid file, which we record.
        result = proc.run(
            ["ip", "netns", "exec", ns, str(FRR_BIN / daemon), "-d", "-f", str(conf),
             "-i", str(pidfile), "-z", str(d / "zserv.api"), "--vty_socket", str(d),
             "-u", "frr", "-g", "frr", "-P", "0", "--log", f"file:{d / (daemon + '.log')}"],
            check=False, **cgroup.popen_kwargs("routers"))   # the testbed's cgroup, if in scope
        if result.returncode != 0:
            raise RouterStartError(f"{daemon} for router {router} did not start: "
                                   f"{(result.stderr or result.stdout).strip()[-300:]}")
        out[daemon] = _pid_of(pidfile, 10, f"{daemon} for router {router} wrote no pid to {pidfile}")
        if daemon == "zebra":
            # The other daemons connect to zebra's socket: wait for it.
            _wait_for(d / "zserv.api", 10, f"zebra for router {router} did not open "
                                           f"{d / 'zserv.api'}; see {d / 'zebra.log'}")
    return out


def reconfigurable(old: dict[str, str], new: dict[str, str]) -> bool:
    """Whether a running router's daemons can take configuration `new` (daemon
    -> text) in place of `old` without all of them restarting: BIRD both times
    (it reads its configuration again), or FRR both times with zebra's
    configuration unchanged (only the daemons whose configuration changed
    restart; zebra keeps the interfaces and the other daemons' routes)."""
    if set(old) == set(new) == {"bird"}:
        return True
    return "bird" not in old and "bird" not in new and "zebra" in old and old.get("zebra") == new.get("zebra")


def reconfigure(testbed: str, ns: str, router: str, old: dict[str, str], new: dict[str, str],
                ledger: Ledger) -> list[str]:
    """Give a running router its configuration `new` in place (see
    `reconfigurable`, which must hold): BIRD `configure` through its control
    socket (protocols whose settings did not change keep their sessions); FRR:
    the daemons whose configuration changed or went are stopped, the changed
    and new ones started and recorded (keys recorded before the start). Returns
    the daemons reconfigured or restarted. Blocking. Raises RouterStartError."""
    from megafleet.netlang.live import OWNER, run_base

    d = run_base(testbed) / "frr" / router
    if "bird" in new:
        if old.get("bird") == new["bird"]:
            return []
        uid, gid = _user("bird")
        _write_bird_conf(d, new["bird"], uid, gid)
        r = proc.run(["birdc", "-s", str(d / "bird.ctl"), "configure"], check=False)
        if r.returncode != 0 or "Reconfigur" not in r.stdout:
            raise RouterStartError(f"bird for router {router} refused its new configuration: "
                                   f"{(r.stdout + r.stderr).strip()[-300:]}")
        return ["bird"]
    restart = {x for x in new if old.get(x) != new[x]}
    going = set(old) - set(new)
    keys = {f"{testbed}/frr/{router}/{x}" for x in restart | going}
    for rec in ledger.list(OWNER, "process"):
        if rec.key in keys and "pid" in rec.data:
            proc.RecordedProcess(rec.data["pid"], rec.data["start"]).stop(grace=3)
    ledger.forget_many(OWNER, "process", [f"{testbed}/frr/{router}/{x}" for x in going])
    if not restart:
        return sorted(going)
    mine = {x: new[x] for x in restart}
    ledger.record_many(OWNER, "process", [(k, {"pidfile": str(d / (k.rsplit("/", 1)[1] + ".pid"))})
                                          for k in daemon_keys(testbed, router, mine)])
    pids = _start_frr(ns, router, new, d, only=restart)
    _record(ledger, OWNER, testbed, router, mine, d.parent, pids)
    return sorted(restart | going)


def kill_all(records: list, grace: float = 5.0) -> int:
    """SIGKILL every live routing daemon among ledger `records` (process
    records whose key is TESTBED/frr/ROUTER/DAEMON, with pid and start time)
    at once, then wait up to `grace` seconds for them to be gone. Returns how
    many were killed.

    Why not SIGTERM one by one: a daemon told to stop gracefully withdraws its
    routes and flushes its LSAs, and every router still running recomputes its
    routes for each one; stopping 750 routers in turn took minutes of such a
    storm. The testbed is being removed: nothing needs the goodbyes."""
    import signal

    victims = []
    for r in records:
        if "/frr/" in r.key and "pid" in r.data:
            rp = proc.RecordedProcess(r.data["pid"], r.data["start"])
            if rp.signal(signal.SIGKILL):
                victims.append(rp)
    killed = list(victims)
    deadline = time.monotonic() + grace
    while victims and time.monotonic() < deadline:
        time.sleep(0.05)
        victims = [rp for rp in victims if rp.alive()]
    for rp in killed:
        rp.reap()       # detached (-d): a subreaper caller inherits them, nobody else waits
    return len(killed)
