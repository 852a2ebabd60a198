"""One suite, every store: SQLite, FerretDB (started by the tests) and a real
MongoDB when MEGAFLEET_TEST_MONGO_URI is set. Each test checks known answers on
the same data, and `test_stores_agree` checks that all stores give identical
answers to every query and filter."""

from __future__ import annotations

import os
import uuid

import pytest

from megafleet.collect import docs as D
from megafleet.collect import queries as Q
from megafleet.collect.filters import BadFilter
from megafleet.collect.stores import MongoStore, SqliteStore

from . import dataset

pytestmark = pytest.mark.mongo

SINCE = D.ms_to_datetime(dataset.T0 - 3_600_000)
AT_STEP2 = D.ms_to_datetime(dataset.T0 + 20_000)

FILTERS = [
    {},
    {"meta.kind": "guest", "state": "failed"},
    {"meta.kind": "guest", "cpu_pct": {"$gt": 40}},
    {"cpu_pct": {"$gte": 40.5, "$lt": 51}},
    {"rss_kb": {"$lte": 50_100}},
    {"meta.host": {"$in": ["mfc-h2"]}, "meta.kind": {"$nin": ["iface", "sniff", "host"]}},
    {"state": {"$ne": "running"}},
    {"cpu_pct": {"$exists": False}},
    {"ksm.pages_sharing": {"$exists": True}},
    {"$or": [{"state": "stopped"}, {"meta.iface": "mfctap1", "rx_dropped": {"$gt": 1}}]},
    {"$and": [{"meta.kind": "guest"}, {"meta.image": "big"}, {"time": {"$gte": AT_STEP2}}]},
    {"dropped": {"$gt": 0}},            # numbers only: the string "n/a" never matches
    {"dropped": {"$gt": "a"}},          # strings only
    {"dropped": "n/a"},
    {"note": None},                     # null matches null and missing
    {"store_up": True},
    {"store_up": {"$ne": True}, "meta.kind": "pipeline"},
    {"_id": {"$in": ["guest:mfc-h1:mfc-g00:" + str(dataset.T0)]}},
    {"protocols.arp.bytes": 1039},
    {"meta.guest": {"$eq": "mfc-g13"}, "time": {"$lt": AT_STEP2}},
]


def _ids(docs):
    return [d["_id"] for d in docs]


@pytest.fixture
def loaded(store):
    dataset.load(store)
    return store


def test_insert_is_idempotent(store):
    first = store.insert(D.SAMPLES, dataset.samples())
    again = store.insert(D.SAMPLES, dataset.samples(), replay=True)
    assert first == len(dataset.samples())
    assert again == 0
    assert store.count(D.SAMPLES) == len(dataset.samples())


def test_documents_round_trip(loaded):
    stored = {d["_id"]: d for d in loaded.find(D.SAMPLES)}
    for doc in dataset.samples():
        assert stored[doc["_id"]] == doc


def test_status(loaded):
    rows = Q.status(loaded, SINCE)
    assert {(r["host"], r["state"]): r["guests"] for r in rows} == {
        ("mfc-h1", "running"): 3, ("mfc-h1", "stopped"): 1, ("mfc-h1", "failed"): 1,
        ("mfc-h1", "booting"): 1, ("mfc-h2", "running"): 3, ("mfc-h2", "stopped"): 1,
        ("mfc-h2", "failed"): 1, ("mfc-h2", "booting"): 1}


def test_boot_times(loaded):
    rows = {(r["host"], r["image"]): r for r in Q.boot_times(loaded, SINCE)}
    tiny_h1 = rows[("mfc-h1", "tiny")]
    assert tiny_h1["boots"] == 3 and tiny_h1["failures"] == 1
    assert (tiny_h1["p50_s"], tiny_h1["p95_s"], tiny_h1["max_s"]) == (3.2, 4.4, 4.4)
    assert rows[("mfc-h1", "big")]["boots"] == 1 and rows[("mfc-h1", "big")]["p99_s"] == 6.1


def test_top(loaded):
    by_cpu = Q.top(loaded, "cpu", SINCE, limit=3)
    assert [(r["host"], r["guest"]) for r in by_cpu] == [
        ("mfc-h2", "mfc-g15"), ("mfc-h1", "mfc-g05"), ("mfc-h2", "mfc-g14")]
    by_mem = Q.top(loaded, "mem", SINCE, limit=1)
    assert by_mem[0]["guest"] == "mfc-g15" and by_mem[0]["rss_kb"] == 55_100
    with pytest.raises(Q.BadQuery):
        Q.top(loaded, "disk", SINCE)


def test_ksm_and_net(loaded):
    saving = Q.ksm(loaded, SINCE, host="mfc-h2")
    assert [r["saving_bytes"] for r in saving] == [4096, 901 * 4096, 1801 * 4096]
    busiest = Q.net(loaded, SINCE, limit=2)
    assert [(r["host"], r["iface"]) for r in busiest] == [("mfc-h2", "mfctap1"),
                                                         ("mfc-h1", "mfctap1")]
    assert busiest[0]["mean_bps"] == 451.0 and busiest[0]["drops"] == 2
    protocols = Q.sniff(loaded, SINCE, host="mfc-h1")
    assert protocols == [
        {"host": "mfc-h1", "switch": "mfcbr0", "protocol": "ipv4_icmp", "packets": 60,
         "bytes": 5880},
        {"host": "mfc-h1", "switch": "mfcbr0", "protocol": "arp", "packets": 30, "bytes": 3120}]


