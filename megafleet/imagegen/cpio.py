"""A reproducible writer (and reader) for the cpio "newc" format the kernel unpacks.

Why our own: we need device nodes (/dev/console) and root ownership without
being root, and byte-identical output: entries sorted by path, every mtime fixed
at 0, inode numbers assigned in order, uid/gid 0. Hard links are written as
separate files (simpler, and the compressor removes the duplication).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One file of the image. `path` has no leading slash ("bin/busybox")."""

    path: str
    mode: int                  # full st_mode: type bits and permissions
    data: bytes | None = None  # regular files: contents (or use `source`)
    source: Path | None = None  # regular files: read from here when written
    target: str | None = None  # symlinks
    rdev: tuple[int, int] = (0, 0)  # device nodes: (major, minor)

    def content(self) -> bytes:
        if stat.S_ISLNK(self.mode):
            return (self.target or "").encode()
        if stat.S_ISREG(self.mode):
            if self.data is not None:
                return self.data
            return self.source.read_bytes() if self.source else b""
        return b""


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def write(entries: Iterable[Entry], out: BinaryIO) -> int:
    """Write entries sorted by path; returns the number of bytes written."""
    written = 0
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        body = entry.content()
        name = entry.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        head = _header(ino, entry.mode, nlink, len(body), entry.rdev, len(name))
        chunk = head + name + _pad(len(head) + len(name)) + body + _pad(len(body))
        out.write(chunk)
        written += len(chunk)
    name = TRAILER.encode() + b"\0"
    head = _header(0, 0, 1, 0, (0, 0), len(name))
    chunk = head + name + _pad(len(head) + len(name))
    out.write(chunk)
    return written + len(chunk)


def read(data: bytes) -> Iterator[Entry]:
    """Entries of a newc archive (as written above, or by `cpio -H newc`)."""
    at = 0
    while at + 110 <= len(data):
        if data[at:at + 6] not in (MAGIC, b"070702"):
            raise ValueError(f"not a newc cpio archive at byte {at}")
        f = [int(data[at + 6 + 8 * i: at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        at += 110
        name = data[at:at + namesize - 1].decode()
        at += namesize + (-(110 + namesize) % 4)
        body = data[at:at + size]
        at += size + (-size % 4)
        if name == TRAILER:
            return
        if stat.S_ISLNK(mode):
            yield Entry(name, mode, target=body.decode())
        elif stat.S_ISREG(mode):
            yield Entry(name, mode, data=body)
        else:
            yield Entry(name, mode, rdev=(rmaj, rmin))


def extract(entries: Iterable[Entry], root: Path) -> None:
    """Write entries below `root`. Device nodes are skipped (a container runtime
    provides /dev); ownership is that of the caller."""
    for e in entries:
        path = root / e.path
        if stat.S_ISDIR(e.mode):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, stat.S_IMODE(e.mode))
        elif stat.S_ISLNK(e.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            assert e.target is not None, e.path       # a symlink entry carries its target
            os.symlink(e.target, path)
        elif stat.S_ISREG(e.mode):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(e.content())
            os.chmod(path, stat.S_IMODE(e.mode))
