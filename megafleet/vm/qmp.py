"""A minimal QMP (QEMU Machine Protocol) client: connect to a guest's unix socket,
negotiate, run one command. Blocking; the engine calls it through
trio.to_thread.run_sync with a limiter."""

from __future__ import annotations

import json
import socket
from typing import Any


class QMPError(RuntimeError):
    pass


def command(sock_path: str, execute: str, arguments: dict[str, Any] | None = None,
            timeout: float = 5.0) -> Any:
    """Run one QMP command and return its "return" value. For "quit", QEMU may
    close the socket before answering: that counts as success."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        reader = s.makefile("rb")
        greeting = _read_reply(reader)
        if "QMP" not in greeting:
            raise QMPError(f"{sock_path}: not a QMP greeting: {greeting!r}")
        _send(s, {"execute": "qmp_capabilities"})
        _read_reply(reader)
        message: dict[str, Any] = {"execute": execute}
        if arguments:
            message["arguments"] = arguments
        _send(s, message)
        try:
            reply = _read_reply(reader)
        except (ConnectionError, QMPError):
            if execute == "quit":
                return {}
            raise
        if "error" in reply:
            raise QMPError(f"{execute}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")


def _send(s: socket.socket, message: dict[str, Any]) -> None:
    s.sendall(json.dumps(message).encode() + b"\n")


def _read_reply(reader) -> dict[str, Any]:
    """Next line that is a greeting or a reply (asynchronous events are skipped)."""
    while True:
        line = reader.readline()
        if not line:
            raise QMPError("QMP socket closed")
        message = json.loads(line)
        if "event" not in message:
            return message
