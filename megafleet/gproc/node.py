"""One node of the fanout tree: the relay logic shared by the root and every agent.

A Node holds SSH sessions to its direct children, forwards each request into the
subtrees that contain a target, runs the request locally when its own host is a
target, and passes every child's messages up. It answers for exactly one result
per target host of its subtree: its own, those relayed from its children, and
those of hosts it could not reach or lost.

Messages down (parent -> agent), all frames of `protocol`:

    setup  {host, children, identity, known_hosts, connect_timeout}  (first frame)
    req    {id, op: exec|call|push, targets, timeout, ...}
    chunk  {id} + payload      push data, in order
    end    {id}                end of push data
    cancel {id}

Messages up (agent -> parent):

    ready    {up: [names], down: {name: why}}      answer to setup
    out      {id, host, fd} + payload              exec output (fd 1 or 2)
    ev       {id, host, data}                      progress from a call handler (leaf)
    evs      {id, events: [[host, data], ...]}     progress of a subtree, coalesced
    res      {id, host, status, ...}               the final result of one host
    reattach {lost, up, down}                      a child died; its subtree re-attached

Re-attachment: when a child's session ends (its agent died, its host went away),
the node marks that host failed for the operations in flight, then connects
*directly* to the lost agent's children (their agents exited with their parent, so
each subtree is built again from the same layout) and re-sends every operation in
flight to the hosts that have no result yet. A push is re-sent from this node's
own copy (written while forwarding) once that copy is complete.

Progress is coalesced per subtree: a handler's events are snapshots (the latest
one says all), so each node keeps only the latest event of each host of its
subtree and sends them up together, at most every EV_FLUSH_S, in one `evs`
frame (and before that host's result). The controller then gets about
hosts / EV_FLUSH_S events a second at most, in few frames, whatever the number
of guests or how often hosts report.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from megafleet.gproc import handlers, protocol, tree
from megafleet.gproc.protocol import ConnectFailed

CHUNK = 256 * 1024
QUEUE_FRAMES = 32        # frames buffered per child before the sender applies back-pressure
EV_FLUSH_S = 0.5         # progress of a subtree goes up at most this often
Emit = Callable[[dict[str, Any], bytes], Awaitable[None]]
Connect = Callable[[dict[str, Any]], Awaitable[Any]]

_disk = trio.CapacityLimiter(4)


@dataclass
class Child:
    subtree: tree.Subtree
    session: Any
    reader: protocol.FrameReader
    names: set[str]
    send_q: trio.MemorySendChannel
    recv_q: trio.MemoryReceiveChannel
    alive: bool = True
    why: str = ""
    ready: dict[str, Any] = field(default_factory=dict)    # its agent's `ready` answer to setup

    @property
    def name(self) -> str:
        return self.subtree["host"]["name"]

    async def send(self, header: dict[str, Any], payload: bytes = b"") -> bool:
        if not self.alive:
            return False
        try:
            await self.send_q.send(protocol.encode(header, payload))
            return True
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False


@dataclass
class PushSink:
    """This node's copy of a pushed file: the destination's temporary file when
    this host is a target, a spool file otherwise (kept to re-send on
    re-attachment). Written by one task fed through a channel, so the relay loop
    forwards the next chunk while the previous one is being written."""

    path: str
    final: str | None
    mode: int
    send: trio.MemorySendChannel
    recv: trio.MemoryReceiveChannel
    digest: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    fd: int = -1


@dataclass
class Op:
    id: str
    req: dict[str, Any]
    targets: set[str]
    pending: set[str]
    forwarded: set[str] = field(default_factory=set)   # children that got the live request
    resent: set[str] = field(default_factory=set)      # children that got it replayed
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    sink: PushSink | None = None
    source: str | None = None           # a complete local copy to re-send from
    complete: trio.Event = field(default_factory=trio.Event)
    started: float = field(default_factory=trio.current_time)


class Node:
    def __init__(self, me: str | None, emit_up: Emit, connect: Connect | None, *,
                 creds: dict[str, Any], connect_timeout: float = 15.0,
                 lookup: Callable[[str, list[str]], handlers.Handler] | None = None):
        self.me = me                       # this host's name; None at the root
        # How a `call` finds its handler: the registry, or the simulator's hosts.
        self.lookup = lookup or handlers.lookup
        self._events: dict[str, dict[str, Any]] = {}   # op id -> {host: latest progress}
        self._flush_scheduled = False
        self.emit_up = emit_up
        self.connect = connect
        self.creds = creds                 # identity / known_hosts passed to children
        self.connect_timeout = connect_timeout
        self.children: dict[str, Child] = {}
        self.down: dict[str, str] = {}     # hosts this node tried itself and could not use
        self.ops: dict[str, Op] = {}
        self.nursery: trio.Nursery | None = None
        self.settled = trio.Event()        # no re-attachment in progress
        self.settled.set()
        self._reattaching = 0
        self.closing = False

    # --- building the tree ---------------------------------------------------

    async def attach(self, subtrees: list[tree.Subtree]) -> tuple[list[str], dict[str, str], list[Child]]:
        """Connect to the head of each subtree and have it build the rest. A head
        that cannot be reached is recorded down and its own children are attached
        directly to this node instead. Returns (up, down, new direct children)."""
        up: list[str] = []
        down: dict[str, str] = {}
        new: list[Child] = []

        async def one(st: tree.Subtree) -> None:
            name = st["host"]["name"]
            try:
                child = await self._open_child(st)
                header = child.ready
            except ConnectFailed as e:
                down[name] = str(e)
                self.down[name] = str(e)
                sub_up, sub_down, sub_new = await self.attach(st["children"])
                up.extend(sub_up)
                down.update(sub_down)
                new.extend(sub_new)
                return
            self.down.pop(name, None)
            up.append(name)
            up.extend(header.get("up", []))
            down.update(header.get("down", {}))
            new.append(child)

        async with trio.open_nursery() as n:
            for st in subtrees:
                n.start_soon(one, st)
        for child in new:
            self.children[child.name] = child
            assert self.nursery is not None
            self.nursery.start_soon(self._run_child, child)
        return up, down, new

    async def _open_child(self, st: tree.Subtree) -> Child:
        spec = st["host"]
        if self.connect is None:
            raise ConnectFailed(f"{spec['name']}: this node has no SSH transport")
        # A head builds its own subtree before it answers: give it time for each level.
        budget = self.connect_timeout * (tree.depth([st]) + 1) * 2 + 5
        session = None
        try:
            with trio.fail_after(budget):
                session = await self.connect(spec)
                reader = protocol.FrameReader(session)
                await session.send_all(protocol.encode({
                    "t": "setup", "host": spec, "children": st["children"],
                    "connect_timeout": self.connect_timeout, **self.creds}))
                frame = await reader.read()
            if frame is None:
                tail = session.stderr_tail()
                raise ConnectFailed(f"{spec['name']}: the agent exited during setup"
                                    + (f": {tail.splitlines()[-1]}" if tail else ""))
            header, _ = frame
            if header["t"] != "ready":
                raise ConnectFailed(f"{spec['name']}: expected 'ready' from the agent, got {header['t']!r}")
        except ConnectFailed:
            if session is not None:
                await session.aclose()
            raise
        except trio.TooSlowError:
            if session is not None:
                await session.aclose()
            raise ConnectFailed(f"{spec['name']}: agent not ready within {budget:g} s") from None
        except (protocol.ProtocolError, trio.BrokenResourceError, OSError) as e:
            if session is not None:
                await session.aclose()
            raise ConnectFailed(f"{spec['name']}: {e}") from None
        send_q, recv_q = trio.open_memory_channel(QUEUE_FRAMES)
        child = Child(st, session, reader, set(tree.names(st)), send_q, recv_q, ready=header)
        return child

    async def _run_child(self, child: Child) -> None:
        """Pump one child's session in both directions until it ends."""
        async def sender() -> None:
            async for frame in child.recv_q:
                await child.session.send_all(frame)

        async def reader() -> None:
            while True:
                frame = await child.reader.read()
                if frame is None:
                    return
                await self._from_child(child, *frame)

        why = ["session closed"]
        try:
            async with trio.open_nursery() as n:
                async def run(fn):
                    try:
                        await fn()
                    except (protocol.ProtocolError, trio.BrokenResourceError,
                            trio.ClosedResourceError, OSError) as e:
                        why[0] = str(e) or type(e).__name__
                    n.cancel_scope.cancel()
                n.start_soon(run, sender)
                n.start_soon(run, reader)
        finally:
            child.alive = False
            child.send_q.close()
            with trio.CancelScope(shield=True):
                await child.session.aclose()
        if self.closing or self.children.get(child.name) is not child:
            return
        tail = child.session.stderr_tail()
        child.why = f"agent on {child.name} lost ({why[0]}" + (f"; {tail.splitlines()[-1]}" if tail else "") + ")"
        await self._lost(child)

    async def _lost(self, child: Child) -> None:
        del self.children[child.name]
        self.down[child.name] = child.why
        self._reattaching += 1
        self.settled = trio.Event()
        try:
            for op in list(self.ops.values()):
                await self.result(op, child.name, "failed", error=child.why)
            up, down, new = await self.attach(child.subtree["children"])
            await self.emit_up({"t": "reattach", "lost": child.name, "why": child.why,
                                "up": up, "down": down}, b"")
            for op in list(self.ops.values()):
                for name, why in down.items():
                    await self.result(op, name, "unreachable", error=why)
                for new_child in new:
                    wanted = op.pending & new_child.names
                    if wanted:
                        assert self.nursery is not None
                        self.nursery.start_soon(self._resend, op, new_child, wanted)
        finally:
            self._reattaching -= 1
            if not self._reattaching:
                self.settled.set()

    # --- messages ------------------------------------------------------------

    async def _from_child(self, child: Child, header: dict[str, Any], payload: bytes) -> None:
        kind = header["t"]
        if kind == "res":
            op = self.ops.get(header.get("id", ""))
            if op is not None and header.get("host") in child.names:
                fields = {k: v for k, v in header.items() if k not in ("t", "id", "host", "status")}
                await self.result(op, header["host"], header["status"], **fields)
        elif kind == "out":
            if header.get("id") in self.ops and header.get("host") in child.names:
                await self.emit_up(header, payload)
        elif kind == "ev":
            if header.get("id") in self.ops and header.get("host") in child.names:
                await self.progress(header["id"], header["host"], header.get("data"))
        elif kind == "evs":
            if header.get("id") in self.ops:
                for host, data in header.get("events", []):
                    if host in child.names:
                        await self.progress(header["id"], host, data)
        elif kind == "reattach":
            await self.emit_up(header, payload)
        else:
            raise protocol.ProtocolError(f"unexpected {kind!r} frame from {child.name}")

    async def handle(self, header: dict[str, Any], payload: bytes) -> None:
        """A frame from the parent."""
        kind = header["t"]
        if kind == "req":
            await self.start_op(header)
        elif kind == "chunk":
            await self.push_chunk(header["id"], payload)
        elif kind == "end":
            await self.push_end(header["id"])
        elif kind == "cancel":
            await self.cancel(header["id"])
        else:
            raise protocol.ProtocolError(f"unexpected {kind!r} frame from the parent")

    async def result(self, op: Op, host: str, status: str, **fields: Any) -> None:
        """Record and pass up the one result of `host` for `op` (later ones are dropped)."""
        if host not in op.pending or self.ops.get(op.id) is not op:
            return
        if host in self._events.get(op.id, ()):
            await self._flush_events(op.id)     # a host's last progress before its result
        op.pending.discard(host)
        await self.emit_up({"t": "res", "id": op.id, "host": host, "status": status, **fields}, b"")
        if not op.pending:
            self._finish(op)

    async def progress(self, op_id: str, host: str, data: Any) -> None:
        """Keep `host`'s latest progress for `op_id`; it goes up with its
        subtree's within EV_FLUSH_S."""
        self._events.setdefault(op_id, {})[host] = data
        if not self._flush_scheduled and self.nursery is not None:
            self._flush_scheduled = True
            self.nursery.start_soon(self._flush_later)

    async def _flush_later(self) -> None:
        await trio.sleep(EV_FLUSH_S)
        self._flush_scheduled = False
        for op_id in list(self._events):
            await self._flush_events(op_id)

    async def _flush_events(self, op_id: str) -> None:
        batch = self._events.pop(op_id, None)
        if batch and op_id in self.ops:
            await self.emit_up({"t": "evs", "id": op_id, "events": [[h, d] for h, d in batch.items()]}, b"")

    def _finish(self, op: Op) -> None:
        # Every target has its result, so the local task (if any) is done too;
        # it must not be cancelled here: it may still be sending its own result.
        self.ops.pop(op.id, None)
        self._events.pop(op.id, None)
        if op.sink is not None and op.sink.final is None:
            _unlink(op.sink.path)    # a spool copy is not needed any more

    # --- operations ------------------------------------------------------------

    def _request_for(self, op: Op, names: set[str]) -> dict[str, Any]:
        req = dict(op.req, targets=sorted(op.pending & names))
        if "per_host" in req:
            req["per_host"] = {h: p for h, p in req["per_host"].items() if h in names}
        return req

    async def start_op(self, req: dict[str, Any], *, source: str | None = None) -> Op:
        await self.settled.wait()
        mine = {self.me} if self.me else set()
        for child in self.children.values():
            mine |= child.names
        targets = set(req["targets"])
        op = Op(str(req["id"]), req, targets, set(targets))
        self.ops[op.id] = op
        assert self.nursery is not None
        if req["op"] == "push":
            if source is not None:
                op.source = source
                op.complete.set()
            elif self.me in targets or any(c.names & targets for c in self.children.values()):
                try:
                    op.sink = self._open_sink(req, local=self.me in targets)
                except OSError as e:
                    op.complete.set()
                    if self.me in targets:
                        await self.result(op, self.host, "failed",
                                          error=f"cannot write {req['dest']}: {e.strerror or e}")
                else:
                    self.nursery.start_soon(self._write_sink, op)
        for child in list(self.children.values()):
            if child.names & targets:
                op.forwarded.add(child.name)
                await child.send(self._request_for(op, child.names))
        for name in sorted(targets - mine):
            why = self.down.get(name, "not reachable through this node")
            await self.result(op, name, "unreachable", error=why)
        if self.me in targets and req["op"] in ("exec", "call"):
            self.nursery.start_soon(self._run_local, op)
        return op

    @property
    def host(self) -> str:
        """This host's name, for work it runs itself (the root runs none)."""
        if self.me is None:
            raise RuntimeError("the controller's root node runs no work of its own")
        return self.me

    async def cancel(self, op_id: str) -> None:
        op = self.ops.pop(str(op_id), None)
        if op is None:
            return
        op.scope.cancel()
        if op.sink is not None:
            op.sink.send.close()
        for name in op.forwarded | op.resent:
            child = self.children.get(name)
            if child is not None:
                await child.send({"t": "cancel", "id": op.id})

    async def _run_local(self, op: Op) -> None:
        req = op.req
        timeout = req.get("timeout")
        start = trio.current_time()
        with op.scope:      # cancelled by a `cancel` request: then no result is due
            try:
                with trio.fail_after(timeout) if timeout else contextlib.nullcontext():
                    if req["op"] == "exec":
                        fields = await self._exec(op)
                    else:
                        fields = await self._call(op)
            except trio.TooSlowError:
                fields = {"status": "failed", "error": f"timed out after {timeout:g} s"}
        if op.scope.cancelled_caught:
            return
        fields["seconds"] = round(trio.current_time() - start, 3)
        await self.result(op, self.host, fields.pop("status"), **fields)

    async def _exec(self, op: Op) -> dict[str, Any]:
        argv = op.req["argv"]
        try:
            proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            return {"status": "failed", "error": f"cannot run {argv[0]}: {e.strerror or e}"}

        async def pump(stream, fd: int) -> None:
            while data := await stream.receive_some(65536):
                await self.emit_up({"t": "out", "id": op.id, "host": self.me, "fd": fd}, data)

        try:
            async with trio.open_nursery() as n:
                n.start_soon(pump, proc.stdout, 1)
                n.start_soon(pump, proc.stderr, 2)
            rc = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
        if rc == 0:
            return {"status": "ok", "rc": rc}
        return {"status": "failed", "rc": rc,
                "error": f"exited {rc}" if rc > 0 else f"killed by signal {-rc}"}

    async def _call(self, op: Op) -> dict[str, Any]:
        req = op.req

        async def emit(data: Any) -> None:
            await self.progress(op.id, self.host, data)

        try:
            payload = handlers.own_payload(req, self.me)
            fn = self.lookup(req["handler"], req.get("modules", []))
            ctx = handlers.Context(self.host, emit)
            if handlers.is_async(fn):
                value = await fn(payload, ctx)
            else:
                value = await trio.to_thread.run_sync(fn, payload, ctx, abandon_on_cancel=True)
            protocol.encode({"t": "res", "value": value})   # is it JSON within the limits?
        except Exception as e:     # a handler's failure is that host's result, not the agent's end
            return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        return {"status": "ok", "value": value}

    # --- push --------------------------------------------------------------------

    def _open_sink(self, req: dict[str, Any], local: bool) -> PushSink:
        dest = handlers.expand_dest(req["dest"], self.me)
        if local:
            fd, path = handlers.push_tempfile(dest)
        else:
            fd, path = tempfile.mkstemp(prefix="mfpush-spool-")
        send, recv = trio.open_memory_channel(QUEUE_FRAMES)
        return PushSink(path, dest if local else None, int(req.get("mode", 0o644)), send, recv, fd=fd)

    async def _write_sink(self, op: Op) -> None:
        sink = op.sink
        assert sink is not None
        error = None
        try:
            async for chunk in sink.recv:
                if chunk is None:
                    break
                await trio.to_thread.run_sync(_write_all, sink.fd, chunk, limiter=_disk)
                sink.digest.update(chunk)
                sink.size += len(chunk)
            else:
                error = "push cancelled"
        except OSError as e:
            error = f"write failed: {e.strerror or e}"
        os.close(sink.fd)
        if error is None and (sink.size != op.req["size"] or sink.digest.hexdigest() != op.req["sha256"]):
            error = (f"checksum mismatch: got {sink.size} bytes sha256 {sink.digest.hexdigest()[:12]}, "
                     f"expected {op.req['size']} bytes {op.req['sha256'][:12]}")
        if error is None and sink.final is not None:
            try:
                # rename() is the atomic step: readers see the old file or the
                # whole new one, never a part.
                os.chmod(sink.path, sink.mode)
                os.replace(sink.path, sink.final)
            except OSError as e:
                error = f"cannot install {sink.final}: {e.strerror or e}"
        if error is not None:
            _unlink(sink.path)
        else:
            op.source = sink.final or sink.path
        op.complete.set()
        if sink.final is not None and self.ops.get(op.id) is op:
            if error:
                await self.result(op, self.host, "failed", error=error)
            else:
                await self.result(op, self.host, "ok", bytes=sink.size,
                                  seconds=round(trio.current_time() - op.started, 3))
        elif self.ops.get(op.id) is not op and sink.final is None:
            _unlink(sink.path)

    async def push_chunk(self, op_id: str, data: bytes) -> None:
        op = self.ops.get(str(op_id))
        if op is None:
            return
        if op.sink is not None:
            try:
                await op.sink.send.send(data)
            except trio.ClosedResourceError:
                pass
        frame = {"t": "chunk", "id": op.id}
        for name in list(op.forwarded):
            child = self.children.get(name)
            if child is not None:
                await child.send(frame, data)

    async def push_end(self, op_id: str) -> None:
        op = self.ops.get(str(op_id))
        if op is None:
            return
        if op.sink is not None:
            try:
                await op.sink.send.send(None)
            except trio.ClosedResourceError:
                pass
        for name in list(op.forwarded):
            child = self.children.get(name)
            if child is not None:
                await child.send({"t": "end", "id": op.id})

    async def _resend(self, op: Op, child: Child, wanted: set[str]) -> None:
        """Replay `op` to a re-attached child for the hosts still without a result."""
        req = self._request_for(op, wanted)
        op.resent.add(child.name)
        if op.req["op"] != "push":
            await child.send(req)
            return
        await op.complete.wait()
        if op.source is None:
            for name in wanted:
                await self.result(op, name, "failed", error=f"re-attached below {self.me or 'the root'}, "
                                  "but its copy of the file is not usable")
            return
        await child.send(req)
        with open(op.source, "rb") as f:
            while True:
                data = await trio.to_thread.run_sync(f.read, CHUNK, limiter=_disk)
                if not data:
                    break
                if not await child.send({"t": "chunk", "id": op.id}, data):
                    return
        await child.send({"t": "end", "id": op.id})

    async def close(self) -> None:
        """Close every child session: their agents see end of input and exit."""
        self.closing = True
        for child in list(self.children.values()):
            child.alive = False
            child.send_q.close()
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as n:
                for child in list(self.children.values()):
                    n.start_soon(child.session.aclose)
        self.children.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
