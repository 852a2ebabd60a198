"""Where telemetry is stored: MongoDB (through pymongo) or SQLite (the default).

Both stores offer the same small, blocking interface (call it from trio through
`trio.to_thread.run_sync` with a limiter; the pipeline and the queries do):

    insert(collection, docs, replay=False) -> number of new documents
    find(collection, filter, limit=0, projection=None) -> documents sorted by (time, _id)
    count(collection, filter) -> int
    delete_before(collection, datetime) -> number removed
    ping() -> None, or raises StoreUnavailable
    features -> what the server turned out to support

`insert` tolerates documents that are already there (same `_id`), so a replay
never duplicates. It raises `StoreUnavailable` when the store cannot be reached
(the pipeline then spools) and `StoreRejected` when the store refused documents
for good (spooling them would not help).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from megafleet import paths, sqlitedb
from megafleet.collect.docs import COLLECTIONS, EVENTS, SAMPLES, datetime_to_ms, ms_to_datetime
from megafleet.collect.filters import to_sql

URI_ENV = "MEGAFLEET_MONGO_URI"


class StoreUnavailable(RuntimeError):
    """The store cannot be reached now; try again later."""


class StoreRejected(RuntimeError):
    """The store refused documents for good (not a connectivity problem)."""


def _check_collection(name: str) -> str:
    if name not in COLLECTIONS:
        raise ValueError(f"unknown collection {name!r}; known: {', '.join(COLLECTIONS)}")
    return name


# --- SQLite ------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$date": datetime_to_ms(value)}
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in telemetry")


def _json_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and "$date" in obj:
        return ms_to_datetime(obj["$date"])
    return obj


class SqliteStore:
    """Telemetry in one SQLite file (WAL). Each collection is a table of
    (id, time_ms, kind, host, doc-as-JSON); filters are translated to SQL."""

    kind = "sqlite"

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else paths.state_dir() / "telemetry.sqlite"
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._db = self._connections()
        db = self._db()
        with db:
            for name in COLLECTIONS:
                db.execute(f"CREATE TABLE IF NOT EXISTS {name} (id TEXT PRIMARY KEY, "
                           "time_ms INTEGER NOT NULL, kind TEXT, host TEXT, doc TEXT NOT NULL)")
                db.execute(f"CREATE INDEX IF NOT EXISTS {name}_kind_host_time "
                           f"ON {name} (kind, host, time_ms)")
                db.execute(f"CREATE INDEX IF NOT EXISTS {name}_time ON {name} (time_ms)")
        self.features = {"server": f"SQLite {sqlite3.sqlite_version}", "timeseries": False,
                         "ttl": False}

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _connections(self) -> sqlitedb.PerThread:
        """One connection per thread; all of them remembered, for close()."""
        def remember(db: sqlite3.Connection) -> None:
            with self._lock:
                self._all.append(db)
        return sqlitedb.PerThread(self.path, check_same_thread=False, on_open=remember)

    def ping(self) -> None:
        try:
            self._db().execute("SELECT 1")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc

    def insert(self, collection: str, docs: list[dict[str, Any]], replay: bool = False) -> int:
        _check_collection(collection)
        rows = []
        for d in docs:
            body = {k: v for k, v in d.items() if k not in ("_id", "time")}
            meta = d.get("meta") or {}
            rows.append((d["_id"], datetime_to_ms(d["time"]), meta.get("kind"), meta.get("host"),
                         json.dumps(body, default=_json_default, separators=(",", ":"))))
        db = self._db()
        try:
            before = db.total_changes
            with db:
                db.executemany(f"INSERT OR IGNORE INTO {collection} VALUES (?,?,?,?,?)", rows)
            return db.total_changes - before
        except sqlite3.OperationalError as exc:  # locked, disk full, I/O
            raise StoreUnavailable(f"{self.path}: {exc}") from exc

    def _rows(self, collection: str, flt: dict[str, Any] | None, limit: int,
              columns: str) -> Iterable[tuple]:
        _check_collection(collection)
        where, args = to_sql(flt or {})
        sql = f"SELECT {columns} FROM {collection} WHERE {where} ORDER BY time_ms, id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self._db().execute(sql, args)

    def find(self, collection: str, flt: dict[str, Any] | None = None, limit: int = 0,
             projection: list[str] | None = None) -> list[dict[str, Any]]:
        out = []
        for id_, time_ms, body in self._rows(collection, flt, limit, "id, time_ms, doc"):
            doc = {"_id": id_, "time": ms_to_datetime(time_ms)}
            doc.update(json.loads(body, object_hook=_json_hook))
            out.append(_project(doc, projection) if projection else doc)
        return out

    def count(self, collection: str, flt: dict[str, Any] | None = None) -> int:
        _check_collection(collection)
        where, args = to_sql(flt or {})
        return self._db().execute(f"SELECT count(*) FROM {collection} WHERE {where}",
                                  args).fetchone()[0]

    def delete_before(self, collection: str, before: datetime) -> int:
        """Remove documents older than `before` (`telemetry prune`: the TTL of
        stores without one). Returns how many."""
        _check_collection(collection)
        db = self._db()
        with db:
            return db.execute(f"DELETE FROM {collection} WHERE time_ms < ?",
                              (datetime_to_ms(before),)).rowcount

    def drop(self) -> None:
        """Remove all telemetry."""
        db = self._db()
        with db:
            for name in COLLECTIONS:
                db.execute(f"DELETE FROM {name}")

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._db = self._connections()


def _project(doc: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """Keep `_id` and the named top-level fields (or dotted paths' first parts),
    as a MongoDB inclusion projection on our documents does."""
    keep = {"_id"} | {f.split(".", 1)[0] for f in fields}
    return {k: v for k, v in doc.items() if k in keep}


# --- MongoDB -----------------------------------------------------------------------

class MongoStore:
    """Telemetry in a MongoDB-protocol server. `samples` is a time-series
    collection where the server supports one, else a plain collection with a
    (meta.kind, meta.host, time) index; TTL where supported. What was found is in
    `features`."""

    kind = "mongodb"

    def __init__(self, uri: str, *, ttl_seconds: int | None = None,
                 timeout_ms: int = 2000, database: str | None = None,
                 insert_timeout_s: float = 15.0):
        import pymongo

        self.uri = uri
        self.insert_timeout_s = insert_timeout_s
        self.ttl_seconds = ttl_seconds
        self.client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms,
            # Queries over big windows may take long on a loaded server; inserts
            # get their own, short deadline (insert_timeout_s) instead.
            socketTimeoutMS=120_000, retryWrites=False,
            appname="megafleet-collect")
        # An explicit database wins over the one in the URI (tests use their own).
        self.db = (self.client[database] if database
                   else self.client.get_default_database(default="megafleet"))
        self.features: dict[str, Any] = {}
        # Set up on first use, not here: a collector may start while the store is
        # away, and spools until it answers.
        self._ready = False

    def _ensure(self) -> None:
        if not self._ready:
            self._set_up()
            self._ready = True

    def __repr__(self) -> str:
        return f"MongoStore({self.db.name!r})"

    def _set_up(self) -> None:
        import pymongo
        from pymongo.errors import OperationFailure, PyMongoError

        try:
            info = self.client.admin.command("buildInfo")
            existing = {c["name"]: c for c in self.db.list_collections()}
        except PyMongoError as exc:
            raise StoreUnavailable(f"{_safe_uri(self.uri)}: {exc}") from exc
        server = f"MongoDB {info.get('version', '?')}"
        if "ferretdbVersion" in info:
            server = f"FerretDB {info['ferretdbVersion']}"
        self.features = {"server": server, "timeseries": False, "ttl": False}

        if SAMPLES in existing:
            self.features["timeseries"] = existing[SAMPLES].get("type") == "timeseries"
        else:
            options: dict[str, Any] = {"timeseries": {"timeField": "time", "metaField": "meta",
                                                      "granularity": "seconds"}}
            if self.ttl_seconds:
                options["expireAfterSeconds"] = int(self.ttl_seconds)
            try:
                self.db.create_collection(SAMPLES, **options)
                made = {c["name"]: c for c in self.db.list_collections(filter={"name": SAMPLES})}
                # Detect, don't assume: a server may accept the option and ignore it.
                self.features["timeseries"] = made.get(SAMPLES, {}).get("type") == "timeseries"
            except OperationFailure:
                self.db.create_collection(SAMPLES)
        if EVENTS not in existing:
            try:
                self.db.create_collection(EVENTS)
            except OperationFailure:
                pass  # created meanwhile by another collector

        kind_host_time = [("meta.kind", pymongo.ASCENDING), ("meta.host", pymongo.ASCENDING),
                          ("time", pymongo.ASCENDING)]
        for name in COLLECTIONS:
            if not (name == SAMPLES and self.features["timeseries"]):
                self.db[name].create_index(kind_host_time, name="kind_host_time")
        if self.features["timeseries"]:
            options = existing.get(SAMPLES, {}).get("options", {})
            self.features["ttl"] = bool(self.ttl_seconds) and (
                SAMPLES not in existing or "expireAfterSeconds" in options)
        elif self.ttl_seconds:
            try:
                self.db[SAMPLES].create_index([("time", pymongo.ASCENDING)], name="ttl",
                                              expireAfterSeconds=int(self.ttl_seconds))
                index = self.db[SAMPLES].index_information().get("ttl", {})
                self.features["ttl"] = "expireAfterSeconds" in index
            except OperationFailure:
                self.features["ttl"] = False

    def ping(self) -> None:
        from pymongo.errors import PyMongoError

        try:
            self.client.admin.command("ping")
            self._ensure()
        except PyMongoError as exc:
            raise StoreUnavailable(f"{_safe_uri(self.uri)}: {exc}") from exc

    def insert(self, collection: str, docs: list[dict[str, Any]], replay: bool = False) -> int:
        import pymongo
        from pymongo.errors import (BulkWriteError, ConnectionFailure, OperationFailure,
                                    PyMongoError)

        _check_collection(collection)
        if not docs:
            return 0
        coll = self.db[collection]
        try:
            self._ensure()
            if replay and collection == SAMPLES and self.features.get("timeseries"):
                # Time-series collections do not enforce unique _id: skip what a
                # partial insert before the outage already stored.
                ids = [d["_id"] for d in docs]
                have = {d["_id"] for d in coll.find({"_id": {"$in": ids}}, {"_id": 1})}
                docs = [d for d in docs if d["_id"] not in have]
                if not docs:
                    return 0
            # A deadline per batch: a server that stopped answering (not one that
            # refuses connections) must not hold the writer for long.
            with pymongo.timeout(self.insert_timeout_s):
                result = coll.insert_many(docs, ordered=False)
            return len(result.inserted_ids)
        except BulkWriteError as exc:
            details = exc.details or {}
            others = [e for e in details.get("writeErrors", []) if e.get("code") != 11000]
            if others:
                raise StoreRejected(f"{collection}: {len(others)} documents refused, first: "
                                    f"{others[0].get('errmsg')}") from exc
            return int(details.get("nInserted", 0))
        except ConnectionFailure as exc:  # AutoReconnect, timeouts, server selection
            raise StoreUnavailable(f"{_safe_uri(self.uri)}: {exc}") from exc
        except OperationFailure as exc:
            # Shutting down, not primary, or our deadline ran out: try again later.
            if exc.timeout or exc.code in (50, 91, 189, 11600, 11602, 13435, 13436):
                raise StoreUnavailable(f"{_safe_uri(self.uri)}: {exc}") from exc
            raise StoreRejected(f"{collection}: {exc}") from exc
        except PyMongoError as exc:
            raise StoreUnavailable(f"{_safe_uri(self.uri)}: {exc}") from exc

    def find(self, collection: str, flt: dict[str, Any] | None = None, limit: int = 0,
             projection: list[str] | None = None) -> list[dict[str, Any]]:
        from pymongo.errors import ConnectionFailure

        _check_collection(collection)
        proj = {f: 1 for f in projection} if projection else None
        self._ensure()
        try:
            cursor = self.db[collection].find(flt or {}, proj).sort([("time", 1), ("_id", 1)])
            if limit:
                cursor = cursor.limit(int(limit))
            return list(cursor)
        except ConnectionFailure as exc:
            raise StoreUnavailable(f"{_safe_uri(self.uri)}: {exc}") from exc

    def count(self, collection: str, flt: dict[str, Any] | None = None) -> int:
        _check_collection(collection)
        self._ensure()
        return self.db[collection].count_documents(flt or {})

    def delete_before(self, collection: str, before: datetime) -> int:
        _check_collection(collection)
        self._ensure()
        return self.db[collection].delete_many({"time": {"$lt": before}}).deleted_count

    def drop(self) -> None:
        for name in COLLECTIONS:
            self.db[name].delete_many({})

    def close(self) -> None:
        self.client.close()


def _safe_uri(uri: str) -> str:
    """The URI without a password, for messages."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return uri


def open_store(uri: str | None = None, *, sqlite_path: Path | str | None = None,
               ttl_seconds: int | None = None, timeout_ms: int = 2000):
    """The store named by `uri`, else $MEGAFLEET_MONGO_URI, else SQLite in the
    state directory."""
    uri = uri or os.environ.get(URI_ENV) or None
    if uri is None or uri.startswith("sqlite:"):
        path = sqlite_path
        if uri and uri.startswith("sqlite:"):
            path = uri[len("sqlite:"):].removeprefix("//") or None
        return SqliteStore(path)
    if not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError(f"telemetry store {uri!r}: use mongodb://HOST:PORT/DB, "
                         "sqlite:PATH, or nothing for SQLite in the state directory")
    return MongoStore(uri, ttl_seconds=ttl_seconds, timeout_ms=timeout_ms)
