"""The resource ledger: a record of everything megafleet creates on this host.

The rule: record a resource *before* creating it, forget it only *after* it is
gone. After any crash, the ledger therefore lists a superset of what exists, and
teardown walks it, removing what is there and forgetting what is not.

One SQLite file (WAL) in the state directory; each package uses its own `owner`
(e.g. "vm", "net") and its own kinds ("process", "tap", "bridge", "netns", ...).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from megafleet import paths, sqlitedb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    owner   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    key     TEXT NOT NULL,
    data    TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (owner, kind, key)
);
"""


@dataclass(frozen=True)
class Resource:
    owner: str
    kind: str
    key: str
    data: dict[str, Any]
    created: float


class Ledger:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else paths.state_dir() / "ledger.sqlite"
        self._db = sqlitedb.PerThread(self.path)
        with self._db() as db:
            db.executescript(_SCHEMA)

    def record(self, owner: str, kind: str, key: str, **data: Any) -> None:
        self.record_many(owner, kind, [(key, data)])

    def record_many(self, owner: str, kind: str, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Record many resources in one transaction (and one fsync)."""
        now = time.time()
        rows = [(owner, kind, key, json.dumps(data, sort_keys=True), now) for key, data in items]
        db = self._db()
        with db:
            db.executemany(
                "INSERT INTO resources VALUES (?,?,?,?,?) ON CONFLICT(owner,kind,key) "
                "DO UPDATE SET data=excluded.data", rows)

    def forget(self, owner: str, kind: str, key: str) -> None:
        self.forget_many(owner, kind, [key])

    def forget_many(self, owner: str, kind: str, keys: Iterable[str]) -> None:
        db = self._db()
        with db:
            db.executemany("DELETE FROM resources WHERE owner=? AND kind=? AND key=?",
                           [(owner, kind, k) for k in keys])

    def list(self, owner: str | None = None, kind: str | None = None) -> list[Resource]:
        sql, args = "SELECT owner, kind, key, data, created FROM resources", []
        where = []
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created, key"
        return [Resource(o, k, key, json.loads(d), c)
                for o, k, key, d, c in self._db().execute(sql, args)]

    def close(self) -> None:
        self._db.close()
