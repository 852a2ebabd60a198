"""QEMU command lines for megafleet guests, and the KVM/TCG probe.

`qemu_argv(...)` gives a lean argv list for one RAM-only guest (kernel +
initramfs, no disks): `-nodefaults -no-user-config`, no VGA, `-display none`,
memory merging on (so KSM can share pages between guests), a serial console
written to a file, QMP on a unix socket, the agent's virtio-serial port named
`org.megafleet.agent`, NICs on taps or VDE switches.

Machine type: `q35` by default, with virtio-pci devices. Measured under TCG on
this 2-core host with the tiny image, q35 reached READY in 2.3-3.1 s, about as
fast as `microvm` (2.1-2.9 s). But microvm has no HPET or ACPI PM timer: when the
host is busy the kernel's TSC calibration against the PIT fails, no other
reference exists and the guest hangs ("tsc: Unable to calibrate against PIT").
q35 always has those references, so it is the default; `machine="microvm"`
(virtio-mmio devices) stays available.

Memory: a guest with the Debian cloud kernel and the tiny image needs at least
80 MiB (measured: 80 boots, 72 stops before the kernel prints anything). QEMU's
resident set after boot is about guest memory + 80 MiB under TCG (QEMU itself
~50 MiB, the translation cache up to TCG_TB_SIZE_MB).

`probe_accel()` answers "does KVM really run a guest here?" by booting the
tiny kernel under KVM with a short timeout and watching the console for the
readiness line. On PVM hosts /dev/kvm opens but ordinary guest kernels hang after
the BIOS: the probe then answers ("tcg", reason). The verdict is cached per boot
(/proc/sys/kernel/random/boot_id) in the state directory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megafleet import paths
from megafleet.imagegen.contract import AGENT_PORT_NAME, EXEC_PORT_NAME, READY_MARKER
from megafleet.ledger import Ledger
from megafleet.names import check_name
from megafleet.proc import RecordedProcess

QEMU = "qemu-system-x86_64"
TCG_TB_SIZE_MB = 32  # QEMU's default translation cache is up to 1 GiB per guest
PROBE_TIMEOUT_S = 12.0
LEDGER_OWNER = "imagegen"

# Kernel parameters that make a headless RAM guest boot faster, added by
# qemu_argv unless the caller's command line already sets them. Measured on an
# idle host under TCG with the tiny image: boot-to-ready 2.47/2.56/3.89 s with
# them against 3.89/2.88/4.30 s without (3 boots each). Crypto self-tests are the
# largest saving; PS/2 probing, extra UARTs, audit and AppArmor are not needed.
FAST_BOOT_ARGS = ("cryptomgr.notests", "no_timer_check", "i8042.noaux", "i8042.nokbd",
                  "i8042.nopnp", "8250.nr_uarts=1", "audit=0", "apparmor=0")


@dataclass(frozen=True)
class Nic:
    """One guest NIC. Exactly one backend: `tap` (an existing tap device name),
    `vde` (a vde_switch control directory), or neither: an isolated NIC
    (user-mode networking with restrict=on: the guest reaches nothing)."""

    mac: str
    tap: str | None = None
    vde: str | None = None


def _nic(n: Nic | dict) -> Nic:
    return n if isinstance(n, Nic) else Nic(**n)


@functools.cache
def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (0 when unknown), which a TCG guest's
    TSC runs at (QEMU reads the host's TSC for it). Given to TCG guests as
    `tsc_early_khz`: a guest kernel then does not calibrate its TSC against
    the emulated PIT, which fails on a busy host; without ACPI's PM timer to
    fall back on (megafleet's minimal kernel) it then marks the TSC unstable,
    keeps time by jiffies and ticks 100 times a second while idle (measured:
    ~200 QEMU wake-ups/s idle against ~10/s with the frequency given).
    From /sys/devices/system/cpu/cpu0/tsc_freq_khz where the kernel exports
    it, else /proc/cpuinfo's "cpu MHz" when the CPU's TSC is constant."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line for line in lines if line.startswith("flags")), "")
        mhz = next((line for line in lines if line.startswith("cpu MHz")), "")
        if " constant_tsc" in flags and mhz:
            return int(float(mhz.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return 0


# The virtio-serial device's ports: port 0 (kept for a console), the agent's
# and the exec channel's. QEMU's default is 31, two virtqueues each, and every
# virtqueue's notifier is one more descriptor that QEMU's main loop polls at
# each of its wakeups. That was most of what the agent and exec channel cost
# an idle TCG guest: the extra CPU was in QEMU's main-loop thread, not in the
# guest's vCPU, and it was there with the device alone, no port used.
# bench/density_qemu.py's idle ratio (agent and exec against neither) went from
# a median of 1.257 to 1.118 with three ports (bench/RESULTS.md, session 6).
SERIAL_PORTS = 3


def qemu_argv(kernel: str | Path, initrd: str | Path, append: str, *, name: str,
              mem_mb: int = 128, vcpus: int = 1, accel: str = "tcg",
              qmp_socket: str | Path | None = None, console_log: str | Path | None = None,
              agent_socket: str | Path | None = None, agent_log: str | Path | None = None,
              exec_socket: str | Path | None = None,
              nics: Sequence[Nic | dict] = (), machine: str = "q35") -> list[str]:
    """The argv of one guest. `append` is the kernel command line (megafleet.*
    parameters from contract.GuestConfig.kernel_args); `console=ttyS0`,
    `panic=-1` and FAST_BOOT_ARGS are added when absent, and under TCG the
    host's TSC frequency (`host_tsc_khz`). The agent port goes to a unix socket that
    QEMU listens on (`agent_socket`, connect to read it) or to a file
    (`agent_log`); the exec port (`exec_socket`) to a unix socket QEMU listens
    on, through which `megafleet.vm.guestexec` runs commands in the guest."""
    check_name(name, "guest name")
    if machine not in ("microvm", "q35", "pc"):
        raise ValueError(f"unsupported machine type {machine!r} (microvm, q35 or pc)")
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"unsupported accelerator {accel!r} (kvm or tcg)")
    pci = machine != "microvm"
    params = append.split()
    if not any(p.startswith("console=") for p in params):
        params.insert(0, "console=ttyS0")
    if not any(p.startswith("panic=") for p in params):
        params.append("panic=-1")
    if accel == "tcg" and (khz := host_tsc_khz()) and not any(p.startswith("tsc_early_khz=") for p in params):
        params.append(f"tsc_early_khz={khz}")
    present = {p.split("=", 1)[0] for p in params}
    params += [a for a in FAST_BOOT_ARGS if a.split("=", 1)[0] not in present]
    machine_opts = [machine, "mem-merge=on"]
    argv = [QEMU, "-name", f"{name},process=mf-{name}", "-nodefaults", "-no-user-config",
            "-no-reboot", "-display", "none", "-vga", "none", "-machine", ",".join(machine_opts),
            "-m", str(int(mem_mb)), "-smp", str(int(vcpus))]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MB}", "-cpu", "qemu64"]
    argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", " ".join(params)]
    if console_log:
        argv += ["-chardev", f"file,id=con0,path={console_log}", "-serial", "chardev:con0"]
    else:
        argv += ["-serial", "null"]
    if qmp_socket:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    if agent_socket or agent_log or exec_socket:
        argv += ["-device", ("virtio-serial-pci" if pci else "virtio-serial-device")
                 + f",max_ports={SERIAL_PORTS}"]
    if agent_socket or agent_log:
        if agent_socket:
            argv += ["-chardev", f"socket,id=agent0,path={agent_socket},server=on,wait=off"]
        else:
            argv += ["-chardev", f"file,id=agent0,path={agent_log}"]
        argv += ["-device", f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME}"]
    if exec_socket:
        argv += ["-chardev", f"socket,id=exec0,path={exec_socket},server=on,wait=off",
                 "-device", f"virtserialport,chardev=exec0,name={EXEC_PORT_NAME}"]
    for i, nic in enumerate(_nic(n) for n in nics):
        if nic.tap and nic.vde:
            raise ValueError(f"NIC {nic.mac}: give a tap or a vde switch, not both")
        if nic.tap:
            check_name(nic.tap, "tap name")
            netdev = f"tap,id=n{i},ifname={nic.tap},script=no,downscript=no"
        elif nic.vde:
            if "," in str(nic.vde):
                raise ValueError(f"VDE path {nic.vde!r} must not contain ','")
            netdev = f"vde,id=n{i},sock={nic.vde}"
        else:
            netdev = f"user,id=n{i},restrict=on"
        device = "virtio-net-pci" if pci else "virtio-net-device"
        argv += ["-netdev", netdev, "-device", f"{device},netdev=n{i},mac={nic.mac}"]
    return argv


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _probe_image() -> tuple[Path, Path] | None:
    """A kernel and initramfs to probe with: the tiny image if built, else any."""
    from megafleet.imagegen import store

    try:
        image = store.find("tiny")
    except store.ImageNotFound:
        images = store.list_images()
        if not images:
            return None
        image = images[0][1]
    return image.kernel, image.initramfs


def wait_for_line(path: Path, marker: str, deadline: float, proc: subprocess.Popen | None = None) -> str | None:
    """Poll a console/agent file until a line containing `marker` appears (returns
    it), the deadline passes or the process exits (returns None)."""
    while time.monotonic() < deadline:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            if marker in line:
                return line
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def _die_with_parent() -> None:
    # In the child between fork and exec: SIGKILL it when the thread that
    # started it dies, so that a probe killed with -9 leaves no QEMU behind
    # (a KVM guest on a PVM host would otherwise hang there forever).
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


def _stop_orphaned_probes(ledger: Ledger) -> None:
    """Probe QEMUs recorded by a probe that is gone (we hold the probe lock, so
    none of them is in use): stop them before starting another."""
    from megafleet import sweep

    for res in ledger.list(owner=LEDGER_OWNER, kind="process"):
        if res.data.get("what") != "kvm probe":
            continue
        p = RecordedProcess(int(res.key), int(res.data["start"]))
        if p.alive() and sweep._creator_gone(res):
            p.stop(grace=2)
        if not p.alive():
            ledger.forget(LEDGER_OWNER, "process", res.key)


def _probe_kvm(kernel: Path, initrd: Path, timeout: float) -> tuple[bool, str]:
    from megafleet.imagegen import scratch

    ledger = Ledger()
    _stop_orphaned_probes(ledger)
    scratch.sweep(paths.run_dir(), "mfi-probe")
    work = scratch.make(paths.run_dir(), "mfi-probe")
    log = work / "console.log"
    argv = qemu_argv(kernel, initrd, "quiet megafleet.name=mfi-kvmprobe megafleet.agent=0",
                     name="mfi-kvmprobe", mem_mb=96, accel="kvm", console_log=log)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    recorded = RecordedProcess.of(proc.pid)
    me = RecordedProcess.of(os.getpid())
    ledger.record(LEDGER_OWNER, "process", str(proc.pid), start=recorded.start, what="kvm probe",
                  by=me.pid, by_start=me.start)
    try:
        start = time.monotonic()
        line = wait_for_line(log, READY_MARKER, start + timeout, proc)
        if line:
            return True, f"KVM runs a guest (ready in {time.monotonic() - start:.1f} s)"
        if proc.poll() is not None:
            err = ((proc.stderr.read() if proc.stderr else b"") or b"").decode(errors="replace").strip().splitlines()
            return False, "KVM failed: " + (err[-1] if err else f"qemu exited {proc.returncode}")
        console = log.read_text(errors="replace") if log.exists() else ""
        stage = "after the BIOS" if not console.strip() else "during boot"
        return False, f"KVM guest hangs {stage} (PVM host?): no readiness in {timeout:.0f} s"
    finally:
        recorded.stop(grace=2)
        proc.wait()
        ledger.forget(LEDGER_OWNER, "process", str(proc.pid))
        shutil.rmtree(work, ignore_errors=True)


def _write_verdict(cache: Path, boot_id: str, accel: str, reason: str) -> None:
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"boot_id": boot_id, "accel": accel, "reason": reason}))
    os.replace(tmp, cache)


def probe_accel(*, refresh: bool = False, timeout: float = PROBE_TIMEOUT_S) -> tuple[str, str]:
    """("kvm" | "tcg", one-line reason). Cached per boot in the state directory."""
    cache = paths.state_dir() / "accel-probe.json"
    boot_id = _boot_id()
    if not refresh:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("boot_id") == boot_id:
                return cached["accel"], cached["reason"]
        except (OSError, ValueError, KeyError):
            pass
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        accel, reason, keep = "tcg", "no usable /dev/kvm: using TCG (software emulation)", True
    else:
        images = _probe_image()
        if images is None:
            return "tcg", "KVM not probed yet (no image built): using TCG"
        # One probe at a time per state directory: a second caller waits for the
        # first one's verdict instead of starting a second guest.
        import fcntl

        with open(paths.state_dir() / "accel-probe.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not refresh:
                try:
                    cached = json.loads(cache.read_text())
                    if cached.get("boot_id") == boot_id:
                        return cached["accel"], cached["reason"]
                except (OSError, ValueError, KeyError):
                    pass
            ok, why = _probe_kvm(*images, timeout)
            accel = "kvm" if ok else "tcg"
            reason = why if ok else f"{why}: falling back to TCG"
            _write_verdict(cache, boot_id, accel, reason)   # before the lock is let go
        keep = True
    if keep:
        _write_verdict(cache, boot_id, accel, reason)
    if accel == "tcg":
        print(f"megafleet: {reason}", file=sys.stderr)
    return accel, reason


def cleanup_leftovers(ledger: Ledger | None = None) -> int:
    """Stop QEMU processes recorded by this module that a crash left running
    (those whose creator is gone: a probe or boot test running right now in
    another process is left alone)."""
    from megafleet import sweep

    ledger = ledger or Ledger()
    stopped = 0
    for res in ledger.list(owner=LEDGER_OWNER, kind="process"):
        proc = RecordedProcess(int(res.key), int(res.data["start"]))
        if proc.alive():
            if not sweep._creator_gone(res):
                continue
            proc.stop(grace=2)
            stopped += 1
        ledger.forget(LEDGER_OWNER, "process", res.key)
    return stopped
