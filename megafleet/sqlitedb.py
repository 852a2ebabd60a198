"""SQLite the way megafleet's per-host files use it (ledger, vm state, telemetry).

WAL, so readers (`vm ls`, `status`) never wait for a writer; autocommit, so each
statement or explicit transaction stands alone; a 30 s busy timeout, so two
processes writing the same file wait for each other instead of failing. A
connection belongs to one thread: `PerThread` hands each thread its own.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable


def connect(path: Path | str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=check_same_thread)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class PerThread:
    """Calling it gives this thread's connection to `path`, opened on first use;
    `on_open` sees each new connection (to close them all later, say)."""

    def __init__(self, path: Path | str, *, check_same_thread: bool = True,
                 on_open: Callable[[sqlite3.Connection], None] | None = None):
        self.path = path
        self._check_same_thread = check_same_thread
        self._on_open = on_open
        self._local = threading.local()

    def __call__(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path, check_same_thread=self._check_same_thread)
            if self._on_open is not None:
                self._on_open(db)
        return db

    def close(self) -> None:
        """Close this thread's connection (the next call opens a new one)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
