"""The host side of a testbed: apply one host's manifest here, tear it down, report.

`megafleet up` sends each host its `HostManifest` (see `megafleet.manifest`);
this module applies it locally, in this order:

1. net: namespaces, bridges, veths, taps, VXLAN tunnels of spanning segments,
   namespace configuration, shaping, routers (FRR) -- netlang's live layer does
   the work, on this host's share of the plan;
2. ksm: the KSM tuning daemon (one per host: KSM's knobs are global), started
   before the guests so that it hears the vm engine announce their boot and
   merges them while they come up;
3. collect: the telemetry collector (`megafleet telemetry run`), sampling this
   host and its guests into the store; started before the guests, so that it
   records every boot, also of an apply that is interrupted or killed;
4. vm: the guests, through the vm engine (bounded parallel boots, each failed
   boot retried, then reported).

Every process the testbed starts runs in its cgroup (`megafleet.cgroup`): the
network's daemons, the guests; the collector and KSM daemon run in megafleet's
high-weight control cgroup. The testbed's lock (`megafleet.locks`) is held by
apply and down.

It never fans out: the controller reaches hosts through gproc, whose agent runs
the handlers registered here (`host.probe`, `host.apply`, `host.down`,
`host.status`, `host.exec`); with no inventory the controller calls the same
functions in its own process.

Record before create: the testbed (owner "up", kind "testbed"), its manifest
file and its daemons are in the ledger before they exist; the network's and the
guests' resources are in netlang's and the vm engine's records. `down` walks the
ledger, so it needs no description and works after a crash at any point.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import trio

from megafleet import cgroup, locks, paths, proc
from megafleet.gproc import handlers
from megafleet.ledger import Ledger
from megafleet.manifest import HostManifest, plan_from_json
from megafleet.names import check_name, same_description

OWNER = "up"
Emit = Callable[[dict[str, Any]], None]


class HostError(RuntimeError):
    pass


def _quiet(_: dict[str, Any]) -> None:
    pass


def use_dirs(state_dir: str | None, run_dir: str | None, cache_dir: str | None = None) -> None:
    """Point this process's state, run (and image cache) directories somewhere
    else: the hosts of a test fleet share one filesystem, so each keeps its records
    (and, to be a faithful remote host, its images) apart."""
    if state_dir:
        os.environ["MEGAFLEET_STATE"] = state_dir
    if run_dir:
        os.environ["MEGAFLEET_RUN"] = run_dir
    if cache_dir:
        os.environ["MEGAFLEET_CACHE"] = cache_dir


def manifest_path(testbed: str) -> Path:
    return paths.state_dir() / "up" / f"{check_name(testbed, 'testbed name')}.json"


def load_manifest(testbed: str) -> HostManifest | None:
    try:
        return HostManifest.from_json(json.loads(manifest_path(testbed).read_text()))
    except FileNotFoundError:
        return None


def testbeds(ledger: Ledger | None = None) -> list[str]:
    ledger = ledger or Ledger()
    return sorted(r.key for r in ledger.list(OWNER, "testbed"))


# ---------------------------------------------------------------------------
# probe: what the controller needs to know before it cuts the plan
# ---------------------------------------------------------------------------

def underlay_mtu(peers: list[str]) -> int:
    """The smallest MTU of the interfaces this host reaches its peers through."""
    mtus = []
    for peer in peers:
        out = proc.run(["ip", "-o", "route", "get", peer], check=False).stdout.split()
        if "dev" in out:
            dev = out[out.index("dev") + 1]
            try:
                mtus.append(int(Path(f"/sys/class/net/{dev}/mtu").read_text()))
            except (OSError, ValueError):
                pass
    return min(mtus) if mtus else 1500


def probe(payload: dict[str, Any]) -> dict[str, Any]:
    """This host's underlay MTU towards `peers`, its memory, its cache and which of
    the `images` (hashes) it lacks."""
    use_dirs(payload.get("state_dir"), payload.get("run_dir"), payload.get("cache_dir"))
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                mem_kb = int(line.split()[1])
    cache = paths.cache_dir()
    missing = [h for h in payload.get("images", [])
               if not (cache / "images" / h / "manifest.json").is_file()]
    for h in missing:
        (cache / "images" / h).mkdir(parents=True, exist_ok=True)
    (cache / "names").mkdir(parents=True, exist_ok=True)
    return {"mtu": underlay_mtu(payload.get("peers", [])), "mem_available_mb": mem_kb // 1024,
            "cpus": os.cpu_count(), "cache_dir": str(cache), "missing_images": missing}


# ---------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------

async def apply(m: HostManifest, emit: Emit = _quiet, ledger: Ledger | None = None) -> dict[str, Any]:
    """Apply one manifest on this host; returns the host's summary. Idempotent: a
    second apply of the same manifest leaves the network and running guests alone
    and reboots only guests that are not running. Over a testbed of this name up
    from an earlier version of the same description file, only the difference is
    applied (experiment.reconcile); one up from another file is refused
    (HostError naming that file), and nothing of it changes."""
    if os.geteuid() != 0:
        raise HostError("applying a testbed needs root (namespaces, bridges, guests)")
    use_dirs(m.state_dir, m.run_dir, m.cache_dir)
    t = check_name(m.testbed, "testbed name")
    # This process applies: it keeps its share of the CPU while the testbed's
    # processes (in the testbed's low-weight cgroup) load the host.
    cgroup.join_control()
    async with locks.atestbed_lock(t, "up", on_wait=lambda text: emit({"phase": "lock", "text": text})):
        cgroup.notice(lambda text: emit({"phase": "net", "text": text}))
        with cgroup.scope(t):
            try:
                return await _apply_locked(m, emit, ledger or Ledger(), t)
            except (proc.CommandFailed, OSError) as exc:
                # A raw kernel or tool error ("RTNETLINK answers: ...") says
                # nothing of where: name the host and testbed.
                raise HostError(f"host {m.host}, testbed {t}: {exc}") from exc


async def _apply_locked(m: HostManifest, emit: Emit, ledger: Ledger, t: str) -> dict[str, Any]:
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    digest = m.digest()
    current = next((r.data for r in ledger.list(OWNER, "testbed") if r.key == t), None)
    reconciled = None
    if current is not None and not same_description(current.get("source"), m.source):
        # The name is another file's testbed: reconciling would turn it into
        # this one. Refused before anything is recorded or changed.
        raise HostError(taken_message(t, current.get("source", ""), f"on {m.host} "))
    if current is not None and current.get("digest") != digest:
        # Up from another version of the description: apply only the difference
        # (experiment.reconcile); running guests keep their pids.
        old = load_manifest(t)
        if old is None or old.testbed != m.testbed:
            raise HostError(f"testbed {t!r} is already up on {m.host} from a different description "
                            f"({current.get('source')}) and its manifest is gone; run 'megafleet down {t}' first")
        from megafleet.experiment.reconcile import reconcile
        emit({"phase": "net", "text": "testbed is up from another version of its description: "
                                      "applying the difference"})
        reconciled = await reconcile(old, m, ledger, lambda text: emit({"phase": "net", "text": text}))
    ledger.record(OWNER, "testbed", t, digest=digest, complete=False, source=m.source, host=m.host)
    path = manifest_path(t)
    ledger.record(OWNER, "file", f"{t}/manifest", path=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m.to_json()))

    from megafleet.netlang import live

    p = plan_from_json(m.net)
    p.digest = digest
    emit({"phase": "net", "state": "start"})
    # The daemons the network starts (routing daemons, vde_switch, wirefilter)
    # go into the testbed's cgroup as they are spawned.
    with cgroup.spawning("daemons"):
        net_result = await apply_net(p, ledger, lambda text: emit({"phase": "net", "text": text}),
                                     m.source, m.exec_locs)
    phases["net"] = time.monotonic() - t0

    # The KSM daemon before the guests: the vm engine announces the boot to it,
    # and it scans hard while the guests fill their memory.
    t2 = time.monotonic()
    if m.ksm:
        emit({"phase": "ksm", "state": "start"})
        await trio.to_thread.run_sync(_start_ksm, t, ledger, bool(p.vms))
    phases["ksm"] = time.monotonic() - t2

    # The collector before the guests too: it then sees every guest that boots,
    # also when this apply is interrupted or killed half-way (its boot events
    # are what telemetry counts).
    t3 = time.monotonic()
    emit({"phase": "collect", "state": "start"})
    await trio.to_thread.run_sync(_start_collector, m, ledger)
    phases["collect"] = time.monotonic() - t3

    t1 = time.monotonic()
    report = None
    if p.vms:
        from megafleet.vm.api import apply as vm_apply

        ledger.record(live.OWNER, "vms", t, names=[v.name for v in p.vms])
        total = len(p.vms)
        emit({"phase": "vm", "state": "start", "total": total})
        counts = {"ready": 0, "failed": 0}
        last = [0.0]

        def progress(done: int, total: int, result) -> None:
            counts["failed" if result.outcome == "failed" else "ready"] += 1
            now = time.monotonic()
            if now - last[0] > 1.0 or done == total or result.outcome == "failed":
                last[0] = now
                emit({"phase": "vm", "done": done, "total": total, **counts,
                      **({"failed_guest": result.name, "reason": result.reason}
                         if result.outcome == "failed" else {})})

        # Every object made so far (the parsed description, the plan, the
        # network's records) outlives the boot: out of the cyclic collector's
        # reach for its duration, so that its passes scan only what the boot
        # itself allocates (perf of an `up` of 5,000 containers: the engine's
        # collections cost 5x those of a `vm boot` of the same guests). Back
        # in reach after, for a process that lives on (a host agent).
        gc.freeze()
        try:
            report = await vm_apply(p.vms, progress=progress, **m.vm_options)
        except trio.Cancelled:
            # Interrupted: guests that printed their ready line while the
            # engine was being stopped are up; record them so (status and the
            # collector's boot events then tell the truth).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(settle_guests, {v.name for v in p.vms})
            raise
        finally:
            gc.unfreeze()
        ready = {r.name for r in report.results if r.outcome in ("ready", "already")}
        await trio.to_thread.run_sync(live.shape_container_ports, p, ready)
        await live.start_vm_frr({r: c for r, c in p.vm_frr.items() if r in ready})
    phases["vm"] = time.monotonic() - t1

    ledger.record(OWNER, "testbed", t, digest=digest, complete=True, source=m.source, host=m.host)
    guests: dict[str, Any] = report.to_dict() if report else {"ready": 0, "failed": 0, "already": 0, "guests": []}
    failed = [{"name": g["name"], "reason": g["reason"], "attempts": g["attempts"]}
              for g in guests["guests"] if g["outcome"] == "failed"]
    result = {"host": m.host, "testbed": t, "phases": {k: round(v, 3) for k, v in phases.items()},
              "seconds": round(time.monotonic() - t0, 3), "net": net_result, "reconciled": reconciled,
              "namespaces": len(p.netns), "guests": len(p.vms),
              "ready": guests["ready"] + guests["already"], "failed": failed,
              "boot_p50_s": guests.get("boot_p50_s"), "boot_p95_s": guests.get("boot_p95_s")}
    emit({"phase": "done", "ready": result["ready"], "failed": len(failed)})
    return result


def taken_message(testbed: str, held: str, where: str = "") -> str:
    """The refusal of `up` over a testbed name that another description holds:
    which file holds it and how to go on."""
    return (f"testbed {testbed!r} is already up {where}from another description ({held}); nothing was "
            f"changed: 'megafleet down {testbed}' removes it first, or choose another name with -N")


def held_by(testbed: str, ledger: Ledger | None = None) -> str | None:
    """The description (`names.description_id`) the testbed of this name on this
    host was built from, by `up` or by `net up`; "" when it is up from one that
    was not recorded; None when the name is free here."""
    from megafleet.netlang import live

    ledger = ledger or Ledger()
    for owner, field in ((OWNER, "source"), (live.OWNER, "file")):
        for r in ledger.list(owner, "testbed"):
            if r.key == testbed:
                return str(r.data.get(field) or "")
    return None


async def apply_net(p, ledger: Ledger, progress: Callable[[str], None], source: str = "",
                    exec_locs: dict[str, list[str]] | None = None) -> dict:
    """This host's share of the network: netlang's one instantiation
    (`live.apply`), the same `net up` uses: namespaces, bridges (trees of them
    for big switches), ports of every kind (container guests' veths too), links,
    wires, the VXLAN tunnels of spanning segments, routers. Idempotent; refuses a
    testbed of this name built from another description. A failed startup
    command's error leads with its statement's file:line (`exec_locs`, node ->
    file:line of each `exec`, from the manifest)."""
    from megafleet.netlang import live
    from megafleet.netlang.nsexec import ExecFailed, located

    try:
        return await live.apply(p, ledger, progress, source=source or "megafleet up")
    except ExecFailed as exc:
        raise HostError(located(exc, exec_locs or {})) from None
    except live.LiveError as exc:
        raise HostError(str(exc)) from None


# --- daemons: the ksm daemon and the collector ---------------------------------

def _daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MEGAFLEET_STATE"] = str(paths.state_dir())
    env["MEGAFLEET_RUN"] = str(paths.run_dir())
    env["MEGAFLEET_CACHE"] = str(paths.cache_dir())
    return env


def _running(ledger: Ledger, key: str) -> proc.RecordedProcess | None:
    for r in ledger.list(OWNER, "process"):
        if r.key == key and "pid" in r.data:
            rp = proc.RecordedProcess(r.data["pid"], r.data["start"])
            if rp.alive():
                return rp
    return None


def _start_daemon(ledger: Ledger, key: str, argv: list[str], log: Path) -> proc.RecordedProcess:
    running = _running(ledger, key)
    if running is not None:
        return running
    ledger.record(OWNER, "file", f"{key}.log", path=str(log))
    ledger.record(OWNER, "process", key, log=str(log))
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # megafleet's own daemons: the high-weight control cgroup, not the testbed's.
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env=_daemon_env(), start_new_session=True, **cgroup.control_kwargs())
    rp = proc.RecordedProcess.of(child.pid)
    ledger.record(OWNER, "process", key, log=str(log), pid=rp.pid, start=rp.start)
    # Not reaped here: the daemon outlives this call; `down` stops it by pid.
    child.returncode = 0
    return rp


def _start_ksm(testbed: str, ledger: Ledger, guests_follow: bool) -> None:
    # KSM's knobs are global to the kernel: one daemon per host, whichever testbed
    # started it; the others leave it alone.
    for r in ledger.list(OWNER, "process"):
        if r.key.endswith("/ksm") and _running(ledger, r.key):
            return
    log = paths.state_dir() / "up" / f"{testbed}.ksm.log"
    daemon = _start_daemon(ledger, f"{testbed}/ksm", [sys.executable, "-m", "megafleet", "ksm", "run"], log)
    if not guests_follow:
        return
    # Wait (briefly) until it listens, so that the boot announcement reaches it.
    from megafleet.ksm.daemon import socket_path

    deadline = time.monotonic() + 10
    while not socket_path().exists() and daemon.alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def _collector_argv(m: HostManifest, interval: float | None = None) -> list[str]:
    argv = [sys.executable, "-m", "megafleet", "telemetry"]
    if m.telemetry:
        argv += ["--telemetry", m.telemetry]
    return argv + ["run", "--host", m.host, "--interval", f"{interval or m.collect_interval:g}"]


def _catch_up_telemetry(m: HostManifest) -> None:
    """The collector died (killed) before `down`: sample once more, so that the
    boots it missed are stored (boot events carry ids made from the guest's
    record: what it had already stored is not stored twice). Best effort."""
    argv = _collector_argv(m, 0.5) + ["--duration", "2"]
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=_daemon_env(), timeout=30, **cgroup.control_kwargs())
    except (OSError, subprocess.TimeoutExpired):
        pass


def _start_collector(m: HostManifest, ledger: Ledger) -> None:
    argv = _collector_argv(m)
    # Sniff every switch bridge of this host's share, named as in the description
    # (a VLAN's bridge as SWITCH.VLAN): traffic by protocol per switch.
    # (A tree of bridges is sniffed at its root: what crosses leaves.)
    for b in m.bridges():
        if b.root is None:
            argv += ["--switch", f"{b.switch}={b.ifname}" if b.vlan is None else f"{b.switch}.{b.vlan}={b.ifname}"]
    log = paths.state_dir() / "up" / f"{m.testbed}.collect.log"
    _start_daemon(ledger, f"{m.testbed}/collect", argv, log)


# ---------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------

async def down(testbed: str | None = None, emit: Emit = _quiet, ledger: Ledger | None = None,
               *, state_dir: str | None = None, run_dir: str | None = None, wait: bool = True) -> dict[str, Any]:
    """Tear down `testbed` (or every testbed `up` made on this host): collector and
    ksm daemon first (the collector flushes, the daemon restores the knobs), then
    every process of the testbed at once (its cgroup's cgroup.kill; by pid where
    there are no cgroups), then guests' records and the network through
    netlang's ledger-driven teardown. With no testbed named, also what other
    owners left (probes, scratch, cgroups: `megafleet.sweep`). Holds each
    testbed's lock while it goes: a second `down` waits, then finds nothing.
    Tolerates what is already gone; safe to repeat.

    Returns {"testbeds": {name: {"namespaces", "links", "processes"}},
    "swept": {what: count}, "seconds": float}."""
    if os.geteuid() != 0:
        raise HostError("tearing a testbed down needs root")
    use_dirs(state_dir, run_dir)
    ledger = ledger or Ledger()
    # Keep our CPU share on a host the testbed saturates.
    cgroup.join_control()
    from megafleet.netlang import live

    names = testbeds(ledger)
    if testbed:
        # Also a testbed whose own record is gone but whose network (or cgroup) is not.
        recorded = testbed in names or any(r.key == testbed or r.key.startswith(testbed + "/")
                                           for r in ledger.list(live.OWNER)) or \
            any(r.data.get("testbed") == testbed for r in cgroup.recorded(ledger))
        names = [testbed] if recorded else []
    else:
        names = sorted(set(names) | {r.key for r in ledger.list(live.OWNER, "testbed")}
                       | {r.data["testbed"] for r in cgroup.recorded(ledger) if r.data.get("testbed")})
    t0 = time.monotonic()
    out = {}
    for t in names:
        check_name(t, "testbed name")
        async with locks.atestbed_lock(t, "down", wait=wait,
                                       on_wait=lambda text: emit({"phase": "down", "text": text})):
            if not _still_recorded(t, ledger):
                continue            # a `down` we waited for removed it
            out[t] = await _down_one(t, ledger, emit)
        locks.forget(t)
    swept: dict[str, int] = {}
    if not testbed:
        from megafleet import sweep
        swept = await trio.to_thread.run_sync(sweep.sweep, ledger)
        if any(swept.values()):
            emit({"phase": "down", "text": "swept " + ", ".join(f"{n} {k}" for k, n in swept.items() if n)})
    seconds = time.monotonic() - t0
    emit({"phase": "down", "state": "done", "seconds": round(seconds, 3)})
    return {"testbeds": out, "swept": swept, "seconds": round(seconds, 3)}


def _still_recorded(t: str, ledger: Ledger) -> bool:
    from megafleet.netlang import live

    return (any(r.key == t for r in ledger.list(OWNER, "testbed"))
            or any(r.key == t or r.key.startswith(t + "/") for r in ledger.list(live.OWNER))
            or any(r.data.get("testbed") == t for r in cgroup.recorded(ledger)))


async def _down_one(t: str, ledger: Ledger, emit: Emit) -> dict[str, int]:
    from megafleet.netlang import live

    emit({"phase": "down", "testbed": t, "state": "start"})
    daemons = [r for r in ledger.list(OWNER, "process") if r.key.startswith(t + "/")]
    # An `up` killed mid-boot left guests that are up but recorded as starting:
    # record them running, so the collector stores their boots: a running one
    # looks once more when it is stopped below (Collector.final_events).
    vm_names = {n for r in ledger.list(live.OWNER, "vms") if r.key == t for n in r.data["names"]}
    if vm_names:
        await trio.to_thread.run_sync(settle_guests, vm_names)
    m = load_manifest(t) if vm_names else None
    if m is not None and any(r.key == f"{t}/collect" for r in daemons) and not _running(ledger, f"{t}/collect"):
        # Its collector was killed: what it did not store of the boots, now.
        await trio.to_thread.run_sync(_catch_up_telemetry, m)
    # The collector takes a last look and flushes its pipeline on SIGTERM: give it time.
    await trio.to_thread.run_sync(_stop_daemons, daemons)
    ledger.forget_many(OWNER, "process", [r.key for r in daemons])
    # Every process of the testbed in one write, before anything else: a storm
    # of busy guests or routers must not starve the rest of the teardown.
    killed = await trio.to_thread.run_sync(cgroup.kill, t)
    if killed.processes:
        emit({"phase": "down", "text": f"killed {killed.processes} processes of the testbed's cgroup "
                                       f"({killed.seconds:.1f} s)"})
    if not cgroup.available():
        cgroup.notice(lambda text: emit({"phase": "down", "text": text}))
    await _teardown_guests(t, ledger, emit)
    result = await live.adown(t, lambda text: emit({"phase": "down", "text": text}), ledger)
    await trio.to_thread.run_sync(cgroup.remove, t, ledger)
    for r in ledger.list(OWNER, "file"):
        if r.key.startswith(t + "/"):
            Path(r.data["path"]).unlink(missing_ok=True)
            ledger.forget(OWNER, "file", r.key)
    from megafleet.experiment.hostside import forget as forget_link_settings
    forget_link_settings(t, ledger)
    ledger.forget(OWNER, "testbed", t)
    return {"namespaces": result.get("namespaces", 0), "links": result.get("links", 0),
            "processes": max(killed.processes, result.get("processes", 0)) + len(daemons)}


async def _teardown_guests(testbed: str, ledger: Ledger, emit: Emit) -> None:
    """All the testbed's guests in one engine call (in parallel), before netlang
    removes their network; netlang's own teardown goes guest by guest."""
    from megafleet.netlang import live
    from megafleet.vm.engine import Engine

    records = [r for r in ledger.list(live.OWNER, "vms") if r.key == testbed]
    names = {n for r in records for n in r.data["names"]}
    if names:
        t0 = time.monotonic()
        await Engine(ledger=ledger)._remove(names)
        emit({"phase": "down", "text": f"removed {len(names)} guests ({time.monotonic() - t0:.1f} s)"})
    ledger.forget_many(live.OWNER, "vms", [r.key for r in records])


def settle_guests(names: set[str]) -> int:
    """Guests among `names` still recorded as starting whose process is alive
    and whose console has the ready line (the engine stopped or died before it
    read it): recorded as running, with their pid and the guest's uptime at its
    ready line as boot time. Returns how many.

    The process is the one the engine recorded or, when the engine was stopped
    before it read the pid (a SIGTERM while a container's launcher was
    reporting it), the one the driver's pidfile names: such a guest runs, and
    `status` counts it, so its boot must be recorded too (the collector's boot
    events come from these records)."""
    from megafleet.vm.driver import handle_process
    from megafleet.vm.engine import find_ready
    from megafleet.vm.state import VmState

    state = VmState()
    settled = 0
    for rec in state.list():
        if rec.name not in names or rec.state != "starting":
            continue
        handle = dict(rec.handle)
        if rec.pid and rec.pid_start is not None:
            handle.update(pid=rec.pid, pid_start=rec.pid_start)
        guest = handle_process(handle)
        if guest is None or not guest.alive():
            continue
        console = rec.handle.get("console") or str(Path(rec.handle.get("gdir", "")) / "console.log")
        ready = find_ready(console)
        if ready is not None:
            state.update(rec.name, state="running", boot_s=round(ready.uptime, 3), pid=guest.pid,
                         pid_start=guest.start)
            settled += 1
    return settled


def _stop_daemons(records) -> None:
    for r in records:
        if "pid" in r.data:
            proc.RecordedProcess(r.data["pid"], r.data["start"]).stop(grace=10)


# ---------------------------------------------------------------------------
# status and exec
# ---------------------------------------------------------------------------

def _guest_views(names: set[str]) -> dict[str, Any]:
    if not names:
        return {}
    from megafleet.vm.engine import Engine
    if len(names) <= 4:
        # A few guests (the sources of a verify's pings): one by one, instead of
        # every guest of the host with its liveness and memory use.
        return {v.name: v for n in sorted(names) for v in Engine().list(n) if v.name == n}
    return {v.name: v for v in Engine().list("*") if v.name in names}


def status(testbed: str | None = None, *, state_dir: str | None = None,
           run_dir: str | None = None) -> dict[str, Any]:
    """Nodes by state, failures, KSM saving and telemetry health on this host."""
    use_dirs(state_dir, run_dir)
    from megafleet.netlang import live

    ledger = Ledger()
    names = [testbed] if testbed else testbeds(ledger)
    present_ns = live.existing_netns()
    beds = []
    for t in names:
        record = next((r.data for r in ledger.list(OWNER, "testbed") if r.key == t), None)
        if record is None:
            continue
        m = load_manifest(t)
        states: dict[str, int] = {}
        failures = []
        if m is not None:
            for node, ns in m.net["netns"].items():
                state = "up" if ns in present_ns else "missing"
                states[state] = states.get(state, 0) + 1
                if state != "up":
                    failures.append({"node": node, "state": state, "reason": f"namespace {ns} is gone"})
            views = _guest_views({v["name"] for v in m.net["vms"]})
            for v in m.net["vms"]:
                view = views.get(v["name"])
                state = view.state if view else "missing"
                states[state] = states.get(state, 0) + 1
                if state != "running":
                    failures.append({"node": v["name"], "state": state,
                                     "reason": (view.reason if view else None) or "not running"})
        collector = _running(ledger, f"{t}/collect")
        telemetry: dict[str, Any] = {"collector": "running" if collector else "stopped",
                     "store": m.telemetry if m and m.telemetry else "sqlite (state dir)",
                     "log": _tail(paths.state_dir() / "up" / f"{t}.collect.log")}
        if m is not None:
            telemetry.update(_telemetry_seen(m))
        from megafleet.experiment.hostside import changed_links
        beds.append({"testbed": t, "complete": record.get("complete", False),
                     "source": record.get("source"), "nodes": states, "failures": failures,
                     "telemetry": telemetry, "links": [c.to_json() for c in changed_links(t, ledger)]})
    ksm: dict[str, Any] = {"daemon": "running" if any(r.key.endswith("/ksm") and _running(ledger, r.key)
                                                      for r in ledger.list(OWNER, "process")) else "stopped"}
    try:
        from megafleet.ksm.sysfs import KsmSysfs
        snap = KsmSysfs().read()
        ksm["saved_mb"] = round(snap.saved_mb, 1)
    except Exception as exc:   # KSM missing or unreadable: report it, status goes on
        ksm["error"] = str(exc)
    return {"testbeds": beds, "ksm": ksm}


def _telemetry_seen(m: HostManifest) -> dict[str, Any]:
    """How many of this host's guests the store has a recent sample of: the
    telemetry's health as a user sees it. Best effort: a store that is away is
    reported, not waited for."""
    from datetime import datetime, timedelta, timezone

    try:
        from megafleet.collect.queries import latest_guests
        from megafleet.collect.stores import open_store

        store = open_store(m.telemetry, timeout_ms=1000)
        try:
            since = datetime.now(timezone.utc) - timedelta(seconds=max(60.0, 3 * m.collect_interval))
            names = {v["name"] for v in m.net["vms"]}
            seen = {d["meta"]["guest"] for d in latest_guests(store, since, m.host)} & names
        finally:
            store.close()
        return {"guests_seen": len(seen), "guests": len(names)}
    except Exception as exc:      # store away or not created yet: say so, go on
        return {"store_error": f"{type(exc).__name__}: {exc}"[:200]}


def _tail(path: Path, lines: int = 2) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def guest_exec_routes(vms: list[dict[str, Any]]) -> dict[str, Any]:
    """How to run a command inside each guest of a manifest's `vms` (dicts with
    "name" and "driver"): guest name -> `megafleet.vm.driver.ExecRoute`, or a
    str saying why not (not running, no exec channel). Each guest's driver
    decides (`Driver.exec_route`: a container is entered with nsenter, a QEMU
    or libvirt guest is asked through its exec channel)."""
    from megafleet.vm.driver import driver_kind
    from megafleet.vm.guestexec import GuestExecError
    from megafleet.vm.state import VmState

    views = _guest_views({v["name"] for v in vms})
    state = VmState()
    handles = ({n: r.handle for n in views if (r := state.get(n)) is not None} if len(views) <= 4 else
               {r.name: r.handle for r in state.list() if r.name in views})
    out: dict[str, Any] = {}
    for v in vms:
        name = v["name"]
        view = views.get(name)
        if view is None or view.state != "running":
            out[name] = "guest is not running"
            continue
        try:
            out[name] = driver_kind(v["driver"]).driver_class().exec_route(name, view.pid, handles.get(name))
        except (GuestExecError, ValueError) as exc:
            out[name] = str(exc)
    return out


@dataclass
class NodeExec:
    """What a command did in one node: its exit status `rc`, its output
    decoded as text; rc None and `error` saying why when it could not run
    (no such guest running, a timeout, the guest's exec channel refused).
    `host` is the host the node is on, filled in by the controller."""

    node: str
    rc: int | None
    stdout: str
    stderr: str
    error: str | None
    host: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.host is None:
            del d["host"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], host: str | None = None) -> "NodeExec":
        return cls(d["node"], d["rc"], d["stdout"], d["stderr"], d["error"], host)


