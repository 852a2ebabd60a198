"""Running external programs and stopping the processes we started.

Every program runs from an argv list, never through a shell. Processes are stopped
by the pid we recorded *together with its start time*, so that a recycled pid is
never signalled by mistake and no name pattern is ever used.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass


class CommandFailed(RuntimeError):
    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-5:]
        super().__init__(f"{argv[0]} exited {returncode}: " + " | ".join(tail))


def _check_argv(argv: list[str]) -> list[str]:
    if not isinstance(argv, (list, tuple)) or not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"argv must be a non-empty list of str, got {argv!r}")
    return argv


def run(argv: list[str], *, input: bytes | str | None = None, check: bool = True,
        timeout: float | None = None, env: dict[str, str] | None = None,
        preexec_fn=None) -> subprocess.CompletedProcess:
    """Run argv to completion, capturing output as text. Blocking: from trio, call
    it through trio.to_thread.run_sync or use `arun`. `preexec_fn`: see
    megafleet.cgroup.popen_kwargs (starts the child in a testbed's cgroup)."""
    _check_argv(argv)
    if isinstance(input, bytes):
        input = input.decode()
    if preexec_fn is None:
        from megafleet import cgroup
        preexec_fn = cgroup.implicit_preexec()
    result = subprocess.run(argv, input=input, capture_output=True, text=True,
                            timeout=timeout, env=env, preexec_fn=preexec_fn)
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stderr)
    return result


async def arun(argv: list[str], *, input: bytes | None = None, check: bool = True,
               env: dict[str, str] | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    """trio version of `run` (output captured as bytes, decoded to text)."""
    import trio

    _check_argv(argv)
    if preexec_fn is None:
        from megafleet import cgroup
        preexec_fn = cgroup.implicit_preexec()
    result = await trio.run_process(argv, stdin=input, capture_stdout=True,
                                    capture_stderr=True, check=False, env=env, preexec_fn=preexec_fn)
    out = subprocess.CompletedProcess(argv, result.returncode,
                                      result.stdout.decode(errors="replace"),
                                      result.stderr.decode(errors="replace"))
    if check and out.returncode != 0:
        raise CommandFailed(argv, out.returncode, out.stderr)
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from one read of
    /proc/PID/stat (fields 3 and 22), or None if there is no such process.
    One os.read: the engine checks every recorded guest this way on each
    apply (a thousand of them in a reconciling `up`)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        stat = os.read(fd, 4096)
    except ProcessLookupError:          # the process ended between open and read
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may contain spaces and parentheses: split after
    # the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[19])


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of
    /proc/PID/stat), or None if there is no such process."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


@dataclass(frozen=True)
class RecordedProcess:
    """A process identified by pid and start time, as recorded before use."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> "RecordedProcess":
        start = start_time(pid)
        if start is None:
            raise ProcessLookupError(pid)
        return cls(pid, start)

    def alive(self) -> bool:
        """The same process (pid and start time) and not a zombie."""
        stat = _stat(self.pid)
        return stat is not None and stat[1] == self.start and stat[0] != "Z"

    def signal(self, sig: int = signal.SIGTERM) -> bool:
        """Send sig if this is still the same process. True if it was sent."""
        if start_time(self.pid) != self.start:
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL (and up to 1 s more
        for it to die). A dead child of ours is reaped (`reap`)."""
        if self.signal(signal.SIGTERM):
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.02)
            if self.alive():
                self.signal(signal.SIGKILL)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and self.alive():
                    time.sleep(0.02)
        self.reap()

    def reap(self) -> bool:
        """Collect this process's exit status if it is a dead child of ours (see
        the module function `reap`). True if it was collected."""
        return start_time(self.pid) == self.start and reap(self.pid)


def reap(pid: int) -> bool:
    """Collect `pid`'s exit status if it is a zombie child of this process;
    True if collected, False for any other pid (alive, gone, not ours).

    Why: the daemons megafleet starts detach (FRR and vde_switch `-d`,
    wirefilter `--daemon`, BIRD): their launcher exits at once, and a process
    that is a child subreaper (the vm engine makes its caller one, so container
    inits and qemu come back to it) inherits them. Nobody holds a Popen for
    them, so without this each one stopped stays a zombie for as long as that
    process lives (a gproc agent, a test run). Only call it for a process whose
    status no Popen waits for (a recorded daemon), or the Popen reads 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
    if state != "Z" or int(ppid) != os.getpid():
        return False
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


# --- the orphan reaper of a child subreaper ---------------------------------

_reaper: threading.Thread | None = None
_reaper_lock = threading.Lock()


def start_orphan_reaper(interval: float = 2.0) -> None:
    """In a process that is a child subreaper (`vm.driver.become_subreaper`):
    a daemon thread that reaps, every `interval` seconds, the zombies among its
    children that no Popen of this process waits for. Once per process (the
    first call's interval holds).

    Why: a subreaper adopts every orphan of its subtree: the daemons that
    detach (FRR, vde_switch, wirefilter, BIRD), container inits, and all a
    finished `megafleet up` child left running. Whoever kills them later (a
    `down` in another process, a live change) is not their parent, so in a
    long-lived subreaper (a test run, a gproc agent) each stayed a zombie.

    Safe beside subprocess, trio and asyncio (all wait through a Popen): a
    zombie is reaped only when no live Popen object has its pid, in two looks
    one interval apart (the look before a new Popen records its pid cannot
    reap it). No SIGCHLD handler is installed (trio and asyncio own theirs)."""
    global _reaper
    with _reaper_lock:
        if _reaper is not None:
            return
        _reaper = threading.Thread(target=_reap_orphans_forever, args=(interval,),
                                   name="megafleet-orphan-reaper", daemon=True)
        _reaper.start()


def zombie_children() -> set[tuple[int, int]]:
    """(pid, start time) of this process's children that are zombies (each
    thread's children: an orphan is adopted by any thread of a subreaper)."""
    me = os.getpid()
    kids: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{me}/task"):
            try:
                with open(f"/proc/{me}/task/{task}/children") as f:
                    kids.update(int(x) for x in f.read().split())
            except OSError:
                continue                # the thread ended meanwhile
    except OSError:
        return set()
    out = set()
    for pid in kids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            out.add((pid, int(fields[19])))
    return out


def _claimed() -> set[int]:
    """Pids some live Popen of this process will wait for: subprocess.Popen
    (also under trio's and asyncio's processes) and multiprocessing's."""
    import gc

    return {o.pid for o in gc.get_objects()
            if type(o).__name__ == "Popen" and isinstance(getattr(o, "pid", None), int)
            and getattr(o, "returncode", None) is None}


def reap_orphans(suspects: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """One look of the orphan reaper: reap the unclaimed zombie children that
    were unclaimed in the previous look too (`suspects`, from the last call);
    returns this look's unclaimed ones, for the next."""
    zombies = zombie_children()
    if not zombies:
        return set()
    claimed = _claimed()
    unclaimed = {z for z in zombies if z[0] not in claimed}
    for pid, _ in unclaimed & suspects:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return unclaimed - suspects


def _reap_orphans_forever(interval: float) -> None:
    suspects: set[tuple[int, int]] = set()
    while True:
        time.sleep(interval)
        try:
            suspects = reap_orphans(suspects)
        except Exception:       # never take the process down; try again next time
            suspects = set()
