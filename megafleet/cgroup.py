"""cgroups of testbeds: every process a testbed starts runs in its cgroup, so
teardown stops a storm of them in one write.

Layout, in the cgroup v2 hierarchy (``/sys/fs/cgroup`` or, on hybrid hosts,
``/sys/fs/cgroup/unified``)::

    megafleet/                        shared by every testbed of this host
    megafleet/control/                megafleet's own daemons (agent, collector,
                                      ksm daemon): high CPU weight
    megafleet/<testbed>.<state>/      one per testbed and state directory
        routers/  guests/  daemons/   per kind of process

``<state>`` is 8 hex digits of the state directory's path: a test fleet runs
several "hosts" on one machine, each with its own state directory, and two of
them may run testbeds of the same name.

Teardown writes ``1`` to the testbed's ``cgroup.kill`` (every process of the
subtree gets SIGKILL at once, forks included), waits until it is empty and
removes the directories; only then are network objects removed.

CPU weight: the testbed's cgroup gets a low weight, megafleet's control
cgroup a high one, so that the tool (and a `down` run from a shell, which stays
in the root cgroup) is not starved by the testbed it is meant to remove. When
the v2 hierarchy has no cpu controller (hybrid hosts bind it to v1), the same
tree is mirrored in the v1 cpu hierarchy, with cpu.shares.

Record before create: each testbed cgroup is in the ledger (owner "cgroup",
kind "cgroup", key its v2 path) before it exists; `remove` forgets it after.

Where no cgroup v2 hierarchy can be written, everything here is a no-op and
teardown falls back to stopping processes by pid (`notice` says so once).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

from megafleet import paths
from megafleet.names import check_name

OWNER = "cgroup"
BASE = "megafleet"
CONTROL = "control"
KINDS = ("routers", "guests", "daemons")
# v2 cpu.weight is 1..10000 (default 100); v1 cpu.shares 2..262144 (default 1024).
TESTBED_WEIGHT, CONTROL_WEIGHT = 10, 1000
TESTBED_SHARES, CONTROL_SHARES = 64, 8192

_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar("megafleet_cgroup_testbed",
                                                                    default=None)
# The kind that megafleet.proc.run/arun put their children in when the caller
# names none (see `spawning`).
_kind: contextvars.ContextVar[str | None] = contextvars.ContextVar("megafleet_cgroup_kind", default=None)


@dataclass(frozen=True)
class Support:
    """What this host offers: the v2 root to create testbed cgroups under (None:
    unavailable, see `reason`), whether v2 has the cpu controller, and the v1 cpu
    hierarchy's root when weights must go there instead."""

    v2: Path | None
    cpu_v2: bool
    cpu_v1: Path | None
    reason: str


@dataclass(frozen=True)
class KillResult:
    """What `kill` did: processes found in the cgroup, whether it emptied, seconds."""

    processes: int
    emptied: bool
    seconds: float


def _mounts() -> list[tuple[str, str, str]]:
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    out.append((parts[1], parts[2], parts[3]))
    except OSError:
        pass
    return out


def _private_mounts() -> None:
    """In a mount namespace of our own (a test fleet's host: sshd under `ip
    netns exec`, which mounts a fresh /sys without the cgroup hierarchies),
    mount them under the run directory: the same global hierarchies, seen from
    here. Never in the host's own mount namespace (nothing is left mounted
    there)."""
    try:
        if os.geteuid() != 0 or os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt"):
            return
    except OSError:
        return
    import subprocess

    fstypes = {fs for _, fs, _ in _mounts()}
    wanted = [] if "cgroup2" in fstypes else [("cgroup2", ["-t", "cgroup2"])]
    if "cgroup" not in fstypes:
        wanted.append(("cgroup-cpu", ["-t", "cgroup", "-o", "cpu"]))
    for name, args in wanted:
        target = paths.run_dir() / name
        target.mkdir(exist_ok=True)
        subprocess.run(["mount", *args, "none", str(target)], capture_output=True, timeout=10)


