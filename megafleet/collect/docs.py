"""The shape of telemetry documents.

Every document has:

- ``_id``: deterministic, built from what the document is about and when it was
  taken, so that sending the same document twice (a spool replay after a partial
  insert) stores it once;
- ``time``: a UTC datetime with millisecond precision (what MongoDB stores; the
  SQLite store keeps the same precision so both answer identically);
- ``meta``: what the measurement is about: ``kind`` and ``host`` always, then
  ``guest``, ``image``, ``iface``, ``switch`` as they apply. It is the
  ``metaField`` of a MongoDB time-series collection;
- the measurements themselves, as top-level fields (numbers, strings, booleans
  and sub-documents of those; never arrays, which the SQLite filter translation
  does not model).

Samples (periodic, may be dropped under overload) go to the ``samples``
collection; events (boots, teardowns, errors, drop reports: never dropped) go to
``events``.
"""

from __future__ import annotations

import time as _time
from datetime import datetime, timezone
from typing import Any

SAMPLES = "samples"
EVENTS = "events"
COLLECTIONS = (SAMPLES, EVENTS)

# Sample kinds (meta.kind in `samples`).
GUEST = "guest"
AGENT = "agent"
IFACE = "iface"
HOST = "host"
SNIFF = "sniff"
PIPELINE = "pipeline"
KSM = "ksm"            # the ksm daemon's own samples (policy mode, ksmd CPU)
SAMPLE_KINDS = (GUEST, AGENT, IFACE, HOST, SNIFF, PIPELINE, KSM)

# Event levels; `event` names what happened (boot, teardown, drops, spool-full...).
LEVELS = ("info", "warning", "error")


def now_ms() -> int:
    return int(_time.time() * 1000)


def ms_to_datetime(ms: int) -> datetime:
    """A naive UTC datetime, as pymongo returns them (tz_aware=False)."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).replace(tzinfo=None)


def datetime_to_ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(round(value.timestamp() * 1000))


def doc_id(meta: dict[str, Any], time_ms: int, extra: str = "") -> str:
    """kind:host:subject[:extra]:time_ms. The subject is the guest, interface or
    switch the document is about (empty for host-wide documents)."""
    subject = meta.get("guest") or meta.get("iface") or meta.get("switch") or ""
    parts = [meta["kind"], meta["host"], subject]
    if extra:
        parts.append(extra)
    parts.append(str(time_ms))
    return ":".join(parts)


def sample(kind: str, host: str, fields: dict[str, Any], *, time_ms: int | None = None,
           extra: str = "", **meta: Any) -> dict[str, Any]:
    """A sample document of `kind` about `host` (and the subject in `meta`);
    `extra` disambiguates two samples of one subject in the same millisecond."""
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; known: {', '.join(SAMPLE_KINDS)}")
    ms = now_ms() if time_ms is None else int(time_ms)
    m = {"kind": kind, "host": host}
    m.update({k: v for k, v in meta.items() if v is not None})
    doc = {"_id": doc_id(m, ms, extra), "time": ms_to_datetime(ms), "meta": m}
    doc.update(fields)
    return doc


def event(name: str, host: str, *, level: str = "info", time_ms: int | None = None,
          guest: str | None = None, image: str | None = None, seq: int = 0,
          **fields: Any) -> dict[str, Any]:
    """An event document (never dropped). `seq` disambiguates two events of the
    same name about the same subject in the same millisecond."""
    if level not in LEVELS:
        raise ValueError(f"unknown event level {level!r}; known: {', '.join(LEVELS)}")
    ms = now_ms() if time_ms is None else int(time_ms)
    m = {"kind": "event", "host": host}
    if guest is not None:
        m["guest"] = guest
    if image is not None:
        m["image"] = image
    extra = name if not seq else f"{name}.{seq}"
    doc = {"_id": doc_id(m, ms, extra), "time": ms_to_datetime(ms), "meta": m,
           "event": name, "level": level}
    doc.update({k: v for k, v in fields.items() if v is not None})
    return doc
