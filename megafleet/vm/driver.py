"""The interface every guest driver implements, and the process helpers they share.

A driver knows how to start one guest of its kind and how to stop it; the engine
does everything else (state, admission, readiness, retries, teardown). Each guest
gets a directory (its `gdir`, under the run directory) holding its console log,
sockets and, for containers, its writable layer; the engine records that
directory and the driver's `records` in the ledger before `start` is called.

Readiness is the same for every driver: the guest's console (serial port or
stdout) goes to ``gdir/console.log`` and the engine watches it for the ready line.
"""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path
from typing import Any

import trio

from megafleet.proc import RecordedProcess, start_time

PR_SET_CHILD_SUBREAPER = 36


class StartFailed(RuntimeError):
    """A guest could not be started at all (the driver's own error)."""


class Driver:
    """Base class. `start` returns a handle: a JSON-able dict the engine stores
    with the guest (pid, pid_start, paths) and passes back to `alive`/`stop`."""

    name = "base"
    owns_process = True  # the engine records and signals the guest's process

    def admission_kind(self) -> str:
        """'tcg', 'kvm' or 'container': how expensive a boot is (admission)."""
        raise NotImplementedError

    async def open(self, count: int) -> None:
        """Prepare a session that will start about `count` guests."""

    async def aclose(self) -> None:
        """End the session (helpers, connections). Guests keep running."""

    def records(self, name: str, gdir: Path) -> list[tuple[str, str, dict[str, Any]]]:
        """Resources (kind, key, data) to record in the ledger before `start`."""
        return [("process", name, {"guest": name, "driver": self.name,
                                   "pidfile": str(gdir / "pid")})]

    async def start(self, spec, image, gdir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def alive(self, handle: dict[str, Any]) -> bool:
        pid, start = handle.get("pid"), handle.get("pid_start")
        if not pid or start is None:
            return False
        return RecordedProcess(pid, start).alive()

    async def stop(self, name: str, handle: dict[str, Any], *, force: bool) -> None:
        """Stop the guest; tolerate it being gone already."""
        raise NotImplementedError

    def rss_bytes(self, handle: dict[str, Any]) -> int | None:
        pid = handle.get("pid")
        return rss_bytes(pid) if pid and self.alive(handle) else None


def become_subreaper() -> None:
    """Orphaned guest processes (a container's init once its launcher exits, qemu
    after a crash of an engine child) are re-parented to us rather than to PID 1,
    which on some hosts never reaps them. We reap them in `reap`."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass


def reap(pid: int) -> None:
    """Collect the exit status of `pid` if it is a dead child of ours (no zombie
    left behind); harmless otherwise."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_from_pidfile(pidfile: Path) -> RecordedProcess | None:
    """The process a pidfile names, if it is still the one that wrote it (started
    no later than the file was written: a recycled pid starts after)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        written = pidfile.stat().st_mtime
    except (OSError, ValueError, IndexError):
        return None
    start = start_time(pid)
    if start is None:
        return None
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    import time
    boot_epoch = time.time() - uptime
    started_epoch = boot_epoch + start / os.sysconf("SC_CLK_TCK")
    if started_epoch > written + 1.0:
        return None
    return RecordedProcess(pid, start)


async def stop_processes(procs: list[RecordedProcess], *, sig: int = signal.SIGTERM,
                         grace: float = 5.0) -> None:
    """Signal every process at once, wait for them (polling /proc), SIGKILL those
    still there after `grace` seconds, and reap our children. Parallel: a thousand
    processes take as long as the slowest one."""
    pending = [p for p in procs if p.signal(sig)]
    deadline = trio.current_time() + grace
    delay = 0.01
    while pending:
        for p in pending:
            if not p.alive():
                reap(p.pid)
        pending = [p for p in pending if p.alive()]
        if not pending:
            break
        if trio.current_time() > deadline:
            if sig == signal.SIGKILL:
                break  # unkillable (D state): the caller sees it still alive
            for p in pending:
                p.signal(signal.SIGKILL)
            deadline = trio.current_time() + 10.0
            sig = signal.SIGKILL
        await trio.sleep(delay)
        delay = min(delay * 2, 0.2)
    for p in procs:
        reap(p.pid)
