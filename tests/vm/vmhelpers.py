"""Helpers of the vm tests: find our QEMU processes, check nothing is left."""

from __future__ import annotations

from pathlib import Path

from megafleet.ledger import Ledger
from megafleet.vm.engine import guests_dir
from megafleet.vm.guestdirs import is_mount_point
from megafleet.vm.state import OWNER, VmState

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def qemu_pids(prefix: str) -> list[int]:
    """QEMU processes whose guest name starts with `prefix` (ours only)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or not argv or not argv[0].endswith(b"qemu-system-x86_64"):
            continue
        text = b" ".join(argv).decode(errors="replace")
        if f"guest={prefix}" in text or f"-name {prefix}" in text:
            out.append(int(d.name))
    return out


def live_pids(pids) -> list[int]:
    """Those of `pids` that are still running (zombies do not count)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def assert_nothing_left(prefix: str) -> None:
    """No record, directory, socket or process of guests named prefix* remains."""
    assert [r for r in VmState().list(prefix + "*")] == []
    leftovers = [r for r in Ledger().list(owner=OWNER) if str(r.data.get("guest", "")).startswith(prefix)]
    assert leftovers == []
    assert [p.name for p in guests_dir().iterdir() if p.name.startswith(prefix)] == []
    assert qemu_pids(prefix) == []
    # No mount under the guests' directory; its own tmpfs (megafleet.vm.guestdirs)
    # only while some guest is on record.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(guests_dir()) + "/" not in mounts
    if not VmState().list():
        assert not is_mount_point(guests_dir())