@lru_cache(maxsize=1)
def support() -> Support:
    """Probe once per process: a cgroup2 mount, cgroup.kill (Linux >= 5.14) and
    permission to create `megafleet/` under it (tried for real)."""
    _private_mounts()
    mounts = _mounts()
    v2 = next((Path(m) for m, fs, _ in mounts if fs == "cgroup2"), None)
    cpu_v1 = next((Path(m) for m, fs, opts in mounts
                   if fs == "cgroup" and "cpu" in opts.split(",")), None)
    if v2 is None:
        return Support(None, False, None, "no cgroup v2 hierarchy mounted")
    if not (v2 / "cgroup.procs").exists():
        return Support(None, False, None, f"{v2} is not a cgroup v2 root")
    try:
        (v2 / BASE).mkdir(exist_ok=True)
    except OSError as exc:
        return Support(None, False, None, f"cannot create {v2 / BASE}: {exc.strerror}")
    if not (v2 / BASE / "cgroup.kill").exists():
        return Support(None, False, None, "cgroup.kill missing (Linux older than 5.14)")
    try:
        cpu_v2 = "cpu" in (v2 / "cgroup.controllers").read_text().split()
    except OSError:
        cpu_v2 = False
    if cpu_v2:
        cpu_v1 = None
    elif cpu_v1 is not None and not (cpu_v1 / "cpu.shares").exists():
        cpu_v1 = None
    return Support(v2, cpu_v2, cpu_v1, "cgroup v2" + (" (cpu weights in v1)" if cpu_v1 else ""))


def available() -> bool:
    return support().v2 is not None


_noticed = [False]


def notice(say: Callable[[str], None] | None = None) -> None:
    """The one-line notice that teardown stops processes by pid instead, once
    per process: through `say` (a progress callback: in a gproc agent stdout
    and stderr carry the protocol, so nothing may be printed there), else on
    stderr."""
    if not _noticed[0] and not available():
        _noticed[0] = True
        text = f"{support().reason}: testbed processes are stopped by pid"
        if say is not None:
            say(text)
        else:
            print(f"megafleet: {text}", file=sys.stderr)


def group_name(testbed: str) -> str:
    """`<testbed>.<8 hex of the state directory>`: unique per host and state."""
    check_name(testbed, "testbed name")
    tag = hashlib.sha1(str(paths.state_dir().resolve()).encode()).hexdigest()[:8]
    return f"{testbed}.{tag}"


def testbed_path(testbed: str) -> Path | None:
    """The testbed's v2 cgroup directory (None without cgroup support)."""
    s = support()
    return None if s.v2 is None else s.v2 / BASE / group_name(testbed)


def _dirs(rel: str) -> list[Path]:
    """The directories of `megafleet/<rel>` in every hierarchy in use."""
    s = support()
    out = [] if s.v2 is None else [s.v2 / BASE / rel]
    if s.cpu_v1 is not None:
        out.append(s.cpu_v1 / BASE / rel)
    return out


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
        return True
    except OSError:
        return False


def _set_weight(rel: str, weight: int, shares: int) -> None:
    s = support()
    if s.cpu_v2 and s.v2 is not None:
        # The controller must be enabled from the root down to the parent.
        _write(s.v2 / "cgroup.subtree_control", "+cpu")
        parent = s.v2 / BASE
        for part in rel.split("/")[:-1]:
            _write(parent / "cgroup.subtree_control", "+cpu")
            parent = parent / part
        _write(parent / "cgroup.subtree_control", "+cpu")
        _write(s.v2 / BASE / rel / "cpu.weight", str(weight))
    if s.cpu_v1 is not None:
        _write(s.cpu_v1 / BASE / rel / "cpu.shares", str(shares))


def create(testbed: str, ledger=None) -> Path | None:
    """Create the testbed's cgroup and its per-kind children (idempotent), with a
    low CPU weight. Recorded in the ledger first. None without cgroup support
    (the caller says so: `notice`)."""
    path = testbed_path(testbed)
    if path is None:
        return None
    from megafleet.ledger import Ledger

    ledger = ledger or Ledger()
    name = group_name(testbed)
    ledger.record(OWNER, "cgroup", str(path), testbed=testbed,
                  dirs=[str(d) for d in _dirs(name)])
    for d in _dirs(name):
        for kind in KINDS:
            (d / kind).mkdir(parents=True, exist_ok=True)
    _set_weight(name, TESTBED_WEIGHT, TESTBED_SHARES)
    return path


