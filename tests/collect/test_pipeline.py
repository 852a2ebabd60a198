"""The pipeline against real stores: overload, an outage of a real FerretDB during
ingest, a store that is away at start."""

from __future__ import annotations

import time

import pytest
import trio

from megafleet.collect import docs as D
from megafleet.collect.pipeline import Pipeline
from megafleet.collect.spool import Spool
from megafleet.collect.stores import MongoStore, SqliteStore

from .conftest import FerretDB, free_port


def guest_sample(i: int, base_ms: int = 1_780_000_000_000) -> dict:
    return D.sample(D.GUEST, "mfc-h1", {"state": "running", "cpu_s": i / 10, "seq": i},
                    time_ms=base_ms + i // 1000, guest=f"mfc-g{i % 1000}")


def test_overload_drops_oldest_counts_them_keeps_events(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    dropped = []
    pipeline = Pipeline(store, Spool(tmp_path / "spool"), host="mfc-h1", capacity=1000,
                        batch_size=200, on_drop=dropped.append)

    async def main():
        # Producers run before the writer gets a turn: a burst the store cannot
        # absorb in time. Submitting never blocks.
        for i in range(5000):
            pipeline.submit(guest_sample(i))
            if i % 100 == 0:
                pipeline.submit_event(D.event("boot", "mfc-h1", guest=f"mfc-g{i}", ok=False,
                                              level="error", reason="test", time_ms=i))
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            pipeline.close()

    trio.run(main)
    c = pipeline.counters
    assert c.dropped == 4000 and len(dropped) == 4000
    assert [d["seq"] for d in dropped] == list(range(4000))  # the oldest went
    kept = store.find(D.SAMPLES, {"meta.kind": "guest"})
    assert sorted(d["seq"] for d in kept) == list(range(4000, 5000))
    assert store.count(D.EVENTS, {"event": "boot"}) == 50  # events are never dropped
    report = store.find(D.EVENTS, {"event": "drops"})
    assert len(report) == 1 and report[0]["dropped"] == 4000 and report[0]["level"] == "warning"
    counters = store.find(D.SAMPLES, {"meta.kind": "pipeline"})
    assert counters[-1]["dropped"] == 4000
    store.close()


@pytest.mark.mongo
@pytest.mark.slow
def test_outage_during_ingest_of_100000_samples(private_ferretdb, tmp_path):
    """Stop the server in the middle of ingest, start it again: after the replay,
    every accepted sample is in the store exactly once."""
    server = private_ferretdb
    store = MongoStore(server.uri, timeout_ms=500)
    spool = Spool(tmp_path / "spool", segment_bytes=1 << 20)
    dropped: list[dict] = []
    pipeline = Pipeline(store, spool, host="mfc-h1", batch_size=1000, flush_interval=0.2,
                        retry_interval=0.3, on_drop=dropped.append)
    total = 100_000
    seen = {"stopped_at": None, "spooled_max": 0}

    async def produce():
        for i in range(total):
            pipeline.submit(guest_sample(i))
            if i % 2000 == 1999:
                await trio.sleep(0.02)
                seen["spooled_max"] = max(seen["spooled_max"], len(spool.segments()))
            if i == total // 3:
                seen["stopped_at"] = pipeline.counters.stored
                await trio.to_thread.run_sync(server.stop)
            if i == 2 * total // 3:
                await trio.to_thread.run_sync(server.start)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            await produce()
            pipeline.close()

    trio.run(main)
    c = pipeline.counters
    assert c.outages >= 1 and c.spooled > 0 and c.replayed > 0, c
    assert seen["spooled_max"] >= 1
    assert not dropped and c.dropped == 0
    ids = [d["_id"] for d in store.find(D.SAMPLES, {"meta.kind": "guest"}, projection=["_id"])]
    assert len(ids) == total and len(set(ids)) == total
    expected = {guest_sample(i)["_id"] for i in range(total)}
    assert set(ids) == expected
    assert spool.empty() and spool.segments() == []
    store.client.drop_database(store.db.name)
    store.close()


@pytest.mark.mongo
def test_store_away_at_start_then_arrives(tmp_path, ferretdb):
    port = free_port()
    store = MongoStore(f"mongodb://127.0.0.1:{port}/mfclate", timeout_ms=300)
    spool = Spool(tmp_path / "spool")
    pipeline = Pipeline(store, spool, host="mfc-h1", batch_size=100, flush_interval=0.1,
                        retry_interval=0.2)
    late = FerretDB(tmp_path, port, ferretdb.ledger)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            for i in range(500):
                pipeline.submit(guest_sample(i))
            pipeline.submit_event(D.event("boot", "mfc-h1", guest="mfc-g1", ok=True,
                                          duration_s=3.0, image="tiny"))
            with trio.fail_after(60):  # the store is away: everything goes to the spool
                while pipeline.counters.spooled < 501:
                    await trio.sleep(0.05)
            assert not spool.empty() and pipeline.counters.stored == 0
            await trio.to_thread.run_sync(late.start)
            deadline = time.monotonic() + 30
            while not spool.empty() and time.monotonic() < deadline:
                await trio.sleep(0.1)
            pipeline.close()

    try:
        trio.run(main)
        assert store.count(D.SAMPLES, {"meta.kind": "guest"}) == 500
        assert store.count(D.EVENTS, {"event": "boot"}) == 1
        assert store.features["server"].startswith("FerretDB")
        store.close()
    finally:
        late.stop()


@pytest.mark.mongo
def test_refused_documents_are_counted_not_spooled(ferretdb, tmp_path):
    store = MongoStore(ferretdb.uri)
    spool = Spool(tmp_path / "spool")
    pipeline = Pipeline(store, spool, host="mfc-h1", batch_size=10, flush_interval=0.1)
    bad = D.sample(D.GUEST, "mfc-h1", {"$state": "not a field name"}, guest="mfc-bad")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            pipeline.submit(bad)
            await trio.sleep(0.5)
            for i in range(5):
                pipeline.submit(guest_sample(i))
            pipeline.close()

    trio.run(main)
    try:
        assert pipeline.counters.rejected == 1 and pipeline.counters.spooled == 0
        assert store.count(D.SAMPLES, {"meta.kind": "guest"}) == 5
        assert spool.segments() == []
    finally:
        store.client.drop_database(store.db.name)
        store.close()
