"""Startup commands of namespace nodes: `exec "CMD"` on hosts and routers.

After a testbed's namespaces are configured and its routing daemons started,
`live.apply` runs each namespace's `Plan.ns_exec` commands in order, inside the
node's network namespace (`ip netns exec NS ARGV...`: the argv the compiler split
with shlex, never a shell). Nodes run their commands at the same time (at most
`2 x CPUs` of them being started at once; waiting takes no thread); one node's
commands one after the other, each waited for up to `wait_s()` seconds
(containerlab's `exec` runs them the same way, in order, after the node is up):

- exit 0: done, nothing is left to record;
- a non-zero exit, or a program that cannot be started: `ExecFailed` naming the
  node, the command and its exit status, with the end of its output; the
  testbed stays as built (and recorded) for `down`;
- still running after the wait: a long-lived process (a server, a traffic
  generator). It was recorded in the ledger (pid and start time) before it could
  do anything, stays running, and `down` stops it (as it stops everything left
  in the testbed's namespaces).

A command that detaches (forks a daemon and exits 0, `iperf3 -s -D`) is done
when it exits; its daemon lives in the node's namespace, where `down` finds and
stops it with everything else running there (`live.pids_in_netns`).

Each command's output goes to `<run dir>/net/<testbed>/exec/<node>.log`
(removed with the testbed), preceded by a `$ COMMAND` line.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from megafleet import cgroup, proc
from megafleet.ledger import Ledger
from megafleet.netlang.hostplan import NsExec, Plan
from megafleet.netlang.live import OWNER, LiveError, run_base

WAIT_ENV = "MEGAFLEET_EXEC_WAIT_S"
WAIT_S = 10.0


def wait_s() -> float:
    """How long each command is waited for before it counts as long-lived
    (seconds; MEGAFLEET_EXEC_WAIT_S, default 10)."""
    text = os.environ.get(WAIT_ENV)
    if not text:
        return WAIT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise ValueError(f"{WAIT_ENV}={text!r}: give seconds between 0 and 3600")
    return value


@dataclass
class ExecReport:
    done: int = 0           # commands that exited 0
    running: int = 0        # long-lived ones left running (recorded)
    seconds: float = 0.0


class ExecFailed(LiveError):
    """A startup command failed: `node`, `index` (its place among the node's
    commands, 0-based: the compiler's props["exec"][index] has its file:line),
    `argv`, `status` (exit status, or None when it could not be started)."""

    def __init__(self, node: str, index: int, argv: tuple[str, ...], status: int | None, detail: str):
        self.node, self.index, self.argv, self.status = node, index, argv, status
        what = f"exited {status}" if status is not None else "could not be started"
        super().__init__(f"node {node}: startup command {shlex.join(argv)!r} {what}"
                         + (f": {detail}" if detail else ""))


def log_dir(testbed: str) -> Path:
    return run_base(testbed) / "exec"


async def run_all(p: Plan, ledger: Ledger, progress=lambda _msg: None,
                  only: dict[str, set[int]] | None = None) -> ExecReport:
    """Run every namespace's startup commands (see the module text); with
    `only` (namespace -> indexes into its command list), just those (a changed
    testbed runs the commands its edit added). Raises ExecFailed (the first
    failure; the other nodes' commands still ran) or ValueError (a bad
    MEGAFLEET_EXEC_WAIT_S)."""
    report = ExecReport()
    todo = {ns: cmds for ns, cmds in sorted(p.ns_exec.items())
            if cmds and (only is None or only.get(ns))}
    if not todo:
        return report
    t0 = time.monotonic()
    wait = wait_s()
    base = log_dir(p.name)
    ledger.record(OWNER, "dir", f"{p.name}/exec", path=str(base))
    base.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()           # one ledger writer at a time (sqlite)
    # Threads only start processes; the waits are trio's (a node whose server
    # takes the whole wait holds no thread).
    limiter = trio.CapacityLimiter(2 * (os.cpu_count() or 1))
    failures: list[ExecFailed] = []

    async def one(ns: str, cmds: list[NsExec]) -> None:
        for i, cmd in enumerate(cmds):
            if only is not None and i not in only[ns]:
                continue
            try:
                child, key, log = await trio.to_thread.run_sync(_start, p.name, ns, i, cmd, base, ledger, lock,
                                                                limiter=limiter)
                status = await _wait(child, wait)
                if status is None:
                    report.running += 1
                    continue
                await trio.to_thread.run_sync(_forget, ledger, lock, key)
                if status != 0:
                    raise ExecFailed(cmd.node, i, cmd.argv, status, _tail(log))
                report.done += 1
            except ExecFailed as exc:
                failures.append(exc)
                return

    progress(f"running the startup commands of {len(todo)} nodes")
    async with trio.open_nursery() as nursery:
        for ns, cmds in todo.items():
            nursery.start_soon(one, ns, cmds)
    report.seconds = time.monotonic() - t0
    if failures:
        first = failures[0]
        if len(failures) > 1:
            first.args = (f"{first.args[0]} (and {len(failures) - 1} more nodes' commands failed)",)
        raise first
    progress(f"ran {report.done} startup commands, {report.running} left running "
             f"({report.seconds:.1f} s)")
    return report


def _start(testbed: str, ns: str, index: int, cmd: NsExec, base: Path, ledger: Ledger,
           lock: threading.Lock) -> tuple[subprocess.Popen, str, Path]:
    """Start one command in namespace `ns`, recorded first; returns (the child,
    its ledger key, its log file). Raises ExecFailed when it cannot start."""
    # Unique per command line too: a changed testbed may run a new command at
    # the index of one still running.
    key = f"{testbed}/exec/{cmd.node}/{index}-{hashlib.sha256(repr(cmd.argv).encode()).hexdigest()[:8]}"
    about = {"node": cmd.node, "argv": list(cmd.argv)}
    # Record before create: a crash between here and the pid below leaves a
    # record `down` tolerates (it also stops whatever runs in the namespace).
    with lock:
        ledger.record(OWNER, "process", key, **about)
    log = base / f"{cmd.node}.log"
    with open(log, "ab") as out:
        out.write(f"$ {shlex.join(cmd.argv)}\n".encode())
        out.flush()
        try:
            # `ip netns exec` enters the namespace and execs the program itself:
            # the pid is the command's. Its own session: a Ctrl-C of `net up`
            # does not reach a server it leaves running.
            child = subprocess.Popen(["ip", "netns", "exec", ns, *cmd.argv], stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     **cgroup.popen_kwargs("routers"))
        except OSError as exc:
            _forget(ledger, lock, key)
            raise ExecFailed(cmd.node, index, cmd.argv, None, str(exc)) from None
    try:
        rp = proc.RecordedProcess.of(child.pid)
        with lock:
            ledger.record(OWNER, "process", key, pid=rp.pid, start=rp.start, **about)
    except ProcessLookupError:
        pass                          # cannot happen before it is reaped; harmless if it did
    return child, key, log


def _forget(ledger: Ledger, lock: threading.Lock, key: str) -> None:
    with lock:
        ledger.forget(OWNER, "process", key)


async def _wait(child: subprocess.Popen, seconds: float) -> int | None:
    """The child's exit status, or None while it still runs after `seconds`.
    Waits on a pidfd (readable when the process exits) where the kernel has
    them, else polls."""
    try:
        fd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        fd = None
    with trio.move_on_after(seconds):
        if fd is not None:
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
        else:
            pause = 0.005
            while child.poll() is None:
                await trio.sleep(pause)
                pause = min(pause * 2, 0.1)
    return child.poll()


def _tail(log: Path, limit: int = 300) -> str:
    """The last lines of a command's output (after its `$ COMMAND` line)."""
    try:
        text = log.read_bytes()[-4096:].decode(errors="replace")
    except OSError:
        return ""
    last = text.rsplit("\n$ ", 1)[-1].split("\n", 1)
    out = last[1] if len(last) > 1 else ""
    return " | ".join(line for line in out.strip().splitlines()[-3:])[-limit:]


def statement_loc(net, exc: ExecFailed) -> str:
    """file:line of the `exec` statement of a failed command in compiled `net`
    ("?" when the node or the command is not in it)."""
    locs = statement_locs(net, [exc.node]).get(exc.node, [])
    return locs[exc.index] if exc.index < len(locs) else "?"


def statement_locs(net, nodes) -> dict[str, list[str]]:
    """node -> the file:line of each of its `exec` statements, in the order its
    commands run (`Plan.ns_exec`), for the nodes of `nodes` that have any. The
    plan leaves file:line out (moving a line keeps its digest); `megafleet up`
    hands this to each host with its manifest, so a host's failure names it."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        try:
            cmds = net.groups[net.index[node][0]].props.get("exec") or []
        except (KeyError, IndexError):
            continue
        if cmds:
            out[node] = [f"{loc.file}:{loc.line}" for _, loc in cmds]
    return out


def located(exc: ExecFailed, locs: dict[str, list[str]]) -> str:
    """The failure's message, led by its statement's file:line when `locs`
    (statement_locs) has it."""
    where = locs.get(exc.node, [])
    return f"{where[exc.index]}: {exc}" if exc.index < len(where) else str(exc)