async def exec_nodes(pattern: str, argv: list[str], testbed: str | None = None, *,
                     timeout: float = 30.0, state_dir: str | None = None,
                     run_dir: str | None = None) -> list[NodeExec]:
    """Run argv inside every node matching `pattern`: in a namespace node's
    namespace (`ip netns exec`), in a guest the way its driver says
    (`guest_exec_routes`). One result per node, by node name."""
    use_dirs(state_dir, run_dir)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise HostError("exec needs a command (a list of words)")
    from megafleet.vm.driver import ExecRoute
    from megafleet.vm.guestexec import GuestExecError, exec_in_guest

    ledger = Ledger()
    # (node, how to run a command in it or why not); two testbeds may share a node name
    targets: list[tuple[str, ExecRoute | str]] = []
    for t in ([testbed] if testbed else testbeds(ledger)):
        m = load_manifest(t)
        if m is None:
            continue
        for node, ns in sorted(m.net["netns"].items()):
            if fnmatch.fnmatchcase(node, pattern):
                targets.append((node, ExecRoute(prefix=("ip", "netns", "exec", ns))))
        routes = guest_exec_routes([v for v in m.net["vms"] if fnmatch.fnmatchcase(v["name"], pattern)])
        targets += sorted(routes.items())
    results: list[NodeExec] = []
    limiter = trio.CapacityLimiter(8)

    async def one(node: str, route: ExecRoute | str) -> None:
        rc: int | None = None
        stdout, stderr = "", ""
        error = route if isinstance(route, str) else None
        async with limiter:
            if isinstance(route, str):
                pass
            elif route.sock is not None:
                try:
                    r = await exec_in_guest(route.sock, argv, timeout)
                    rc, stdout, stderr = r.rc, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
                except GuestExecError as exc:
                    error = str(exc)
            else:
                # A command entering a guest runs in the guest's cgroup.
                join = cgroup.kwargs_like(route.cgroup_pid) if route.cgroup_pid else {}
                with trio.move_on_after(timeout) as scope:
                    done = await proc.arun([*route.prefix, *argv], check=False, **join)
                if scope.cancelled_caught:
                    error = f"timed out after {timeout:g} s"
                else:
                    rc, stdout, stderr = done.returncode, done.stdout, done.stderr
        results.append(NodeExec(node, rc, stdout, stderr, error))

    async with trio.open_nursery() as nursery:
        for node, route in targets:
            nursery.start_soon(one, node, route)
    return sorted(results, key=lambda r: r.node)


