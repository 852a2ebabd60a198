"""What an idle guest costs the host: the CPU of its QEMU process, with the
megafleet agent and exec channel against the same image without them.

The guests boot from the same image with the same QEMU command line (from
`megafleet.qemu.qemu_argv`), except that the references get `megafleet.agent=0`
and no exec port, so the guest daemon has nothing to serve and exits. After
all are ready, one command runs through each agent guest's exec channel (so
the measured guests have served a host program and gone back to waiting for
the next), all settle, then their QEMU processes' CPU time (scheduler run time)
is sampled over the same window: the ratio compares them under the same host
load. Used by tests/vm/test_idle_cpu.py and bench/density_qemu.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from megafleet import paths, qemu
from megafleet.imagegen import scratch
from megafleet.imagegen.contract import READY_MARKER, GuestConfig
from megafleet.ledger import Ledger
from megafleet.proc import RecordedProcess
from megafleet.vm.guestexec import exec_in_guest

LEDGER_OWNER = "vm-idlecpu"
_limiter = trio.CapacityLimiter(4)


@dataclass(frozen=True)
class IdleCpu:
    """CPU seconds used by each QEMU process over the same `seconds` window."""

    seconds: float
    agent_cpu_s: float          # a guest with agent (default interval) and exec port (mean)
    bare_cpu_s: float           # the same image with megafleet.agent=0 and no exec port (mean)
    agent_interval: float
    accel: str

    @property
    def ratio(self) -> float:
        """agent / bare (>= 1 when the agent costs something)."""
        return self.agent_cpu_s / max(self.bare_cpu_s, 1e-6)

    def percent(self, cpu_s: float) -> float:
        """CPU seconds as a percentage of one core over the window."""
        return 100.0 * cpu_s / self.seconds


def cpu_seconds(pid: int) -> float:
    """CPU time of a process in seconds: the sum over its threads of the
    scheduler's run time (/proc/PID/task/*/schedstat, nanoseconds), which an
    idle guest's few ms per second need (utime + stime come in 10 ms ticks).
    Falls back to utime + stime where schedstat is missing. A thread that
    exits takes its run time with it: QEMU's threads here live as long as it."""
    total, found = 0, False
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue
    if found:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class _Guest:
    name: str
    work: Path
    proc: subprocess.Popen
    recorded: RecordedProcess


def _start(ledger: Ledger, image, name: str, *, agent_interval: float, exec_port: bool,
           mem_mb: int, accel: str) -> _Guest:
    work = scratch.make(paths.run_dir(), name)
    config = GuestConfig(name=name, agent_interval=agent_interval)
    argv = qemu.qemu_argv(image.kernel, image.initramfs, "quiet " + " ".join(config.kernel_args()),
                          name=name, mem_mb=mem_mb, accel=accel,
                          console_log=work / "console.log",
                          agent_log=work / "agent.log" if agent_interval else None,
                          exec_socket=work / "exec.sock" if exec_port else None)
    with open(work / "qemu.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True)
    recorded = RecordedProcess.of(proc.pid)
    ledger.record(LEDGER_OWNER, "process", str(proc.pid), start=recorded.start, what=name,
                  dir=str(work))
    return _Guest(name, work, proc, recorded)


def _stop(ledger: Ledger, guest: _Guest) -> None:
    guest.recorded.stop(grace=2)
    guest.proc.wait()
    ledger.forget(LEDGER_OWNER, "process", str(guest.proc.pid))
    shutil.rmtree(guest.work, ignore_errors=True)


def cleanup(ledger: Ledger | None = None) -> int:
    """Stop what a crashed measurement left (recorded in the ledger); how many."""
    ledger = ledger or Ledger()
    stopped = 0
    for res in ledger.list(owner=LEDGER_OWNER, kind="process"):
        proc = RecordedProcess(int(res.key), int(res.data["start"]))
        if proc.alive():
            proc.stop(grace=2)
            stopped += 1
        if res.data.get("dir"):
            shutil.rmtree(res.data["dir"], ignore_errors=True)
        ledger.forget(LEDGER_OWNER, "process", res.key)
    return stopped


async def measure_idle(image, *, seconds: float = 20.0, settle: float = 10.0,
                       agent_interval: float = GuestConfig.agent_interval, mem_mb: int = 128,
                       accel: str | None = None, prefix: str = "mfv-idle",
                       boot_timeout: float = 240.0, pairs: int = 2) -> IdleCpu:
    """Boot `image` `pairs` times each with agent + exec port and without, wait
    until all are ready, run `true` through each exec channel, wait `settle`
    seconds, then measure the QEMU processes' CPU over `seconds` (each kind's
    figure is the mean of its guests: an idle guest uses a few ms per second,
    and one guest's luck with the host's timers is a good part of that). All
    guests are stopped and forgotten before returning, also on error. Raises
    RuntimeError when a guest does not boot or an exec channel does not answer."""
    if accel is None:
        accel = (await trio.to_thread.run_sync(qemu.probe_accel, limiter=_limiter))[0]
    ledger = Ledger()
    guests: list[_Guest] = []
    try:
        for i in range(pairs):
            guests.append(_start(ledger, image, f"{prefix}-agent{i}", agent_interval=agent_interval,
                                 exec_port=True, mem_mb=mem_mb, accel=accel))
            guests.append(_start(ledger, image, f"{prefix}-bare{i}", agent_interval=0,
                                 exec_port=False, mem_mb=mem_mb, accel=accel))
        deadline = time.monotonic() + boot_timeout
        for g in guests:
            line = await trio.to_thread.run_sync(qemu.wait_for_line, g.work / "console.log",
                                                 READY_MARKER, deadline, g.proc, limiter=_limiter)
            if line is None:
                raise RuntimeError(f"{g.name} did not boot within {boot_timeout:.0f} s: "
                                   + (g.work / "console.log").read_text(errors="replace")[-500:])
        with_agent, bare = guests[0::2], guests[1::2]
        for g in with_agent:
            result = await exec_in_guest(g.work / "exec.sock", ["true"], timeout=120)
            if result.rc != 0:
                raise RuntimeError(f"exec of `true` in {g.name} gave {result}")
        await trio.sleep(settle)
        before = {g.name: cpu_seconds(g.proc.pid) for g in guests}
        start = time.monotonic()
        await trio.sleep(seconds)
        used = {g.name: cpu_seconds(g.proc.pid) - before[g.name] for g in guests}
        elapsed = time.monotonic() - start
        return IdleCpu(seconds=elapsed,
                       agent_cpu_s=sum(used[g.name] for g in with_agent) / pairs,
                       bare_cpu_s=sum(used[g.name] for g in bare) / pairs,
                       agent_interval=agent_interval, accel=accel)
    finally:
        for g in guests:
            await trio.to_thread.run_sync(_stop, ledger, g, limiter=_limiter)
