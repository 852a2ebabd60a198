"""The live event stream: one poller, many listeners.

One trio task polls what `megafleet status` reads (every `poll_s`, 1 s by
default) and the telemetry store's events, turns changes into `Event`s and hands
each to every subscriber's bounded channel. The API's node and host reads use the
poller's latest snapshot, so a thousand open pages cost one status read a second,
not a thousand. A subscriber that cannot keep up loses its oldest events, never
the server's time: its channel is bounded and full channels are skipped, with a
`lagged` mark the client sees.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import trio

from megafleet.web import state

HISTORY = 500          # events kept for /api/v1/events and for clients that reconnect
CLIENT_BUFFER = 256    # events a slow client may be behind before it is marked lagged


@dataclass(frozen=True)
class Event:
    """One thing that happened: `kind` is node (a state change), boot, failure,
    fault, link or telemetry (an event from the store); `data` says what."""

    id: int
    time: float
    kind: str
    testbed: str | None
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    """The latest poll: `status` per host, and per testbed the nodes not healthy."""

    time: float = 0.0
    hosts: dict[str, Any] = field(default_factory=dict)
    bad: dict[str, dict[str, str]] = field(default_factory=dict)


class Broker:
    """Polls, diffs and fans out. Run `run()` in a nursery; `subscribe()` per client."""

    def __init__(self, poll_s: float = 1.0):
        self.poll_s = poll_s
        self.snapshot = Snapshot()
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self._ids = itertools.count(1)
        self._subscribers: set[trio.MemorySendChannel] = set()
        self._fresh = trio.Event()
        self._store_since: datetime | None = None

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, testbed: str | None, **data: Any) -> Event:
        """Record an event and hand it to every subscriber (never blocks)."""
        ev = Event(next(self._ids), time.time(), kind, testbed, data)
        self.history.append(ev)
        for ch in list(self._subscribers):
            try:
                ch.send_nowait(ev)
            except trio.WouldBlock:
                pass                       # slow client: it will see a gap in ids
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(ch)
        return ev

    def subscribe(self) -> tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]:
        send, receive = trio.open_memory_channel[Event](CLIENT_BUFFER)
        self._subscribers.add(send)
        return send, receive

    def unsubscribe(self, send: trio.MemorySendChannel) -> None:
        self._subscribers.discard(send)
        send.close()

    async def wait_fresh(self) -> Snapshot:
        """The snapshot, after the first poll has happened."""
        await self._fresh.wait()
        return self.snapshot

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as exc:        # a poll that fails is reported, the next one tries again
                self.publish("error", None, message=f"{type(exc).__name__}: {exc}"[:300])
            self._fresh.set()
            await trio.sleep(self.poll_s)

    async def poll_once(self) -> None:
        hosts = await state.host_status(None)
        bad: dict[str, dict[str, str]] = {}
        for t in await trio.to_thread.run_sync(state.testbeds):
            bad[t.name], _ = state.node_states(hosts, t.name)
        old = self.snapshot.bad
        if self.snapshot.time:            # the first poll is the baseline, not news
            for tb, nodes in bad.items():
                before = old.get(tb, {})
                for node, st in nodes.items():
                    if before.get(node) != st:
                        self.publish("node", tb, node=node, state=st, was=before.get(node, "healthy"))
                for node in before.keys() - nodes.keys():
                    self.publish("node", tb, node=node, state="healthy", was=before[node])
            for tb in old.keys() - bad.keys():
                self.publish("testbed", tb, state="gone")
            for tb in bad.keys() - old.keys():
                self.publish("testbed", tb, state="up")
        self.snapshot = Snapshot(time.time(), hosts, bad)
        await trio.to_thread.run_sync(self._poll_store)

    def _poll_store(self) -> None:
        """New events in the telemetry store (boots, failures, faults, link changes)."""
        from megafleet.collect import queries

        now = datetime.now(timezone.utc)
        if self._store_since is None:
            self._store_since = now
            return
        try:
            with state.open_telemetry() as store:
                found = queries.events(store, self._store_since)
        except Exception:                  # telemetry is best effort: the stream goes on
            return
        newest = self._store_since
        for doc in found:
            t = doc.get("time")
            if isinstance(t, datetime):
                if t.tzinfo is None:
                    t = t.replace(tzinfo=timezone.utc)
                if t <= self._store_since:
                    continue
                newest = max(newest, t)
            meta = doc.get("meta") or {}
            self.publish(_kind_of(doc), meta.get("testbed"), **state._plain(doc))
        self._store_since = newest


def _kind_of(doc: dict[str, Any]) -> str:
    name = str(doc.get("event") or "")
    if name == "boot":
        return "boot" if doc.get("ok", True) else "failure"
    if name in ("fault", "link"):
        return name
    return "telemetry"