def leaf_dirs(testbed: str, kind: str) -> list[Path]:
    """The per-kind directories a process of `testbed` enters (v2, v1 cpu mirror)."""
    if kind not in KINDS:
        raise ValueError(f"cgroup kind {kind!r}: expected one of {', '.join(KINDS)}")
    return [d / kind for d in _dirs(group_name(testbed))]


def _enter_dirs(pid: int, dirs: list[Path]) -> bool:
    ok = True
    for d in dirs:
        ok = _write(d / "cgroup.procs", str(pid)) and ok
    return ok


def enter(pid: int, kind: str, testbed: str | None = None) -> bool:
    """Move process `pid` into `testbed`'s (default: the current `scope`'s) cgroup
    of `kind`. False when there is no testbed, no cgroup support, or the process is
    gone. Children it forks *after* this inherit the cgroup; for a process that
    forks at once, spawn it with `popen_kwargs` instead."""
    testbed = testbed or _scope.get()
    if testbed is None or not available():
        return False
    return _enter_dirs(pid, leaf_dirs(testbed, kind))


def _preexec_into(targets: list[bytes]) -> Callable[[], None]:
    def join() -> None:
        # Runs in the child between fork and exec: raw syscalls only (no locks,
        # no imports), "0" meaning the writing process itself.
        for target in targets:
            try:
                fd = os.open(target, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            except OSError:
                pass
    return join


def popen_kwargs(kind: str, testbed: str | None = None) -> dict:
    """Keyword arguments for subprocess.Popen/run (or trio's open_process) that
    start the child inside the cgroup, before it can fork: ``{"preexec_fn": f}``,
    or ``{}`` when there is no testbed in scope or no cgroup support."""
    procs = procs_files(kind, testbed)
    return {"preexec_fn": _preexec_into([p.encode() for p in procs])} if procs else {}


def procs_files(kind: str, testbed: str | None = None) -> list[str]:
    """The cgroup.procs files a process of `testbed` (default: the current
    `scope`'s) writes "0" into to join its `kind` cgroups itself, as the
    container helper does first thing: its spawn then needs no preexec_fn,
    which makes Python fork the whole engine instead of vfork (~20 ms per
    helper at a thousand guests). [] without a testbed or cgroup support."""
    testbed = testbed or _scope.get()
    if testbed is None or not available():
        return []
    return [str(d / "cgroup.procs") for d in leaf_dirs(testbed, kind)]


def kwargs_like(pid: int) -> dict:
    """Popen keyword arguments that start a child in the cgroups (v2 and the v1
    cpu mirror) of process `pid` when those are megafleet's: how `exec` into a
    container guest stays in the guest's cgroup. ``{}`` otherwise."""
    s = support()
    if s.v2 is None:
        return {}
    targets = []
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if not rel.startswith(f"/{BASE}/"):
            continue
        if controllers == "":
            targets.append(s.v2 / rel.lstrip("/") / "cgroup.procs")
        elif s.cpu_v1 is not None and "cpu" in controllers.split(","):
            targets.append(s.cpu_v1 / rel.lstrip("/") / "cgroup.procs")
    return {"preexec_fn": _preexec_into([str(t).encode() for t in targets])} if targets else {}


@contextlib.contextmanager
def scope(testbed: str) -> Iterator[None]:
    """Within this block (and the trio tasks and worker threads it starts),
    processes spawned through `enter`/`popen_kwargs` without a testbed named go
    into `testbed`'s cgroups. Creates the cgroup (recorded) if needed."""
    create(testbed)
    token = _scope.set(testbed)
    try:
        yield
    finally:
        _scope.reset(token)


@contextlib.contextmanager
def spawning(kind: str) -> Iterator[None]:
    """Within this block (inside a `scope`), every program megafleet.proc.run or
    arun starts goes into the testbed's `kind` cgroup: the daemons a phase
    starts (FRR, BIRD, vde_switch, wirefilter detach from `ip netns exec`, so
    the cgroup must be joined before the fork, not after)."""
    if kind not in KINDS:
        raise ValueError(f"cgroup kind {kind!r}: expected one of {', '.join(KINDS)}")
    token = _kind.set(kind)
    try:
        yield
    finally:
        _kind.reset(token)


def implicit_preexec():
    """The preexec_fn megafleet.proc uses when its caller gives none: joining
    the `spawning` kind of the current `scope`, or None."""
    kind = _kind.get()
    if kind is None or _scope.get() is None:
        return None
    return popen_kwargs(kind).get("preexec_fn")


def current() -> str | None:
    """The testbed of the current `scope`, if any."""
    return _scope.get()


def control_kwargs() -> dict:
    """Popen keyword arguments that start a megafleet daemon (collector, ksm
    daemon) in the high-weight control cgroup."""
    if not available():
        return {}
    dirs = _control_dirs()
    return {"preexec_fn": _preexec_into([str(d / "cgroup.procs").encode() for d in dirs])} if dirs else {}


def _control_dirs() -> list[Path]:
    dirs = _dirs(CONTROL)
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return []
    _set_weight(CONTROL, CONTROL_WEIGHT, CONTROL_SHARES)
    return dirs


def join_control(pid: int = 0) -> bool:
    """Move `pid` (default: this process) into the control cgroup (the gproc agent
    calls this at start). Never raises; False when not possible."""
    if not available():
        return False
    dirs = _control_dirs()
    return bool(dirs) and _enter_dirs(pid or os.getpid(), dirs)


def procs(path: Path) -> list[int]:
    """Pids in the cgroup directory `path` and every cgroup below it."""
    out: list[int] = []
    try:
        for root, _dirs_, files in os.walk(path):
            if "cgroup.procs" in files:
                try:
                    out += [int(x) for x in Path(root, "cgroup.procs").read_text().split()]
                except (OSError, ValueError):
                    pass
    except OSError:
        pass
    return out


def _populated(path: Path) -> bool:
    try:
        for line in (path / "cgroup.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "populated":
                return value.strip() == "1"
    except OSError:
        return False
    return bool(procs(path))


def kill(testbed: str, timeout: float = 20.0) -> KillResult:
    """SIGKILL every process of the testbed's cgroup in one write (cgroup.kill),
    then wait (up to `timeout` s) until it is empty. Nothing to do without support
    or without the cgroup."""
    t0 = time.monotonic()
    path = testbed_path(testbed)
    if path is None or not path.is_dir():
        return KillResult(0, True, 0.0)
    found = len(procs(path))
    if not _write(path / "cgroup.kill", "1"):
        # Should not happen with support() true; fall back to freeze and pids.
        _write(path / "cgroup.freeze", "1")
        for pid in procs(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _write(path / "cgroup.freeze", "0")
    delay = 0.005
    while _populated(path) and time.monotonic() - t0 < timeout:
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return KillResult(found, not _populated(path), round(time.monotonic() - t0, 3))


def _rmtree(path: Path) -> None:
    # cgroup directories are removed bottom up with rmdir (their files are not
    # real files and cannot be unlinked).
    if not path.is_dir():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        _rmtree(child)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


def remove(testbed: str, ledger=None) -> bool:
    """Remove the testbed's cgroups (after `kill`) and forget them. True when
    nothing of them is left. Tolerates what is already gone."""
    from megafleet.ledger import Ledger

    ledger = ledger or Ledger()
    records = [r for r in ledger.list(OWNER, "cgroup") if r.data.get("testbed") == testbed]
    dirs = {Path(d) for r in records for d in r.data.get("dirs", [r.key])}
    if available():
        dirs |= set(_dirs(group_name(testbed)))
    left = False
    for d in sorted(dirs):
        try:
            _rmtree(d)
        except OSError:
            left = True
    if not left:
        ledger.forget_many(OWNER, "cgroup", [r.key for r in records])
    return not left


def recorded(ledger=None) -> list:
    """The ledger's cgroup records (see `megafleet doctor --leftovers`)."""
    from megafleet.ledger import Ledger

    return (ledger or Ledger()).list(OWNER, "cgroup")


def sweep(ledger=None) -> int:
    """Kill and remove every recorded cgroup of a testbed no longer recorded as up
    (owner "up" or "net"): what a crash between create and teardown left.
    Returns how many went."""
    from megafleet.ledger import Ledger

    ledger = ledger or Ledger()
    live = {r.key for r in ledger.list("up", "testbed")} | {r.key for r in ledger.list("net", "testbed")}
    gone = 0
    for r in ledger.list(OWNER, "cgroup"):
        t = r.data.get("testbed")
        if t and t not in live:
            kill(t)
            remove(t, ledger)
            gone += 1
    return gone
