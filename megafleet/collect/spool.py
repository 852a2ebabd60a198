"""The durable local spool: where batches wait while the store is unreachable.

A directory of append-only segment files, replayed oldest first. Each record is

    b"MFS1" | length (u32, big-endian) | crc32 of payload (u32) | payload

where the payload is BSON {"c": collection, "d": [documents]} (BSON keeps
datetimes and number types exactly). A record is fsynced before `append`
returns, so an accepted batch survives a crash of this process.

Replay reads records in order; a record whose magic, length or checksum is wrong
marks the rest of its segment as corrupt: a warning names the segment, the offset
and the bytes skipped, and replay goes on with the next segment. The spool is
bounded (`max_bytes`): when full, `append` refuses sample batches (the pipeline
counts them as dropped) with one clear warning; event batches are still written,
since events are never dropped.

The read position is kept in memory only: after a crash, replay starts again at
the oldest segment, which is harmless because documents have deterministic ids.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import bson

log = logging.getLogger("megafleet.collect.spool")

MAGIC = b"MFS1"
HEADER = struct.Struct(">4sII")
SUFFIX = ".seg"


class SpoolBusy(RuntimeError):
    """Another collector holds this spool directory."""


class Spool:
    """One collector's spool. The directory is locked (flock on its `lock`
    file) for as long as the Spool is open: two writers would interleave
    segments and replay each other's."""

    def __init__(self, directory: Path | str, *, segment_bytes: int = 8 << 20,
                 max_bytes: int = 512 << 20, warn: Callable[[str], None] | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise SpoolBusy(f"telemetry spool {self.dir} is in use by another collector "
                            f"(pid {holder}): give each collector its own spool directory") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.warn = warn or log.warning
        self.full = False            # refusing sample batches until space frees up
        self.corrupt_segments = 0    # segments (partly) skipped during replay
        self._writer: Any = None     # open file of the newest segment
        self._write_path: Path | None = None
        self._read_path: Path | None = None
        self._read_offset = 0

    # -- segments ------------------------------------------------------------------

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("*" + SUFFIX))

    def size(self) -> int:
        total = 0
        for p in self.segments():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def empty(self) -> bool:
        segments = self.segments()
        if not segments:
            return True
        if len(segments) == 1 and segments[0] == self._read_path:
            try:
                return self._read_offset >= segments[0].stat().st_size
            except FileNotFoundError:
                return True
        return False

    def _next_path(self) -> Path:
        segments = self.segments()
        number = int(segments[-1].stem) + 1 if segments else 1
        return self.dir / f"{number:012d}{SUFFIX}"

    # -- writing -------------------------------------------------------------------

    def append(self, collection: str, docs: list[dict[str, Any]], *, force: bool = False) -> bool:
        """Write one batch durably. False (nothing written) when the spool is full
        and `force` is not set."""
        payload = bson.encode({"c": collection, "d": docs})
        record = HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload
        if not force and self.size() + len(record) > self.max_bytes:
            if not self.full:
                self.full = True
                self.warn(f"telemetry spool {self.dir} is full ({self.size() >> 20} MiB of "
                          f"{self.max_bytes >> 20} MiB): dropping sample batches until the "
                          "store is back (events are still kept)")
            return False
        if self.full:
            self.full = False
            self.warn(f"telemetry spool {self.dir} has room again: spooling samples resumes")
        if self._writer is None or self._writer.tell() >= self.segment_bytes:
            self._close_writer()
            self._write_path = self._next_path()
            self._writer = open(self._write_path, "ab")
        self._writer.write(record)
        self._writer.flush()
        os.fsync(self._writer.fileno())
        return True

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._write_path = None

    # -- replaying -----------------------------------------------------------------

    def peek(self) -> tuple[str, list[dict[str, Any]], tuple[Path, int]] | None:
        """The oldest batch not yet committed, as (collection, docs, position), or
        None when the spool is empty. Corrupt data is skipped with a warning."""
        while True:
            segments = self.segments()
            if not segments:
                return None
            path = segments[0]
            if path != self._read_path:
                self._read_path, self._read_offset = path, 0
            try:
                with open(path, "rb") as f:
                    f.seek(self._read_offset)
                    header = f.read(HEADER.size)
                    size = os.fstat(f.fileno()).st_size
                    if not header:
                        if path == self._write_path:
                            return None  # caught up with the writer
                        self._remove(path)
                        continue
                    problem = None
                    if len(header) < HEADER.size:
                        problem = "truncated record header"
                    else:
                        magic, length, crc = HEADER.unpack(header)
                        if magic != MAGIC:
                            problem = "bad record marker"
                        elif self._read_offset + HEADER.size + length > size:
                            problem = f"record of {length} bytes runs past the end"
                        else:
                            payload = f.read(length)
                            if zlib.crc32(payload) != crc:
                                problem = "checksum mismatch"
            except FileNotFoundError:
                continue
            if problem is None:
                try:
                    record = bson.decode(payload)
                    end = self._read_offset + HEADER.size + length
                    return record["c"], record["d"], (path, end)
                except Exception as exc:  # checksum fine, content not ours
                    problem = f"undecodable record ({exc})"
            self.corrupt_segments += 1
            self.warn(f"telemetry spool segment {path} is corrupt at offset "
                      f"{self._read_offset} ({problem}): skipping its remaining "
                      f"{size - self._read_offset} bytes, replaying the rest")
            if path == self._write_path:
                self._close_writer()
            self._remove(path)

    def commit(self, position: tuple[Path, int]) -> None:
        """Mark everything up to `position` (from `peek`) as stored."""
        path, offset = position
        self._read_path, self._read_offset = path, offset
        try:
            done = offset >= path.stat().st_size
        except FileNotFoundError:
            return
        if done:
            if path == self._write_path:
                self._close_writer()
            self._remove(path)
            if self.full and self.size() < self.max_bytes:
                self.full = False

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        if self._read_path == path:
            self._read_path, self._read_offset = None, 0

    def close(self) -> None:
        self._close_writer()
        if not self._lock.closed:
            self._lock.close()  # releases the flock