# ---------------------------------------------------------------------------
# gproc handlers: the same functions, reached through the agent tree
# ---------------------------------------------------------------------------

async def _forward_events(ctx: handlers.Context, receive: trio.MemoryReceiveChannel) -> None:
    async for event in receive:
        await ctx.emit(event)


async def _with_events(ctx: handlers.Context, fn) -> Any:
    send, receive = trio.open_memory_channel(256)

    def put(event: dict[str, Any]) -> None:
        try:
            send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass            # progress is best effort; results are not

    def emit(event: dict[str, Any]) -> None:
        # Progress also comes from worker threads (netlang's apply reports from
        # trio.to_thread): a trio channel may only be touched from the trio
        # thread, or the reader's wake-up can be lost and the call hang.
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            try:
                trio.from_thread.run_sync(put, event)
            except (RuntimeError, trio.RunFinishedError):
                pass
            return
        put(event)

    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_forward_events, ctx, receive)
        try:
            result = await fn(emit)
        except Exception as exc:
            # Raised outside the nursery, so the caller sees this error itself
            # rather than an exception group around it.
            error = exc
        finally:
            send.close()
    if error is not None:
        raise error
    return result


@handlers.handler("host.probe")
async def _probe_handler(payload: Any, ctx: handlers.Context) -> dict[str, Any]:
    return await trio.to_thread.run_sync(probe, payload or {})


