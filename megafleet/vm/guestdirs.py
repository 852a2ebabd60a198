"""Where the guests' directories live: a tmpfs of megafleet's own when the run
directory is on a disk.

Each guest has a directory under ``RUN/vm/NAME``: its console log, pid file,
sockets and, for a container, the overlay's upper and work layers. They live
as long as the guest and hold nothing worth keeping past it, which is why
Debian's /run is a tmpfs. Where the run directory is on a disk filesystem
instead (this project's test machine: / is ext4 with online discard, and
/run is on it), creating and removing them costs the journal and the discard:
`vm teardown` of 5,000 containers took 18.7 s with their directories there and
5.5 s on a tmpfs, their `down` through `megafleet up` 20.4 s and 13.2 s
(bench/density.py, bench/RESULTS.md, session 4).

So, run as root on such a host, the engine mounts a tmpfs on ``RUN/vm`` before
it records its first guest and unmounts it after its last guest is gone.
The mount is recorded in the ledger (owner "vm", kind "mount") before it is
made and forgotten after it is undone, like everything else; a host lock
(``flock`` on the run directory) orders the mount and the first guest's
record against the unmount and the last record's removal, so concurrent
engines never pull it from under each other's guests. Not root, or /run on a
tmpfs already: plain directories, as before.

The tmpfs takes RAM only for what guests write there (console logs, a
container's writes to its root): guests are RAM-only by design.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from pathlib import Path
from typing import Iterator

from megafleet import paths
from megafleet.ledger import Ledger

OWNER = "vm"
KIND = "mount"
# Filesystems that keep their files in memory already: nothing to gain.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def guests_dir() -> Path:
    """``RUN/vm``, the parent of every guest's directory (created if missing)."""
    path = paths.run_dir() / "vm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _unescape(field: str) -> str:
    """A mountinfo path field: spaces, tabs, newlines and backslashes are octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of this mount namespace, in mount order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            out.append((_unescape(fields[4]), right.split()[0]))
    return out


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` (which exists) is on: "ext4", "tmpfs", ..."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    for point, kind in _mounts():
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):      # the last of equal points is on top
            best, fstype = point, kind
    return fstype


def is_mount_point(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(point == target for point, _ in _mounts())


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Held while the tmpfs is mounted with a first guest recorded, or a last
    guest is forgotten and it is unmounted: one engine at a time (an flock on
    the run directory itself, so no lock file is left)."""
    fd = os.open(paths.run_dir(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def wanted(base: Path) -> bool:
    """Whether guests' directories under `base` should get a tmpfs of their own:
    run as root, and `base` is on a disk filesystem."""
    return os.geteuid() == 0 and filesystem_of(base) not in MEMORY_FILESYSTEMS


def ensure_tmpfs(ledger: Ledger) -> None:
    """Mount the guests' tmpfs on ``RUN/vm`` if it is wanted and not there yet
    (recorded first). Call with `host_lock` held, and record the new guests
    before releasing it. Raises OSError naming the mount when it fails."""
    base = guests_dir()
    if is_mount_point(base) or not wanted(base):
        return
    if any(base.iterdir()):
        # Directories of guests from before this rule (or of another run that
        # did not mount): mounting over them would hide them from teardown.
        return
    ledger.record(OWNER, KIND, str(base), path=str(base), fstype="tmpfs",
                  what="tmpfs of the guests' directories")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev",
                           "megafleet-guests", str(base)], capture_output=True, text=True)
    if done.returncode != 0:
        ledger.forget(OWNER, KIND, str(base))
        raise OSError(f"mounting a tmpfs on {base} for the guests' directories: "
                      f"{done.stderr.strip() or 'mount exited ' + str(done.returncode)}")


def release_tmpfs(ledger: Ledger) -> None:
    """Unmount the guests' tmpfs (recorded by `ensure_tmpfs`) and forget it.
    Call with `host_lock` held, once no guest is recorded any more. A mount
    still in use by a stray process is detached (lazy unmount): it goes with
    that process."""
    # Only this run directory's: another one's mount has guests of its own.
    base = guests_dir()
    if not any(res.key == str(base) for res in ledger.list(OWNER, KIND)):
        return
    if is_mount_point(base):
        done = subprocess.run(["umount", str(base)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "--lazy", str(base)], capture_output=True, check=False)
    if not is_mount_point(base):
        ledger.forget(OWNER, KIND, str(base))
