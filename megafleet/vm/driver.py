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
import importlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio

from megafleet.proc import RecordedProcess, start_time

PR_SET_CHILD_SUBREAPER = 36


# ---------------------------------------------------------------------------
# The registry: what placement, admission, `net check` and the engine know of
# each driver without starting anything. One entry per driver, nowhere else.
# ---------------------------------------------------------------------------

# Host memory a QEMU guest costs beyond its RAM: QEMU's own heap and mappings,
# the TCG translation cache (32 MiB, megafleet.qemu, all of it resident once a
# kernel has booted), page tables. Measured on an idle tiny guest under TCG
# (QEMU 7.2, -m 96): RssAnon 162-166 MiB, all 96 MiB of guest RAM resident, so
# 66-70 MiB beyond it, a few of which (ROMs) KSM may merge; QEMU's binary and
# libraries are file pages every guest shares.
QEMU_OVERHEAD_MB = 64
# A container guest has no RAM of its own: its busybox init and agent (a few
# hundred kB of private memory each) and the kernel objects of its namespaces;
# the image's files are one page cache shared by every container of the image.
CONTAINER_MB = 4
# The most of a guest's RAM that KSM can be expected to merge (placement and
# admission clamp --ksm-sharing to this).
KSM_SHARING_MAX = 0.9


@dataclass(frozen=True)
class DriverKind:
    """One driver, as the rest of megafleet sees it.

    `footprint_mb` is the host memory one guest of this driver is charged, the
    same number for placement (`megafleet plan`), the engine's admission and
    the checks at compile time."""

    name: str
    nic_kinds: tuple[str, ...]     # NIC kinds the driver attaches ("tap", "vde", "veth")
    min_mem_mb: int                # smallest `mem` accepted (refused below, at compile time)
    min_mem_why: str               # why, for the error message
    ram_backed: bool               # `mem` MiB of host RAM per guest (QEMU) or not (a process)
    overhead_mb: int               # host MiB per guest beyond its RAM (or all of it if not ram_backed)
    boot_kind: str | None          # admission's boots-per-CPU class; None: the accelerator's (tcg, kvm)
    readiness: str                 # where the ready line shows: "serial" console or container "stdout"
    factory: str                   # "module:Class" of the Driver
    # No agent in the guest: the host's collector samples it from outside
    # (megafleet.collect.containers reads its namespaces and cgroup).
    host_sampled: bool = False
    # The column of `megafleet plan`/`up` summaries that counts these guests.
    summary_column: Literal["vms", "containers"] = "vms"
    # Guests of `boot_kind` booting at once per CPU (admission), when the
    # driver has a boot kind of its own.
    boots_per_cpu: int | None = None

    def footprint_mb(self, mem_mb: int, ksm_sharing: float = 0.0) -> float:
        """Host MiB one guest of `mem_mb` costs once KSM merges the expected
        fraction `ksm_sharing` (0..KSM_SHARING_MAX) of its RAM. Only RAM-backed
        guests share through KSM; the overhead never does."""
        if not self.ram_backed:
            return float(self.overhead_mb)
        sharing = min(max(ksm_sharing, 0.0), KSM_SHARING_MAX)
        return mem_mb * (1.0 - sharing) + self.overhead_mb

    def full_mb(self, mem_mb: int) -> int:
        """Host MiB before any KSM sharing."""
        return (mem_mb if self.ram_backed else 0) + self.overhead_mb

    def mem_problem(self, mem_mb: int) -> str | None:
        """Why a guest of this driver cannot have `mem_mb` MiB, or None."""
        if mem_mb < self.min_mem_mb:
            return (f"mem {mem_mb}M is below the {self.name} driver's minimum of "
                    f"{self.min_mem_mb}M ({self.min_mem_why})")
        return None

    def driver_class(self) -> type["Driver"]:
        """The Driver class (its module imported on first use)."""
        module, _, cls = self.factory.partition(":")
        found: type[Driver] = getattr(importlib.import_module(module), cls)
        return found

    def make(self) -> "Driver":
        return self.driver_class()()


_KERNEL_MIN = "the Debian kernel of the images does not boot below -m 96"
DRIVER_KINDS: dict[str, DriverKind] = {k.name: k for k in (
    DriverKind("qemu", nic_kinds=("tap", "vde"), min_mem_mb=96, min_mem_why=_KERNEL_MIN, ram_backed=True,
               overhead_mb=QEMU_OVERHEAD_MB, boot_kind=None, readiness="serial",
               factory="megafleet.vm.qemu_driver:QemuDriver"),
    DriverKind("libvirt", nic_kinds=("tap",), min_mem_mb=96, min_mem_why=_KERNEL_MIN, ram_backed=True,
               overhead_mb=QEMU_OVERHEAD_MB, boot_kind=None, readiness="serial",
               factory="megafleet.vm.libvirt_driver:LibvirtDriver"),
    DriverKind("container", nic_kinds=("veth",), min_mem_mb=16,
               min_mem_why="the smallest guest size megafleet accepts; a container's RAM is its "
                           "processes, not `mem`", ram_backed=False,
               overhead_mb=CONTAINER_MB, boot_kind="container", readiness="stdout",
               factory="megafleet.vm.container_driver:ContainerDriver",
               host_sampled=True, summary_column="containers",
               boots_per_cpu=64),          # a container's init is a few milliseconds of work
)}
DRIVER_NAMES = tuple(DRIVER_KINDS)
DEFAULT_DRIVER = "qemu"           # a `vm` statement or spec that names none


def driver_kind(name: str) -> DriverKind:
    """The registry entry of `name`; ValueError naming the known drivers."""
    try:
        return DRIVER_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown driver {name!r} (choose one of {', '.join(DRIVER_NAMES)})") from None


