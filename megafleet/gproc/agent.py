"""`megafleet agent`: the process at every host of the fanout tree.

It is started by its parent over SSH and talks to that parent only, through the
session's stdin/stdout (no listening socket: the only way to reach an agent is to
be its parent, authenticated by SSH). The first frame is `setup`, naming this host
and the subtree below it; the agent connects to its own children (with the fleet
key and known_hosts named in setup), answers `ready`, then serves requests until
its stdin closes. End of input (the parent exited, was killed, or closed the
session) cancels everything: running commands are killed, child sessions closed,
so their agents exit in turn; no orphan is left.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from megafleet.gproc import protocol
from megafleet.names import InvalidName, check_name


class SetupError(protocol.ProtocolError):
    pass


def _check_setup(header: dict[str, Any]) -> dict[str, Any]:
    if header.get("t") != "setup":
        raise SetupError(f"first frame must be 'setup', got {header.get('t')!r}")
    host = header.get("host")
    if not isinstance(host, dict):
        raise SetupError("setup.host: expected an object")
    try:
        check_name(host.get("name", ""), "host name")
    except InvalidName as e:
        raise SetupError(f"setup.host.name: {e}") from None
    if not isinstance(header.get("children"), list):
        raise SetupError("setup.children: expected a list of subtrees")
    return header


async def serve_tree(setup: dict[str, Any], already_read: bytes, in_fd: int, out_fd: int) -> None:
    """An inner agent: trio, a Node, and an SSH transport for its children."""
    import trio

    from megafleet.gproc.transport import open_transport

    stdin, stdout = trio.lowlevel.FdStream(in_fd), trio.lowlevel.FdStream(out_fd)
    await run_agent(setup, protocol.FrameReader(stdin, initial=already_read), stdout, open_transport)


async def run_agent(setup: dict[str, Any], reader: protocol.FrameReader, stdout: protocol.ByteStream,
                    open_transport: Any, lookup: Any = None) -> None:
    """The agent's life once `setup` is read: build its subtree, answer `ready`,
    serve the parent's frames from `reader` until it ends, then close the
    children. `open_transport(identity, known_hosts, connect_timeout)` is an
    async context manager giving the object whose `connect(spec)` reaches a
    child (SSH here; the simulator's in-memory links in `gproc.sim`); `lookup`
    replaces `handlers.lookup` (the simulator's hosts). Frames up are written
    to `stdout` whole, one at a time."""
    from contextlib import AsyncExitStack

    import trio

    from megafleet.gproc.node import Node

    me = setup["host"]["name"]
    lock = trio.Lock()

    async def emit_up(header: dict[str, Any], payload: bytes = b"") -> None:
        data = protocol.encode(header, payload)
        # A frame is sent whole or not at all: a cancelled task must never leave
        # half a frame in the stream (the parent would lose the session).
        with trio.CancelScope(shield=True):
            async with lock:
                await stdout.send_all(data)

    creds = {"identity": setup.get("identity"), "known_hosts": setup.get("known_hosts")}
    connect_timeout = float(setup.get("connect_timeout", 15))
    async with AsyncExitStack() as stack:
        transport = await stack.enter_async_context(
            open_transport(creds["identity"], creds["known_hosts"], connect_timeout))
        node = Node(me, emit_up, transport.connect, creds=creds, connect_timeout=connect_timeout,
                    lookup=lookup)
        async with trio.open_nursery() as nursery:
            node.nursery = nursery
            try:
                up, down, _ = await node.attach(setup["children"])
                await emit_up({"t": "ready", "up": up, "down": down})
                while (frame := await reader.read()) is not None:
                    await node.handle(*frame)
            finally:
                await node.close()
                nursery.cancel_scope.cancel()


def main() -> int:
    # The protocol owns the real stdout; anything printed by mistake, and the
    # stdout of commands we run, must not land in it.
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        reader = protocol.SyncFrameReader(proto_in)
        frame = reader.read()
        if frame is None:
            return 0
        setup = _check_setup(frame[0])
        if not setup["children"]:
            # A leaf: plain threads, no trio, no asyncssh (see leaf.py).
            from megafleet.gproc.leaf import Leaf

            Leaf(setup["host"]["name"], reader, proto_out).serve()
            return 0
        import trio

        trio.run(serve_tree, setup, bytes(reader.buf), proto_in, proto_out)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # The parent reads the last stderr line when the agent fails.
        for e in group.exceptions:
            print(f"megafleet agent: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"megafleet agent: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0
