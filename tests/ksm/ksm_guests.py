"""Tiny QEMU guests for the KSM tests and bench: N identical guests of one image,
recorded in the ledger before they start and stopped by recorded pid.

The image comes from the imagegen store (examples/images/tiny.toml); for
experiments without it, MFK_KERNEL and MFK_INITRAMFS name a kernel and an
initramfs directly. QEMU runs under TCG: this host's KVM cannot run ordinary
guest kernels (see ARCHITECTURE/HACKING).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from megafleet.ledger import Ledger
from megafleet.names import check_name
from megafleet.proc import RecordedProcess, start_time

REPO = Path(__file__).resolve().parents[2]
OWNER = "ksm-test"
READY = "MEGAFLEET-READY"


def tiny_image() -> tuple[Path, Path]:
    """(kernel, initramfs) of the tiny image, or raise LookupError saying why not."""
    kernel, initramfs = os.environ.get("MFK_KERNEL"), os.environ.get("MFK_INITRAMFS")
    if kernel and initramfs:
        return Path(kernel), Path(initramfs)
    try:
        from megafleet.imagegen import store
    except ImportError as e:
        raise LookupError(f"no image store yet ({e}); set MFK_KERNEL and MFK_INITRAMFS") from e
    image = store.build(str(REPO / "examples/images/tiny.toml"))
    return Path(image.kernel), Path(image.initramfs)


def qemu_argv(name: str, kernel: Path, initramfs: Path, mem_mb: int, pidfile: Path) -> list[str]:
    check_name(name, "guest name")
    # mem-merge=on is QEMU's default (guest RAM is madvise(MADV_MERGEABLE)); it is
    # spelled out because KSM can only merge what is marked mergeable.
    return ["qemu-system-x86_64", "-name", f"guest={name}", "-accel", "tcg",
            "-machine", "pc,mem-merge=on", "-m", str(mem_mb), "-nodefaults",
            "-display", "none", "-no-reboot", "-serial", "stdio",
            "-pidfile", str(pidfile), "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", f"console=ttyS0 quiet panic=-1 no_timer_check megafleet.name={name} megafleet.agent=0"]


@dataclass
class Guest:
    name: str
    process: RecordedProcess
    console: Path


class Guests:
    """A set of guests named PREFIX-0..N-1, all recorded in the ledger."""

    def __init__(self, prefix: str, ledger: Ledger | None = None):
        self.prefix = check_name(prefix, "guest prefix")
        self.ledger = ledger or Ledger()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
        self.ledger.record(OWNER, "dir", str(self.workdir))
        self.guests: list[Guest] = []
        self._popen: list[subprocess.Popen] = []

    def boot(self, count: int, kernel: Path, initramfs: Path, mem_mb: int = 128) -> None:
        """Start `count` guests at once (returns immediately; see wait_ready)."""
        for i in range(count):
            name = f"{self.prefix}-{len(self.guests)}"
            console = self.workdir / f"{name}.console"
            pidfile = self.workdir / f"{name}.pid"
            # Recorded before it exists: after a crash teardown finds it by pidfile.
            self.ledger.record(OWNER, "qemu", name, pidfile=str(pidfile))
            with open(console, "wb") as out:
                popen = subprocess.Popen(qemu_argv(name, kernel, initramfs, mem_mb, pidfile),
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
            process = RecordedProcess(popen.pid, start_time(popen.pid) or 0)
            self.ledger.record(OWNER, "qemu", name, pidfile=str(pidfile), pid=process.pid,
                               start=process.start)
            self._popen.append(popen)
            self.guests.append(Guest(name, process, console))

    def ready(self) -> int:
        return sum(1 for g in self.guests if READY in g.console.read_text(errors="replace"))

    def wait_ready(self, timeout: float = 240.0) -> float:
        """Wait until every guest printed its readiness marker; seconds waited."""
        start = time.monotonic()
        while self.ready() < len(self.guests):
            dead = [g.name for g, p in zip(self.guests, self._popen) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"guests exited before ready: {dead}: "
                                   + self.guests[0].console.read_text(errors="replace")[-500:])
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{self.ready()} of {len(self.guests)} guests ready after {timeout} s")
            time.sleep(0.5)
        return time.monotonic() - start

    def dead(self) -> dict[str, str]:
        """Guests that exited on their own: name -> exit status and console tail."""
        return {g.name: f"exit {p.returncode}: " + g.console.read_text(errors="replace")[-300:]
                for g, p in zip(self.guests, self._popen) if p.poll() is not None}

    def alive(self) -> list[str]:
        return [g.name for g in self.guests if g.process.alive()]

    def stop(self) -> None:
        """Stop every guest by its recorded pid, then forget it; remove files."""
        for guest, popen in zip(self.guests, self._popen):
            guest.process.stop(grace=5)
            popen.wait(timeout=10)
            self.ledger.forget(OWNER, "qemu", guest.name)
        self.guests.clear()
        self._popen.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.ledger.forget(OWNER, "dir", str(self.workdir))


def teardown_leftovers(ledger: Ledger | None = None) -> None:
    """Stop guests and remove directories recorded by a run that crashed."""
    ledger = ledger or Ledger()
    for res in ledger.list(OWNER, "qemu"):
        pid, start = res.data.get("pid"), res.data.get("start")
        if not pid:
            # crashed between recording and starting: QEMU's pidfile, if any,
            # names it; only a process whose command line names this guest is stopped
            try:
                pid = int(Path(res.data["pidfile"]).read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                start = start_time(pid) if f"guest={res.key}".encode() in cmdline else None
            except (OSError, ValueError, KeyError):
                pid = None
        if pid and start:
            RecordedProcess(pid, start).stop(grace=5)
        ledger.forget(OWNER, "qemu", res.key)
    for res in ledger.list(OWNER, "dir"):
        shutil.rmtree(res.key, ignore_errors=True)
        ledger.forget(OWNER, "dir", res.key)