def check_guest_memory(net, diags) -> None:
    """Compile-time check (netlang): every vm or image router whose `mem` is below
    its driver's minimum is reported at its statement's file:line."""
    for g in net.groups:
        if not (g.kind == "vm" or (g.kind == "router" and "image" in g.props)):
            continue
        kind = DRIVER_KINDS.get(g.props.get("driver", DEFAULT_DRIVER))
        mem = g.props.get("mem_mib")
        if kind is None or mem is None:
            continue
        problem = kind.mem_problem(int(mem))
        if problem:
            who = g.names[0] if len(g.names) == 1 else f"{g.names[0]}..{g.names[-1]}"
            diags.error(g.loc, f"{who}: {problem}")


class StartFailed(RuntimeError):
    """A guest could not be started at all (the driver's own error)."""


@dataclass(frozen=True)
class ExecRoute:
    """How the host runs a command inside one running guest: either on the host
    with `prefix` before the command's argv (in the cgroup of process
    `cgroup_pid` when set, so what it starts is charged to the guest), or
    through the guest's exec channel, the unix socket `sock`
    (megafleet.vm.guestexec)."""

    prefix: tuple[str, ...] = ()
    cgroup_pid: int | None = None
    sock: Path | None = None


class Driver:
    """Base class. `start` returns a handle: a JSON-able dict the engine stores
    with the guest (pid, pid_start, paths) and passes back to `alive`/`stop`.

    The base implements a guest that is one host process the engine records
    (by pid and start time, or by its pidfile before it is known)."""

    name = "base"
    owns_process = True  # the engine records and signals the guest's process
    # Teardown sends SIGTERM and waits a grace period (a clean exit), or, when
    # True, SIGKILL at once (nothing in the guest needs a clean exit).
    kill_on_teardown = False
    # `open` starts helper processes that take a while to come up: the engine
    # opens the session before it checks the guests on record, not after.
    open_early = False

    def admission_kind(self) -> str:
        """'tcg', 'kvm' or 'container': how expensive a boot is (admission).
        Blocking: for QEMU and libvirt the first call of a host's boot runs the
        KVM probe (qemu.probe_accel), so the engine calls it from a worker
        thread, before it records any guest."""
        raise NotImplementedError

    async def open(self, count: int) -> None:
        """Prepare a session that will start about `count` guests."""

    async def aclose(self) -> None:
        """End the session (helpers, connections). Guests keep running."""

    def records(self, name: str, gdir: Path) -> list[tuple[str, str, dict[str, Any]]]:
        """Resources (kind, key, data) to record in the ledger before `start`.
        Each data names the guest ("guest") and this driver ("driver"), so
        teardown finds the driver that removes it."""
        return [("process", name, {"guest": name, "driver": self.name,
                                   "pidfile": str(gdir / "pid")})]

    async def start(self, spec: Any, image: Any, gdir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def alive(self, handle: dict[str, Any]) -> bool:
        """Whether the guest of `handle` (its pid and pid_start, else its
        pidfile) is still running."""
        proc = handle_process(handle)
        return proc is not None and proc.alive()

    def exit_reason(self, handle: dict[str, Any]) -> str:
        """Why the guest of `handle` ended before its ready line, as far as the
        driver can tell (an exit status, the tail of a log)."""
        return f"{self.name} guest exited"

    async def stop(self, name: str, handle: dict[str, Any], *, force: bool) -> None:
        """Stop the guest; tolerate it being gone already. The base: SIGTERM to
        its process, SIGKILL after a grace period (at once with `force`)."""
        proc = handle_process(handle)
        if proc is not None:
            await stop_processes([proc], sig=signal.SIGKILL if force else signal.SIGTERM, grace=3.0)

    async def remove(self, records: list[dict[str, Any]]) -> None:
        """Teardown: end every guest whose ledger records (the data of this
        driver's `records`, plus "key") are given, all at once; tolerate those
        already gone."""
        procs = [p for p in map(handle_process, records) if p is not None]
        await stop_processes(procs, sig=signal.SIGKILL if self.kill_on_teardown else signal.SIGTERM,
                             grace=3.0)

    def rss_bytes(self, handle: dict[str, Any]) -> int | None:
        pid = handle.get("pid")
        return rss_bytes(pid) if pid and self.alive(handle) else None

    @classmethod
    def exec_route(cls, name: str, pid: int | None, handle: dict[str, Any] | None) -> ExecRoute:
        """How to run a command inside running guest `name` (init or QEMU `pid`,
        the engine's `handle`). The base: the guest's exec channel, which QEMU
        and libvirt guests have. GuestExecError when there is none."""
        from megafleet.vm.guestexec import exec_socket
        return ExecRoute(sock=exec_socket(name, handle))


def handle_process(handle: dict[str, Any]) -> RecordedProcess | None:
    """The process a handle or ledger record names: by pid and start time, or
    by its pidfile (written before the pid was known to the engine)."""
    if handle.get("pid") and handle.get("pid_start") is not None:
        return RecordedProcess(handle["pid"], handle["pid_start"])
    if handle.get("pidfile"):
        return process_from_pidfile(Path(handle["pidfile"]))
    return None


def become_subreaper() -> None:
    """Orphaned guest processes (a container's init once its launcher exits, qemu
    after a crash of an engine child) are re-parented to us rather than to PID 1,
    which on some hosts never reaps them. We reap them in `reap`, and the
    orphans nobody waits for (detached daemons, what a finished child left
    running, once killed) in proc's orphan reaper."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        return
    from megafleet.proc import start_orphan_reaper

    start_orphan_reaper()


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
