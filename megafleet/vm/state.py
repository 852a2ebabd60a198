"""Per-host record of the guests this host runs, and the things made for them.

Two records, both SQLite in the state directory:

- the guests table (``vm.sqlite``): one row per guest with its spec, the state
  the engine last knew (starting, running, failed, stopped), its pid and pid
  start time, boot time, attempts and, for a failure, the reason and console
  tail. `vm ls` reconciles these rows with /proc, so it shows the truth even
  after the engine was killed mid-boot.
- the shared resource ledger (`megafleet.ledger`, owner ``vm``): every process,
  directory (sockets, console logs, overlay layers) and libvirt domain, recorded
  *before* it is created and forgotten only after it is gone. Teardown walks the
  ledger, so it is complete after any crash.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from megafleet import paths, sqlitedb

OWNER = "vm"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS guests (
    name         TEXT PRIMARY KEY,
    driver       TEXT NOT NULL,
    image        TEXT NOT NULL,
    spec         TEXT NOT NULL,
    state        TEXT NOT NULL,
    pid          INTEGER,
    pid_start    INTEGER,
    boot_s       REAL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    reason       TEXT,
    console_tail TEXT,
    handle       TEXT NOT NULL DEFAULT '{}',
    created      REAL NOT NULL,
    updated      REAL NOT NULL
);
"""

STATES = ("starting", "running", "failed", "stopped")


@dataclass
class GuestRecord:
    name: str
    driver: str
    image: str
    spec: dict[str, Any]
    state: str
    pid: int | None = None
    pid_start: int | None = None
    boot_s: float | None = None
    attempts: int = 0
    reason: str | None = None
    console_tail: str | None = None
    handle: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0


@dataclass
class GuestStatus:
    """A guest's row without its spec: what `Engine.apply` checks for every
    guest on record (is it still running, what did its boot take, how much
    memory does it hold). Parsing each spec was most of reading a thousand
    rows, and a reconciling `up` reads them all to add a few."""

    name: str
    driver: str
    state: str
    pid: int | None
    pid_start: int | None
    boot_s: float | None
    attempts: int
    mem_mb: int
    handle: dict[str, Any]


_COLUMNS = ("name", "driver", "image", "spec", "state", "pid", "pid_start", "boot_s",
            "attempts", "reason", "console_tail", "handle", "created", "updated")


class VmState:
    """The guests table. One connection per thread (sqlite3 objects may not cross
    threads); WAL so `vm ls` reads while an engine writes."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else paths.state_dir() / "vm.sqlite"
        self._db = sqlitedb.PerThread(self.path)
        self._db().executescript(_SCHEMA)

    def put_many(self, records: Iterable[GuestRecord]) -> None:
        """Insert or replace whole rows, in one transaction."""
        now = time.time()
        rows = []
        for r in records:
            r.created = r.created or now
            r.updated = now
            rows.append((r.name, r.driver, r.image, json.dumps(r.spec, sort_keys=True), r.state,
                         r.pid, r.pid_start, r.boot_s, r.attempts, r.reason, r.console_tail,
                         json.dumps(r.handle, sort_keys=True), r.created, r.updated))
        db = self._db()
        with db:
            db.executemany(f"INSERT OR REPLACE INTO guests ({','.join(_COLUMNS)}) "
                           f"VALUES ({','.join('?' * len(_COLUMNS))})", rows)

    def update(self, name: str, **fields: Any) -> None:
        if not fields:
            return
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown guest fields {sorted(unknown)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown guest state {fields['state']!r}")
        if "handle" in fields:
            fields["handle"] = json.dumps(fields["handle"], sort_keys=True)
        fields["updated"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        db = self._db()
        with db:
            db.execute(f"UPDATE guests SET {sets} WHERE name=?", [*fields.values(), name])

    def get(self, name: str) -> GuestRecord | None:
        row = self._db().execute(f"SELECT {','.join(_COLUMNS)} FROM guests WHERE name=?",
                                 (name,)).fetchone()
        return _record(row) if row else None

    def statuses(self) -> list[GuestStatus]:
        """Every guest on record as a GuestStatus (no spec parsed)."""
        rows = self._db().execute(
            "SELECT name, driver, state, pid, pid_start, boot_s, attempts,"
            " coalesce(json_extract(spec, '$.mem_mb'), 0), handle FROM guests ORDER BY created, name")
        return [GuestStatus(name, driver, state, pid, pid_start, boot_s, attempts, int(mem_mb),
                            json.loads(handle or "{}"))
                for name, driver, state, pid, pid_start, boot_s, attempts, mem_mb, handle in rows]

    def handle_values(self, key: str) -> dict[str, Any]:
        """name -> its handle's `key` (an identifier: agent, gdir, ...), of
        the guests whose handle has one; no row parsed in Python."""
        if not key.isidentifier():
            raise ValueError(f"handle key {key!r} is not an identifier")
        path = f"$.{key}"
        rows = self._db().execute("SELECT name, json_extract(handle, ?) FROM guests"
                                  " WHERE json_extract(handle, ?) IS NOT NULL", (path, path))
        return dict(rows)

    def updated(self) -> dict[str, float]:
        """name -> time of its row's last change (seconds since the epoch), of
        every guest on record, without parsing any row."""
        return dict(self._db().execute("SELECT name, updated FROM guests"))

    def names(self) -> set[str]:
        """The names of the guests on record (any state), without their rows."""
        return {row[0] for row in self._db().execute("SELECT name FROM guests")}

    def list(self, pattern: str = "*", specs: bool = True) -> list[GuestRecord]:
        """The guests whose names match `pattern`, oldest first. With
        `specs=False` each record's spec is left empty ({}), unparsed: most
        of the cost of reading thousands of rows, for callers that need only
        states, pids and handles."""
        columns = ",".join(c if specs or c != "spec" else "'{}'" for c in _COLUMNS)
        rows = self._db().execute(f"SELECT {columns} FROM guests ORDER BY created, name")
        return [r for r in map(_record, rows) if fnmatch.fnmatchcase(r.name, pattern)]

    def count(self) -> int:
        """How many guests are on record, in any state."""
        return int(self._db().execute("SELECT count(*) FROM guests").fetchone()[0])

    def delete_many(self, names: Iterable[str]) -> None:
        db = self._db()
        with db:
            db.executemany("DELETE FROM guests WHERE name=?", [(n,) for n in names])

    def close(self) -> None:
        self._db.close()


def _record(row: tuple) -> GuestRecord:
    data = dict(zip(_COLUMNS, row))
    data["spec"] = json.loads(data["spec"])
    data["handle"] = json.loads(data["handle"] or "{}")
    return GuestRecord(**data)
