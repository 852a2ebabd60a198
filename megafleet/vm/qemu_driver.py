"""The qemu driver: one qemu-system-x86_64 process per guest.

Direct kernel boot of an imagegen image (kernel + initramfs, the whole guest in
RAM); the accelerator comes from the host probe (KVM only when it really runs a
guest, else TCG). Per guest, in its directory: ``qmp.sock`` (status and stop),
``console.log`` (serial console: boot messages and the ready line),
``agent.log`` (the virtio-serial port org.megafleet.agent: agent lines),
``exec.sock`` (the port org.megafleet.exec: `megafleet exec` into the guest), ``pid``
(QEMU's pidfile) and ``qemu.log`` (QEMU's own stderr).

Lean defaults (from `megafleet.qemu.qemu_argv`): no default devices, no VGA, no
network unless NICs are given, RAM mergeable for KSM, and under TCG a 32 MiB
translation cache instead of QEMU's default of up to 1 GiB.

QEMU runs in its own session with no pipe to the engine, so guests keep running
when the engine exits or is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import trio

from megafleet import cgroup
from megafleet.proc import RecordedProcess
from megafleet.qemu import Nic, probe_accel, qemu_argv
from megafleet.vm import qmp
from megafleet.vm.driver import Driver, StartFailed, handle_process, reap, stop_processes

# no_timer_check: under TCG on a busy host the guest kernel's IO-APIC timer test
# can fail ("IO-APIC + timer doesn't work!") and panic; the test is pointless in a VM.
BASE_KERNEL_ARGS = ["console=ttyS0", "quiet", "panic=-1", "no_timer_check"]
MACHINE = "q35"  # what megafleet.qemu uses and measured (see there)

_accel_cache: str | None = None


def host_accel() -> str:
    """'kvm' or 'tcg', probed once per process (the probe boots a guest)."""
    global _accel_cache
    if _accel_cache is None:
        forced = os.environ.get("MEGAFLEET_ACCEL")
        if forced in ("kvm", "tcg"):
            _accel_cache = forced
        else:
            accel, _reason = probe_accel()  # prints its one-line notice on fallback
            _accel_cache = accel if accel in ("kvm", "tcg") else "tcg"
    return _accel_cache


def guest_argv(spec, kernel: Path, initramfs: Path, gdir: Path, accel: str) -> list[str]:
    """The full QEMU command line of one guest (argv list, never a shell): the
    shared `megafleet.qemu.qemu_argv` plus a pidfile, so that a QEMU started just
    before an engine crash is still found by teardown."""
    append = " ".join(BASE_KERNEL_ARGS + spec.guest_config().kernel_args())
    nics = [Nic(mac=n.mac.lower(), tap=n.ifname if n.kind == "tap" else None,
                vde=n.vde_socket if n.kind == "vde" else None) for n in spec.nics]
    argv = qemu_argv(kernel, initramfs, append, name=spec.name, mem_mb=spec.mem_mb,
                     vcpus=spec.vcpus, accel=accel, qmp_socket=gdir / "qmp.sock",
                     console_log=gdir / "console.log", agent_log=gdir / "agent.log",
                     exec_socket=gdir / "exec.sock", nics=nics)
    return argv + ["-pidfile", str(gdir / "pid")]


class QemuDriver(Driver):
    name = "qemu"

    def __init__(self) -> None:
        # Spawning forks the engine: bounded so a storm of forks does not pile up.
        self._spawn_limiter = trio.CapacityLimiter(4)
        self._qmp_limiter = trio.CapacityLimiter(32)
        self._children: dict[int, subprocess.Popen] = {}

    @property
    def accel(self) -> str:
        """'kvm' or 'tcg' (probed on first use only: `vm ls` never boots a probe)."""
        return host_accel()

    def admission_kind(self) -> str:
        return self.accel

    async def start(self, spec, image, gdir: Path) -> dict[str, Any]:
        argv = guest_argv(spec, image.kernel, image.initramfs, gdir, self.accel)
        return await trio.to_thread.run_sync(self._spawn, argv, gdir, limiter=self._spawn_limiter)

    def _spawn(self, argv: list[str], gdir: Path) -> dict[str, Any]:
        with open(gdir / "qemu.log", "wb") as log:
            try:
                child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, close_fds=True,
                                         **cgroup.popen_kwargs("guests"))  # the testbed's, if any
            except OSError as exc:
                raise StartFailed(f"cannot run {argv[0]}: {exc}") from exc
        self._children[child.pid] = child
        try:
            proc = RecordedProcess.of(child.pid)
        except ProcessLookupError:
            child.wait()
            raise StartFailed(f"qemu exited at once: {_tail(gdir / 'qemu.log')}") from None
        return {"pid": proc.pid, "pid_start": proc.start, "console": str(gdir / "console.log"),
                "agent": str(gdir / "agent.log"), "qmp": str(gdir / "qmp.sock"),
                "exec": str(gdir / "exec.sock"),
                "log": str(gdir / "qemu.log")}

    def alive(self, handle: dict[str, Any]) -> bool:
        child = self._children.get(handle.get("pid") or -1)
        if child is not None and child.poll() is not None:
            return False
        return super().alive(handle)

    def exit_reason(self, handle: dict[str, Any]) -> str:
        """Why a qemu process ended early: its exit status and stderr tail."""
        child = self._children.get(handle.get("pid") or -1)
        code = child.poll() if child is not None else None
        tail = _tail(Path(handle["log"])) if handle.get("log") else ""
        what = f"qemu exited with status {code}" if code is not None else "qemu exited"
        return what + (f": {tail}" if tail else "")

    async def status(self, handle: dict[str, Any]) -> str | None:
        """The guest's run state as QMP reports it ('running', 'paused', ...)."""
        try:
            reply = await trio.to_thread.run_sync(qmp.command, handle["qmp"], "query-status",
                                                  limiter=self._qmp_limiter)
        except (OSError, qmp.QMPError):
            return None
        return reply.get("status")

    async def stop(self, name: str, handle: dict[str, Any], *, force: bool) -> None:
        proc = handle_process(handle)
        if proc is None:
            return
        if not force and handle.get("qmp"):
            # A clean stop through QMP; signals below if QEMU does not answer.
            try:
                await trio.to_thread.run_sync(qmp.command, handle["qmp"], "quit",
                                              limiter=self._qmp_limiter)
            except (OSError, qmp.QMPError):
                pass
        await stop_processes([proc], sig=signal.SIGKILL if force else signal.SIGTERM, grace=5.0)
        child = self._children.pop(proc.pid, None)
        if child is not None:
            child.poll()
        reap(proc.pid)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])
