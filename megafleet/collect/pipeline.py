"""The best-effort pipeline from samplers to the store.

Producers (samplers, the vm engine) only enqueue: `submit` and `submit_event`
never block and never fail. One writer task batches the queues into the store:

- samples wait in a bounded queue; when it is full the OLDEST sample is dropped
  and counted (the newest state of a fleet is worth more than an old one). Drop
  counts are telemetry too: a `drops` event (never dropped) reports each interval
  that lost samples, and a `pipeline` sample carries all counters;
- events (boots, teardowns, errors) wait in their own unbounded queue and are
  never dropped;
- when the store is unreachable, batches go to the durable spool; while the spool
  holds anything, new batches go behind it, so the store receives batches in the
  order they were taken. The writer pings the store every `retry_interval`
  seconds and replays the spool when it answers.

Blocking store calls run in a worker thread behind a CapacityLimiter.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from megafleet.collect import docs as D
from megafleet.collect.spool import Spool
from megafleet.collect.stores import StoreRejected, StoreUnavailable

log = logging.getLogger("megafleet.collect.pipeline")


@dataclass
class Counters:
    accepted: int = 0     # samples submitted
    dropped: int = 0      # samples dropped (queue overflow, spool full, no store)
    events: int = 0       # events submitted (never dropped)
    stored: int = 0       # documents the store took (new ones)
    spooled: int = 0      # documents written to the spool
    replayed: int = 0     # documents sent again from the spool
    rejected: int = 0     # documents the store refused for good
    outages: int = 0      # times the store became unreachable
    warnings: list[str] = field(default_factory=list)

    def as_fields(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int)}


class Pipeline:
    def __init__(self, store: Any, spool: Spool, *, host: str, capacity: int = 200_000,
                 batch_size: int = 1000, flush_interval: float = 1.0,
                 retry_interval: float = 1.0, stats_interval: float = 10.0,
                 limiter: trio.CapacityLimiter | None = None,
                 on_drop: Callable[[dict[str, Any]], None] | None = None,
                 on_stored: Callable[[str, list[dict[str, Any]]], None] | None = None):
        if capacity < 1 or batch_size < 1:
            raise ValueError("pipeline capacity and batch_size must be at least 1")
        self.store = store
        self.spool = spool
        self.host = host
        self.capacity = capacity
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.stats_interval = stats_interval
        self.limiter = limiter or trio.CapacityLimiter(1)
        self.on_drop = on_drop
        self.on_stored = on_stored
        self.counters = Counters()
        self._samples: deque[dict[str, Any]] = deque()
        self._events: deque[dict[str, Any]] = deque()
        self._wake = trio.Event()
        self._closing = False
        self._store_up = True
        self._next_retry = 0.0
        self._dropped_reported = 0
        self._drop_window_start = D.now_ms()
        self._event_seq = 0
        spool.warn = self._warn

    # -- producers (non-blocking) ---------------------------------------------------

    def submit(self, doc: dict[str, Any]) -> None:
        """Queue one sample. Never blocks: a full queue drops its oldest sample."""
        c = self.counters
        c.accepted += 1
        if len(self._samples) >= self.capacity:
            old = self._samples.popleft()
            c.dropped += 1
            if self.on_drop is not None:
                self.on_drop(old)
        self._samples.append(doc)
        if len(self._samples) >= self.batch_size:
            self._poke()

    def submit_event(self, doc: dict[str, Any]) -> None:
        """Queue one event; events are never dropped."""
        self.counters.events += 1
        self._events.append(doc)
        self._poke()

    def _poke(self) -> None:
        # Waking the writer is only possible from the trio thread; from another
        # thread the document is still queued and goes out on the flush timer.
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return
        self._wake.set()

    def _warn(self, message: str) -> None:
        log.warning(message)
        self.counters.warnings.append(message)
        del self.counters.warnings[:-20]
        self.submit_event(D.event("telemetry-warning", self.host, level="warning",
                                  message=message, seq=self._next_seq()))

    def _next_seq(self) -> int:
        self._event_seq += 1
        return self._event_seq

    def pending(self) -> int:
        return len(self._samples) + len(self._events)

    # -- the writer -------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write until `close()` is called, then flush everything (to the store, or
        to the spool if the store is away) and return."""
        task_status.started()
        next_stats = time.monotonic() + self.stats_interval
        final_report = False
        while True:
            replaying = self._store_up and not self.spool.empty()
            if (not self._closing and not replaying and self.pending() < self.batch_size
                    and not self._events):
                with trio.move_on_after(self.flush_interval):
                    await self._wake.wait()
            self._wake = trio.Event()
            if time.monotonic() >= next_stats:
                self._report()
                next_stats = time.monotonic() + self.stats_interval
            await self._write_queued()
            await self._replay_some()
            if self._closing and not self.pending():
                if self._store_up and not self.spool.empty():
                    continue  # finish the replay while the store is here
                if not final_report:
                    final_report = True  # the last counters, then one more pass
                    self._report()
                    continue
                return

    def close(self) -> None:
        """Ask the writer to flush and stop."""
        self._closing = True
        self._wake.set()

    async def _write_queued(self) -> None:
        while self._events or self._samples:
            if self._events:
                batch = [self._events.popleft()
                         for _ in range(min(self.batch_size, len(self._events)))]
                await self._write(D.EVENTS, batch)
            if self._samples:
                batch = [self._samples.popleft()
                         for _ in range(min(self.batch_size, len(self._samples)))]
                await self._write(D.SAMPLES, batch)
            if not self._closing and len(self._samples) < self.batch_size and not self._events:
                return  # leave a partial batch for the next flush

    async def _write(self, collection: str, batch: list[dict[str, Any]]) -> None:
        if self._store_up and self.spool.empty():
            try:
                n = await trio.to_thread.run_sync(self.store.insert, collection, batch,
                                                  limiter=self.limiter)
                self.counters.stored += n
                if self.on_stored is not None:
                    self.on_stored(collection, batch)
                return
            except StoreUnavailable as exc:
                self._went_down(exc)
            except StoreRejected as exc:
                self.counters.rejected += len(batch)
                log.error("telemetry store refused %d documents: %s", len(batch), exc)
                return
        self._to_spool(collection, batch)

    def _to_spool(self, collection: str, batch: list[dict[str, Any]]) -> None:
        if self.spool.append(collection, batch, force=(collection == D.EVENTS)):
            self.counters.spooled += len(batch)
        else:
            self.counters.dropped += len(batch)
            if self.on_drop is not None:
                for doc in batch:
                    self.on_drop(doc)

    def _went_down(self, exc: Exception) -> None:
        if self._store_up:
            self.counters.outages += 1
            log.warning("telemetry store unreachable, spooling to %s: %s", self.spool.dir, exc)
        self._store_up = False
        self._next_retry = time.monotonic() + self.retry_interval

    async def _replay_some(self) -> None:
        """Send spooled batches while the store answers (at most a few per call,
        so the live queues keep moving)."""
        if self.spool.empty():
            return
        if not self._store_up:
            if time.monotonic() < self._next_retry:
                return
            try:
                await trio.to_thread.run_sync(self.store.ping, limiter=self.limiter)
            except StoreUnavailable as exc:
                self._went_down(exc)
                return
            self._store_up = True
            log.warning("telemetry store is back: replaying the spool")
        for _ in range(8):
            item = self.spool.peek()
            if item is None:
                return
            collection, batch, position = item
            try:
                n = await trio.to_thread.run_sync(
                    lambda: self.store.insert(collection, batch, replay=True),
                    limiter=self.limiter)
            except StoreUnavailable as exc:
                self._went_down(exc)
                return
            except StoreRejected as exc:
                self.counters.rejected += len(batch)
                log.error("telemetry store refused %d spooled documents: %s", len(batch), exc)
                n = 0
            self.spool.commit(position)
            self.counters.stored += n
            self.counters.replayed += len(batch)
            if self.on_stored is not None:
                self.on_stored(collection, batch)

    def _report(self) -> None:
        """Drops are telemetry too: an event for each interval that lost samples
        (events are never dropped), and a sample with all counters."""
        c = self.counters
        now = D.now_ms()
        lost = c.dropped - self._dropped_reported
        if lost:
            self.submit_event(D.event(
                "drops", self.host, level="warning", time_ms=now, seq=self._next_seq(),
                dropped=lost, since=D.ms_to_datetime(self._drop_window_start),
                reason="queue full or spool full: oldest samples dropped"))
            self._dropped_reported = c.dropped
            self._drop_window_start = now
        fields = c.as_fields()
        fields.update(queued=len(self._samples), spool_bytes=self.spool.size(),
                      store_up=self._store_up)
        # The counters are an ordinary sample (droppable); the drops event is not.
        self.submit(D.sample(D.PIPELINE, self.host, fields, time_ms=now))

