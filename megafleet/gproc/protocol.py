"""The framed message protocol spoken between a parent and an agent.

One frame is::

    +----------------+----------------+------------------+-----------------+
    | header length  | payload length | header (JSON,    | payload (raw    |
    | 4 bytes, BE    | 4 bytes, BE    | UTF-8 object)    | bytes, may be 0)|
    +----------------+----------------+------------------+-----------------+

The header is a JSON object with at least a "t" (type) key; the payload carries
bulk data (file chunks, process output) without any encoding cost. Both lengths
are checked against limits *before* anything is read or allocated, so a peer
cannot make us buffer more than MAX_HEADER + MAX_PAYLOAD bytes.

The protocol runs over any byte stream with `send_all(bytes)` and
`receive_some(max_bytes)` (a trio stream, the agent's stdin/stdout, or an SSH
channel from `transport.py`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Protocol

PREFIX = struct.Struct(">II")
# A call carries the manifests of a whole subtree: at a million guests on 4,480
# hosts, fanout 16, a subtree below the root is 280 hosts of ~200 KB each.
MAX_HEADER = 256 << 20     # 256 MiB of JSON
MAX_PAYLOAD = 4 << 20      # 4 MiB of raw bytes per frame (push chunks are 256 KiB)


class ProtocolError(RuntimeError):
    """The peer sent something that is not a valid frame: the session is unusable."""


class ConnectFailed(RuntimeError):
    """A host could not be reached, refused us, or its agent did not start; the
    message says which host and why."""


class ByteStream(Protocol):
    async def send_all(self, data: bytes) -> None: ...
    async def receive_some(self, max_bytes: int) -> bytes: ...


def encode(header: dict[str, Any], payload: bytes = b"", *,
           max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> bytes:
    """One frame as bytes. Raises ProtocolError if it would exceed the limits."""
    if "t" not in header:
        raise ProtocolError(f"frame header without a type: {header!r}")
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > max_header:
        raise ProtocolError(f"{header['t']} header of {len(raw)} bytes exceeds the limit of {max_header}")
    if len(payload) > max_payload:
        raise ProtocolError(f"{header['t']} payload of {len(payload)} bytes exceeds the limit of {max_payload}")
    return PREFIX.pack(len(raw), len(payload)) + raw + bytes(payload)


def _frame_size(buf: bytearray, max_header: int, max_payload: int) -> tuple[int, int]:
    """(header length, payload length) of the frame at the start of buf, checked."""
    hlen, plen = PREFIX.unpack_from(buf)
    if hlen == 0 or hlen > max_header:
        raise ProtocolError(f"frame header length {hlen} outside 1..{max_header}")
    if plen > max_payload:
        raise ProtocolError(f"frame payload length {plen} exceeds the limit of {max_payload}")
    return hlen, plen


def _take_frame(buf: bytearray, hlen: int, plen: int) -> tuple[dict[str, Any], bytes]:
    total = PREFIX.size + hlen + plen
    try:
        header = json.loads(bytes(buf[PREFIX.size:PREFIX.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise ProtocolError("frame header is not a JSON object with a string 't'")
    payload = bytes(buf[PREFIX.size + hlen:total])
    del buf[:total]
    return header, payload


class SyncFrameReader:
    """Blocking reader on a file descriptor, for the light leaf agent (no trio)."""

    def __init__(self, fd: int, *, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD):
        self.fd = fd
        self.max_header = max_header
        self.max_payload = max_payload
        self.buf = bytearray()

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            data = os.read(self.fd, max(1 << 18, n - len(self.buf)))
            if not data:
                return False
            self.buf += data
        return True

    def read(self) -> tuple[dict[str, Any], bytes] | None:
        if not self._fill(PREFIX.size):
            if self.buf:
                raise ProtocolError(f"stream ended inside a frame prefix ({len(self.buf)} bytes)")
            return None
        hlen, plen = _frame_size(self.buf, self.max_header, self.max_payload)
        if not self._fill(PREFIX.size + hlen + plen):
            raise ProtocolError(f"stream ended inside a frame ({len(self.buf)} of "
                                f"{PREFIX.size + hlen + plen} bytes)")
        return _take_frame(self.buf, hlen, plen)


class FrameReader:
    """Reads whole frames from a byte stream, buffering partial reads. `initial`
    is data already read from the stream (by a SyncFrameReader)."""

    def __init__(self, stream: ByteStream, *, max_header: int = MAX_HEADER,
                 max_payload: int = MAX_PAYLOAD, read_size: int = 1 << 18, initial: bytes = b""):
        self.stream = stream
        self.max_header = max_header
        self.max_payload = max_payload
        self.read_size = read_size
        self._buf = bytearray(initial)
        self._eof = False

    async def _fill(self, n: int) -> bool:
        """Make at least n bytes available. False on EOF before that."""
        while len(self._buf) < n:
            if self._eof:
                return False
            data = await self.stream.receive_some(self.read_size)
            if not data:
                self._eof = True
                return False
            self._buf += data
        return True

    async def read(self) -> tuple[dict[str, Any], bytes] | None:
        """The next frame, or None on a clean end of stream between frames."""
        if not await self._fill(PREFIX.size):
            if self._buf:
                raise ProtocolError(f"stream ended inside a frame prefix ({len(self._buf)} bytes)")
            return None
        hlen, plen = _frame_size(self._buf, self.max_header, self.max_payload)
        total = PREFIX.size + hlen + plen
        if not await self._fill(total):
            raise ProtocolError(f"stream ended inside a frame ({len(self._buf)} of {total} bytes)")
        return _take_frame(self._buf, hlen, plen)
