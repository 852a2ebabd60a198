"""Simulated links: the in-memory stand-in for gproc's SSH transport.

`SimNetwork.transport` has the shape of `gproc.transport.open_transport`
(an async context manager of an object with `connect(spec)`), so it plugs
into `Fleet.connect(transport=...)` and into every simulated agent's
`agent.run_agent`. A connect to a live host starts that host's agent (the
real `run_agent`, with the simulation's handler lookup) as a task in the
network's nursery and returns the parent's end of a duplex link.

Link model, per direction: a frame of b bytes sent at t starts when the link
is free, occupies it for b / bandwidth, and is readable at the far end
`latency + b * decode_s_per_byte` after it has been sent whole. Times are
trio's clock: run under `trio.testing.MockClock(autojump_threshold=0)` they
are simulated seconds.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import trio

from megafleet.gproc import protocol
from megafleet.gproc.protocol import ConnectFailed


@dataclass
class LinkModel:
    """One hop of the simulated wire (both directions alike)."""

    latency_s: float = 0.001            # one way
    bandwidth_bps: float = 1e9          # bits per second
    decode_s_per_byte: float = 0.0      # receiver's CPU per byte (JSON decode), see calibrate()


@dataclass
class Counters:
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    rx_frames: int = 0


class _Direction:
    """One direction of a link: an ordered queue of (readable_at, bytes)."""

    def __init__(self, model: LinkModel, counters: Counters | None, sent_side: bool):
        self.model = model
        self.send_ch, self.recv_ch = trio.open_memory_channel(math.inf)
        self.free_at = 0.0
        self.counters = counters
        self.sent_side = sent_side      # counters count what this end sends (else receives)
        self.pending = b""
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise trio.BrokenResourceError("simulated link closed")
        now = trio.current_time()
        start = max(now, self.free_at)
        self.free_at = start + len(data) * 8 / self.model.bandwidth_bps
        readable = self.free_at + self.model.latency_s + len(data) * self.model.decode_s_per_byte
        if self.counters is not None:
            if self.sent_side:
                self.counters.tx_bytes += len(data)
                self.counters.tx_frames += 1
            else:
                self.counters.rx_bytes += len(data)
                self.counters.rx_frames += 1
        try:
            self.send_ch.send_nowait((readable, bytes(data)))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise trio.BrokenResourceError("simulated link closed") from None
        # The sender is busy until its bytes are on the wire (its own uplink).
        if self.free_at > now:
            await trio.sleep_until(self.free_at)
        else:
            await trio.lowlevel.checkpoint()

    async def receive(self, max_bytes: int) -> bytes:
        if not self.pending:
            try:
                readable, data = await self.recv_ch.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return b""
            await trio.sleep_until(readable)
            self.pending = data
        out, self.pending = self.pending[:max_bytes], self.pending[max_bytes:]
        return out

    def close(self) -> None:
        self.closed = True
        self.send_ch.close()


class SimSession:
    """One end of a duplex simulated link, with the methods gproc's Node uses
    on an SSH `Session` (send_all, receive_some, aclose, stderr_tail)."""

    def __init__(self, name: str, out: _Direction, inp: _Direction, on_close: Callable[[], None] | None = None):
        self.name = name
        self._out = out
        self._in = inp
        self._on_close = on_close
        self.stderr = ""

    async def send_all(self, data: bytes) -> None:
        await self._out.send(data)

    async def receive_some(self, max_bytes: int = 1 << 18) -> bytes:
        return await self._in.receive(max_bytes)

    def stderr_tail(self) -> str:
        return self.stderr

    async def send_eof(self) -> None:
        self._out.close()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._out.close()
        self._in.recv_ch.close()
        if self._on_close is not None:
            self._on_close()
        await trio.lowlevel.checkpoint()


@dataclass
class _Agent:
    name: str
    scope: trio.CancelScope
    up: _Direction            # agent -> parent
    down: _Direction          # parent -> agent


@dataclass
class SimNetwork:
    """The simulated hosts' wire. `dead`: hosts that refuse connections (a host
    that is down); `kill(name)` ends a running agent as a crash would.
    `lookup` is the handler lookup every simulated agent uses (see hosts.py).
    `controller` counts the bytes and frames the controller sends and receives."""

    model: LinkModel
    lookup: Callable[[str, list[str]], Any]
    dead: set[str] = field(default_factory=set)
    controller: Counters = field(default_factory=Counters)
    agents: dict[str, _Agent] = field(default_factory=dict)
    connects: int = 0
    errors: list[str] = field(default_factory=list)
    nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator["SimNetwork"]:
        """Hold the nursery the simulated agents run in."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    def transport(self, identity: str | None, known_hosts: str | None, connect_timeout: float = 15.0,
                  *, _parent: str | None = None):
        """`open_transport`'s shape, for the controller (parent None)."""
        net = self

        @asynccontextmanager
        async def cm():
            yield _Transport(net, _parent)
        return cm()

    def kill(self, name: str) -> None:
        """The host dies: its agent stops at once (its sessions close, so its
        parent and children see end of stream) and it refuses connections."""
        self.dead.add(name)
        agent = self.agents.pop(name, None)
        if agent is not None:
            agent.up.close()
            agent.scope.cancel()

    async def _start_agent(self, spec: dict[str, Any], parent: str | None) -> SimSession:
        assert self.nursery is not None, "use `async with network.running():`"
        name = spec["name"]
        self.connects += 1
        # The TCP/SSH handshake: a few round trips before the agent starts.
        await trio.sleep(4 * self.model.latency_s)
        if name in self.dead:
            raise ConnectFailed(f"{name}: connection refused (simulated host down)")
        counters = self.controller if parent is None else None
        down = _Direction(self.model, counters, sent_side=True)
        up = _Direction(self.model, counters, sent_side=False)
        scope = trio.CancelScope()
        agent = _Agent(name, scope, up, down)
        old = self.agents.get(name)
        if old is not None:           # a re-attachment replaces the agent of this host
            old.up.close()
            old.scope.cancel()
        self.agents[name] = agent
        agent_end = SimSession(name, up, down)
        self.nursery.start_soon(self._serve, agent, agent_end)

        def closed() -> None:
            # The parent closed the session: the agent sees end of input.
            down.close()
        return SimSession(name, down, up, on_close=closed)

    async def _serve(self, agent: _Agent, end: SimSession) -> None:
        from megafleet.gproc import agent as agent_mod

        with agent.scope:
            try:
                reader = protocol.FrameReader(end)
                frame = await reader.read()
                if frame is None:
                    return
                setup = agent_mod._check_setup(frame[0])
                await agent_mod.run_agent(
                    setup, reader, end,
                    lambda i, k, t, _n=agent.name: self.transport(i, k, t, _parent=_n),
                    lookup=self.lookup)
            except Exception as e:      # an agent that fails ends, as a real one exits
                self.errors.append(f"{agent.name}: {type(e).__name__}: {e}")
            finally:
                agent.up.close()
                if self.agents.get(agent.name) is agent:
                    del self.agents[agent.name]


class _Transport:
    def __init__(self, net: SimNetwork, parent: str | None):
        self.net = net
        self.parent = parent

    async def connect(self, spec: dict[str, Any]) -> SimSession:
        return await self.net._start_agent(spec, self.parent)


def calibrate_decode(sample_bytes: int = 1 << 20) -> float:
    """Seconds per byte this machine takes to decode a frame of JSON (what an
    agent pays for every frame it receives before it can act on it)."""
    import time

    header = {"t": "req", "id": "1", "per_host": {f"node{i:05d}": {"vms": [{"name": f"g{i}x{j}", "mac": "52:54:00:00:00:01",
                                                                         "mem_mb": 64} for j in range(8)]}
                                              for i in range(max(1, sample_bytes // 700))}}
    frame = protocol.encode(header)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        protocol._take_frame(bytearray(frame), *protocol._frame_size(bytearray(frame), protocol.MAX_HEADER,
                                                                       protocol.MAX_PAYLOAD))
        best = min(best, time.perf_counter() - t)
    return best / len(frame)
