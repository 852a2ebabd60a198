"""Run a command inside a QEMU or libvirt guest, through its exec channel.

The guest's virtio-serial port org.megafleet.exec is a unix socket on the host
(``exec.sock`` in the guest's directory, QEMU listening); the image's exec
daemon (megafleet/imagegen/guest/guestd.c) serves it. The line format is in
`megafleet.imagegen.contract`: one request, one answer, matched by a random id
(an answer to an earlier, abandoned request is skipped).

The argv travels quoted word by word (shlex) and the guest's shell evaluates
the quoted words: exactly that argv runs, no word of it is interpreted. QEMU
serves one connection at a time, so requests to one guest are serialised.
"""

from __future__ import annotations

import base64
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

import trio

from megafleet.imagegen.contract import EXEC_MARKER

MAX_ANSWER = 64 << 20          # base64 of a command's stdout and stderr, at most


class GuestExecError(Exception):
    """The guest could not be asked, or did not answer in time."""


@dataclass
class GuestExecResult:
    rc: int
    stdout: bytes
    stderr: bytes


def exec_socket(guest: str, handle: dict | None) -> Path:
    """The exec channel of a QEMU or libvirt guest, as its driver recorded it in
    the guest's handle (None: no record of the guest)."""
    path = (handle or {}).get("exec")
    if not path:
        raise GuestExecError(f"{guest}: no exec channel recorded (not a QEMU or libvirt guest, "
                             "or booted by a megafleet without one)")
    return Path(path)


def request_line(request_id: str, argv: list[str]) -> bytes:
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("exec needs a command (a list of words)")
    words = base64.b64encode(shlex.join(argv).encode()).decode()
    return f"{request_id} {words}\n".encode()


def parse_answer(line: bytes, request_id: str) -> GuestExecResult | None:
    """The result in an answer line, or None when the line answers another
    request (or is not an answer at all)."""
    fields = line.decode(errors="replace").split(" ")
    if fields[0] != EXEC_MARKER:
        return None
    kv = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    if kv.get("id") != request_id:
        return None
    try:
        return GuestExecResult(int(kv["rc"]), base64.b64decode(kv.get("out", "")),
                               base64.b64decode(kv.get("err", "")))
    except (KeyError, ValueError) as exc:
        raise GuestExecError(f"malformed answer from the guest: {exc}") from None


async def exec_in_guest(sock: str | Path, argv: list[str], timeout: float = 30.0) -> GuestExecResult:
    """Run argv in the guest behind `sock`; its exit status, stdout and stderr."""
    request_id = secrets.token_hex(8)
    request = request_line(request_id, argv)
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_unix_socket(str(sock))
        except OSError as exc:
            raise GuestExecError(f"cannot reach the guest's exec channel {sock}: {exc}") from None
        async with stream:
            await stream.send_all(request)
            buf = bytearray()
            while True:
                chunk = await stream.receive_some(1 << 16)
                if not chunk:
                    raise GuestExecError("the guest closed its exec channel without answering")
                buf += chunk
                while b"\n" in buf:
                    line, _, rest = bytes(buf).partition(b"\n")
                    buf = bytearray(rest)
                    result = parse_answer(line, request_id)
                    if result is not None:
                        return result
                if len(buf) > MAX_ANSWER:
                    raise GuestExecError(f"answer larger than {MAX_ANSWER >> 20} MiB")
    assert scope.cancelled_caught
    raise GuestExecError(f"no answer within {timeout:g} s (the guest's image may lack the exec "
                         "channel: rebuild it with this megafleet)")
