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
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import trio

from megafleet.web import state

if TYPE_CHECKING:
    from megafleet.up import HostAnswer

# A fault is stamped when its command starts and stored when it is done (a
# guest's restart takes seconds), so events stamped later may be stored first:
# each poll reads this far behind the newest stamp seen and skips events by id.
LOOKBACK_S = 30.0
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
    hosts: dict[str, HostAnswer] = field(default_factory=dict)
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
        self._store_since: datetime | None = None      # the newest event's time seen in the store
        self._store_start = datetime.now(timezone.utc)
        self._seen: dict[str, datetime] = {}              # events published, by id, within LOOKBACK_S

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, testbed: str | None, /, **data: Any) -> Event:
        """Record an event and hand it to every subscriber (never blocks).
        `kind` and `testbed` are positional only: a store's event may carry
        fields of those names in `data` (a fault's testbed does)."""
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
        await self.poll_store()

    async def poll_store(self) -> None:
        """Publish the telemetry store's new events (boots, failures, faults, link
        changes). Read in a thread, published here: handing an event to a client
        that waits for one wakes its task, which only trio's own thread may do."""
        for kind, testbed, data in await trio.to_thread.run_sync(self._read_store):
            self.publish(kind, testbed, **data)

    def _read_store(self) -> list[tuple[str, str | None, dict[str, Any]]]:
        """The store's events not published yet: (kind, testbed, data)."""
        from megafleet.collect import queries

        now = datetime.now(timezone.utc)
        if self._store_since is None:
            self._store_since = self._store_start = now      # what was there before is not news
            return []
        newest = self._store_since
        since = max(self._store_start, newest - timedelta(seconds=LOOKBACK_S))
        try:
            with state.open_telemetry() as store:
                # What is newer than the newest seen; faults also from the last
                # LOOKBACK_S: a fault is stamped before it is stored, so it may
                # arrive older than events seen already (only faults: re-reading
                # a boot storm's events every poll to drop them was the cost).
                found = queries.events(store, newest) + queries.events(store, since, kind="fault")
        except Exception:                  # telemetry is best effort: the stream goes on
            return []
        out = []
        for doc in found:
            t = doc.get("time")
            if isinstance(t, datetime):
                if t.tzinfo is None:
                    t = t.replace(tzinfo=timezone.utc)
                if t <= since:
                    continue
                self._store_since = max(self._store_since, t)
            key = str(doc.get("_id") or doc)
            if key in self._seen:
                continue
            self._seen[key] = t if isinstance(t, datetime) else now
            if doc.get("event") == "fault" and doc.get("source") == "web":
                continue            # the API published it when it made the change
            meta = doc.get("meta") or {}
            # A fault (`megafleet link set`, `node kill`, from the CLI or the API)
            # names its testbed in a field of its own, not in meta.
            out.append((_kind_of(doc), meta.get("testbed") or doc.get("testbed"), state._plain(doc)))
        for key in [k for k, t in self._seen.items() if t <= since]:
            del self._seen[key]
        return out


def _kind_of(doc: dict[str, Any]) -> str:
    name = str(doc.get("event") or "")
    if name == "boot":
        return "boot" if doc.get("ok", True) else "failure"
    if name in ("fault", "link"):
        return name
    return "telemetry"
