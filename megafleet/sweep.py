"""What the ledger records that is still there, and sweeping what nobody owns.

Testbeds are removed by `megafleet down` (megafleet.host.down); guests of the
vm engine by `vm teardown`. The other owners create things for the length of
one command: the KVM probe and image boot tests (owner "imagegen": a QEMU
process, scratch directories, doctor's namespace), image builds' scratch, and
whatever records a `by` (pid) and `by_start` with it. When that command was
killed, they stay: `sweep` removes those whose creator is gone, and is run by
`down` with no testbed named and by `vm teardown`.

`leftovers` lists every recorded resource that is still present, for
`megafleet doctor --leftovers`.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megafleet import paths, proc
from megafleet.ledger import Ledger, Resource

# Owners whose records live as long as a testbed or guest, not a command.
LASTING = {"up", "up-controller", "net", "vm", "cgroup", "lock", "gproc-testfleet"}


@dataclass(frozen=True)
class Leftover:
    """One recorded resource that is present: owner, kind and key as in the ledger;
    `what` a short description; `state` "running" (a live process), "present"
    (an object or file that exists) or "recorded" (a record of something up,
    such as a testbed); `orphan` when its creator is gone and nothing else
    will remove it but a sweep."""

    owner: str
    kind: str
    key: str
    what: str
    state: str
    orphan: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _process(r: Resource) -> proc.RecordedProcess | None:
    d = r.data
    pid = d.get("pid")
    start = d.get("start", d.get("pid_start"))
    if pid is None and r.key.isdigit():
        pid = int(r.key)
    if pid is not None and start is not None:
        return proc.RecordedProcess(int(pid), int(start))
    if d.get("pidfile"):
        try:
            return proc.RecordedProcess.of(int(Path(d["pidfile"]).read_text().strip()))
        except (OSError, ValueError, ProcessLookupError):
            return None
    return None


def _creator_gone(r: Resource) -> bool:
    """True when the recording command is known to be dead: its `by` pid (and
    start) is gone, or, for a process recorded without `by`, it was orphaned
    (re-parented away from whoever started it)."""
    by = r.data.get("by")
    if by is not None:
        return not proc.RecordedProcess(int(by), int(r.data.get("by_start", -1))).alive() \
            if "by_start" in r.data else proc.start_time(int(by)) is None
    if r.kind == "process":
        p = _process(r)
        if p is None or not p.alive():
            return True
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            return True
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 1)
        return ppid == 1 or proc.start_time(ppid) is None
    return False


def present(r: Resource) -> str | None:
    """"running", "present", "recorded" or None (gone) for one ledger record."""
    d = r.data
    if r.kind in ("process", "sshd"):
        p = _process(r)
        return "running" if p is not None and p.alive() else None
    if r.kind == "netns":
        return "present" if Path("/run/netns", d.get("ns", r.key)).exists() else None
    if r.kind in ("link", "veth", "bridge", "tap"):
        return "present" if Path("/sys/class/net", d.get("ifname", r.key)).exists() else None
    if r.kind in ("dir", "file", "scratch"):
        path = d.get("path")
        return "present" if path and Path(path).exists() else None
    if r.kind == "cgroup":
        return "present" if Path(r.key).exists() else None
    if r.kind == "mount":
        from megafleet.vm.guestdirs import is_mount_point

        return "present" if is_mount_point(Path(r.key)) else None
    return "recorded"


def _what(r: Resource) -> str:
    d = r.data
    for key in ("what", "testbed", "guest", "ns", "ifname", "path", "source"):
        if d.get(key):
            return str(d[key])
    return ""


def leftovers(ledger: Ledger | None = None) -> list[Leftover]:
    """Every recorded resource still present, oldest first."""
    ledger = ledger or Ledger()
    out = []
    for r in ledger.list():
        state = present(r)
        if state is None:
            continue
        orphan = r.owner not in LASTING and _creator_gone(r)
        out.append(Leftover(r.owner, r.kind, r.key, _what(r), state, orphan))
    return out


def sweep(ledger: Ledger | None = None) -> dict[str, int]:
    """Remove what commands that died left behind (see the module text): their
    processes stopped, directories removed, namespaces deleted, records
    forgotten; testbed cgroups no testbed record owns killed and removed. Never
    touches what a live command or a testbed that is up still uses. Returns
    counts by kind of what went."""
    from megafleet import cgroup, locks
    from megafleet.imagegen import scratch

    ledger = ledger or Ledger()
    counts = {"processes": 0, "dirs": 0, "namespaces": 0, "cgroups": 0, "scratch": 0}
    for r in ledger.list():
        if r.owner in LASTING:
            continue
        if r.kind == "process":
            p = _process(r)
            if p is not None and p.alive():
                if not _creator_gone(r):
                    continue            # its command is still running: it removes it
                p.stop(grace=2)
                counts["processes"] += 1
            ledger.forget(r.owner, r.kind, r.key)
        elif r.kind in ("dir", "scratch", "file") and _creator_gone(r):
            path = r.data.get("path")
            if path and Path(path).exists():
                if Path(path).is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    Path(path).unlink(missing_ok=True)
                counts["dirs"] += 1
            ledger.forget(r.owner, r.kind, r.key)
    # doctor's throwaway namespaces (their creator's pid is in the name).
    from megafleet.doctor import _remove_stale_namespaces

    before = len(ledger.list("imagegen", "netns"))
    _remove_stale_namespaces(ledger)
    counts["namespaces"] += before - len(ledger.list("imagegen", "netns"))
    # Scratch directories carry their creator's pid in their name.
    for prefix in ("mfi-probe", "mfi-boot"):
        counts["scratch"] += scratch.sweep(paths.run_dir(), prefix)
    counts["cgroups"] += cgroup.sweep(ledger)
    # Lock files of testbeds that are gone.
    up = {r.key for r in ledger.list("up", "testbed")} | {r.key for r in ledger.list("net", "testbed")}
    for r in ledger.list(locks.OWNER, "file"):
        if r.key not in up:
            locks.forget(r.key)
    return counts
