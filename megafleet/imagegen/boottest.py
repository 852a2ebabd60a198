"""Boot one guest from an image under QEMU and measure it: boot-to-ready time
(from starting QEMU to the readiness line on the console), the accelerator, the
guest's resident memory (QEMU's VmRSS once ready), and the first agent line.

Everything it creates is recorded first and removed at the end, also when it
fails: the QEMU process (ledger, stopped by pid + start time) and a scratch
directory under the run directory (console and agent logs).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megafleet import paths, qemu
from megafleet.imagegen.contract import (AGENT_MARKER, READY_MARKER, AgentLine, GuestConfig,
                                         NicConfig, ReadyLine, parse_line)
from megafleet.imagegen import scratch
from megafleet.imagegen.store import Image
from megafleet.ledger import Ledger
from megafleet.proc import RecordedProcess


class BootFailed(RuntimeError):
    def __init__(self, message: str, console: str):
        super().__init__(message)
        self.console = console


@dataclass
class BootResult:
    image: str
    hash: str
    accel: str
    machine: str
    boot_to_ready_s: float
    guest_uptime_s: float
    guest_rss_bytes: int
    ready: ReadyLine = field(repr=False)
    agent: AgentLine | None = field(repr=False, default=None)
    console: str = field(repr=False, default="")

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("ready", "agent", "console")}
        if self.agent:
            out["agent"] = {"seq": self.agent.seq, "uptime": self.agent.uptime,
                            "mem_total_kb": self.agent.mem_total_kb,
                            "interfaces": sorted(self.agent.interfaces),
                            "addresses": {k: list(v) for k, v in self.agent.addresses.items()}}
        return out


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def boot_test(image: Image, *, config: GuestConfig | None = None, accel: str | None = None,
              machine: str = "q35", mem_mb: int = 128, timeout: float = 60.0,
              wait_agent: bool = True) -> BootResult:
    """Boot `image` once, wait for READY (and the first AGENT line), stop it."""
    if accel is None:
        accel, _ = qemu.probe_accel()
    if config is None:
        config = GuestConfig(name="mfi-boot", agent_interval=1,
                             nics=(NicConfig(mac="52:54:00:6d:66:01", addresses=("10.199.0.2/24",)),))
    ledger = Ledger()
    qemu.cleanup_leftovers(ledger)
    scratch.sweep(paths.run_dir(), "mfi-boot")
    work = scratch.make(paths.run_dir(), "mfi-boot")
    console, agent = work / "console.log", work / "agent.log"
    argv = qemu.qemu_argv(image.kernel, image.initramfs, "quiet " + " ".join(config.kernel_args()),
                          name=config.name, mem_mb=mem_mb, accel=accel, machine=machine,
                          console_log=console, agent_log=agent,
                          nics=[qemu.Nic(mac=n.mac) for n in config.nics])
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    recorded = RecordedProcess.of(proc.pid)
    ledger.record(qemu.LEDGER_OWNER, "process", str(proc.pid), start=recorded.start,
                  what=f"boot-test {image.name}")
    try:
        line = qemu.wait_for_line(console, READY_MARKER, start + timeout, proc)
        ready_at = time.monotonic()
        text = console.read_text(errors="replace") if console.exists() else ""
        if line is None:
            err = ""
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip()
            raise BootFailed(f"image {image.name}: no {READY_MARKER} line within {timeout:.0f} s"
                             + (f" (qemu: {err.splitlines()[-1]})" if err else ""), text)
        ready = parse_line(line)
        if not isinstance(ready, ReadyLine):
            raise BootFailed(f"image {image.name}: not a {READY_MARKER} line: {line!r}", text)
        rss = _rss_bytes(proc.pid)
        agent_line: AgentLine | None = None
        if wait_agent and config.agent_interval:
            # A busy host can delay the first agent line well past its interval.
            wait = max(30.0, 4 * config.agent_interval)
            got = qemu.wait_for_line(agent, AGENT_MARKER, time.monotonic() + wait, proc)
            if got is None:
                raise BootFailed(f"image {image.name}: ready, but no {AGENT_MARKER} line on the "
                                 f"agent port within {wait:.0f} s", text)
            parsed = parse_line(got)
            if not isinstance(parsed, AgentLine):
                raise BootFailed(f"image {image.name}: not an {AGENT_MARKER} line: {got!r}", text)
            agent_line = parsed
        return BootResult(image=image.name, hash=image.hash, accel=accel, machine=machine,
                          boot_to_ready_s=round(ready_at - start, 3),
                          guest_uptime_s=ready.uptime, guest_rss_bytes=rss,
                          ready=ready, agent=agent_line, console=text)
    finally:
        recorded.stop(grace=2)
        proc.wait()
        ledger.forget(qemu.LEDGER_OWNER, "process", str(proc.pid))
        shutil.rmtree(work, ignore_errors=True)