def test_events(loaded):
    errors = Q.events(loaded, SINCE, kind="error")
    assert [e["event"] for e in errors] == ["boot", "sampler-error"]
    assert errors[0]["reason"] == "no readiness line in 60 s"
    assert [e["event"] for e in Q.events(loaded, SINCE, kind="teardown")] == ["teardown"]
    recent = Q.events(loaded, D.ms_to_datetime(dataset.T0))
    assert [e["event"] for e in recent] == ["teardown", "drops", "sampler-error"]


def test_find_filters(loaded):
    assert len(loaded.find(D.SAMPLES, {"meta.kind": "guest", "state": "failed"})) == 6
    assert _ids(loaded.find(D.SAMPLES, {"dropped": {"$gt": 0}})) == [
        f"pipeline:mfc-h2::{dataset.T0 + 2}"]
    assert len(loaded.find(D.SAMPLES, {"note": None, "meta.kind": "pipeline"})) == 2
    assert len(loaded.find(D.SAMPLES, {}, limit=5)) == 5


def test_sqlite_rejects_unsupported_operators(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    for flt, word in [({"x": {"$regex": "a"}}, "$regex"), ({"$nor": [{"x": 1}]}, "$nor"),
                      ({"x": {"$in": 3}}, "$in needs a list"),
                      ({"time": {"$gt": 5}}, "compare time with a date"),
                      ({"a b": 1}, "dotted key")]:
        with pytest.raises(BadFilter, match=word.replace("$", r"\$")):
            store.find(D.SAMPLES, flt)
    store.close()


def _answers(store) -> dict:
    out = {f"find {i}": _ids(store.find(D.SAMPLES, f)) for i, f in enumerate(FILTERS)}
    out["find events"] = store.find(D.EVENTS, {"level": {"$in": ["error", "warning"]}})
    out.update(status=Q.status(store, SINCE), boot=Q.boot_times(store, SINCE),
               cdf=Q.boot_durations(store, SINCE), top_cpu=Q.top(store, "cpu", SINCE, 0),
               top_mem=Q.top(store, "mem", SINCE, 0), ksm=Q.ksm(store, SINCE),
               net=Q.net(store, SINCE, 0), sniff=Q.sniff(store, SINCE),
               events=Q.events(store, SINCE))
    return out


def test_stores_agree(ferretdb, tmp_path):
    stores = {"sqlite": SqliteStore(tmp_path / "t.sqlite"), "ferretdb": MongoStore(ferretdb.uri)}
    if os.environ.get("MEGAFLEET_TEST_MONGO_URI"):
        stores["mongodb"] = MongoStore(os.environ["MEGAFLEET_TEST_MONGO_URI"],
                                       database=f"mfc{uuid.uuid4().hex[:8]}")
    try:
        answers = {}
        for name, store in stores.items():
            dataset.load(store)
            answers[name] = _answers(store)
        reference = answers.pop("sqlite")
        assert all(reference[f"find {i}"] for i in range(len(FILTERS)) if FILTERS[i]), \
            "every non-empty filter should select something in the dataset"
        for name, got in answers.items():
            for key in reference:
                assert got[key] == reference[key], f"{name} differs from sqlite on {key}"
    finally:
        for name, store in stores.items():
            if name != "sqlite":
                store.client.drop_database(store.db.name)
            store.close()


def test_prune_removes_old_documents(loaded):
    cutoff = D.ms_to_datetime(dataset.T0 + 10_000)
    older = loaded.count(D.SAMPLES, {"time": {"$lt": cutoff}})
    assert older > 0
    assert loaded.delete_before(D.SAMPLES, cutoff) == older
    assert loaded.count(D.SAMPLES, {"time": {"$lt": cutoff}}) == 0
    assert loaded.count(D.SAMPLES) == len(dataset.samples()) - older


def test_features_are_detected(store):
    store.ping()
    assert set(store.features) >= {"server", "timeseries", "ttl"}
    if store.features["server"].startswith("FerretDB"):
        # FerretDB 1.x has neither: detected, not assumed (see MongoStore._set_up).
        assert store.features["timeseries"] is False and store.features["ttl"] is False


def test_ttl_requested_on_ferretdb_falls_back_cleanly(ferretdb):
    store = MongoStore(ferretdb.uri, ttl_seconds=3600)
    try:
        store.ping()
        assert store.features["ttl"] is False and store.features["timeseries"] is False
        assert "kind_host_time" in store.db[D.SAMPLES].index_information()
        assert store.insert(D.SAMPLES, dataset.samples()[:10]) == 10
    finally:
        store.client.drop_database(store.db.name)
        store.close()