@handlers.handler("host.apply")
async def _apply_handler(payload: Any, ctx: handlers.Context) -> dict[str, Any]:
    m = HostManifest.from_json(payload)
    return await _with_events(ctx, lambda emit: apply(m, emit))


@handlers.handler("host.down")
async def _down_handler(payload: Any, ctx: handlers.Context) -> dict[str, Any]:
    payload = payload or {}
    return await _with_events(ctx, lambda emit: down(
        payload.get("testbed"), emit, state_dir=payload.get("state_dir"), run_dir=payload.get("run_dir"),
        wait=not payload.get("no_wait")))


@handlers.handler("host.status")
async def _status_handler(payload: Any, ctx: handlers.Context) -> dict[str, Any]:
    payload = payload or {}
    return await trio.to_thread.run_sync(lambda: status(
        payload.get("testbed"), state_dir=payload.get("state_dir"), run_dir=payload.get("run_dir")))


@handlers.handler("host.exec")
async def _exec_handler(payload: Any, ctx: handlers.Context) -> list[dict[str, Any]]:
    done = await exec_nodes(payload["pattern"], payload["argv"], payload.get("testbed"),
                            timeout=payload.get("timeout", 30.0), state_dir=payload.get("state_dir"),
                            run_dir=payload.get("run_dir"))
    return [n.to_json() for n in done]
