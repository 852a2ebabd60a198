"""The questions fleet operators ask, answered the same way by every store.

Each query pushes its selection (kind, time window, host) down to the store as a
MongoDB filter, which both stores answer, and reduces the documents here, in one
place: the SQLite store and a MongoDB server therefore give identical answers on
identical data (the conformance tests check it). All functions are blocking.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from megafleet.collect import docs as D

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BadQuery(ValueError):
    pass


def parse_duration(text: str) -> float:
    """'30s', '10m', '2h', '7d' in seconds."""
    match = _DURATION_RE.fullmatch(text.strip())
    if not match:
        raise BadQuery(f"{text!r}: use a duration like 30s, 10m, 2h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """'10m', '2h', '1d', '30s' ago, or an ISO date (UTC if no zone), as a naive
    UTC datetime; None for None/'all'."""
    if text is None or text == "all":
        return None
    now = now or D.ms_to_datetime(D.now_ms())
    match = _DURATION_RE.fullmatch(text.strip())
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(f"--since {text!r}: use a duration like 30s, 10m, 2h, 1d, or an ISO "
                       "date like 2026-01-01T12:00:00Z") from None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): always one of the values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _where(kind: str | None, since: datetime | None, host: str | None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    flt: dict[str, Any] = {}
    if kind:
        flt["meta.kind"] = kind
    if host:
        flt["meta.host"] = host
    if since is not None:
        flt["time"] = {"$gte": since}
    if extra:
        flt.update(extra)
    return flt


def latest_guests(store, since: datetime | None, host: str | None = None) -> list[dict]:
    """The newest guest sample of each (host, guest) in the window."""
    latest: dict[tuple[str, str], dict] = {}
    for doc in store.find(D.SAMPLES, _where(D.GUEST, since, host)):
        latest[(doc["meta"]["host"], doc["meta"]["guest"])] = doc  # sorted by time
    return [latest[k] for k in sorted(latest)]


def status(store, since: datetime | None, host: str | None = None) -> list[dict]:
    """Guests by state per host: rows of {host, state, guests}."""
    counts: dict[tuple[str, str], int] = {}
    for doc in latest_guests(store, since, host):
        key = (doc["meta"]["host"], doc.get("state", "unknown"))
        counts[key] = counts.get(key, 0) + 1
    return [{"host": h, "state": s, "guests": n} for (h, s), n in sorted(counts.items())]


def boot_times(store, since: datetime | None, host: str | None = None) -> list[dict]:
    """Boot durations by host and image: count, failures, p50/p95/p99, min, max."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in store.find(D.EVENTS, _where("event", since, host, {"event": "boot"})):
        key = (doc["meta"]["host"], doc["meta"].get("image") or "-")
        group = groups.setdefault(key, {"durations": [], "failures": 0})
        if doc.get("ok") and isinstance(doc.get("duration_s"), (int, float)):
            group["durations"].append(doc["duration_s"])
        elif not doc.get("ok"):
            group["failures"] += 1
    rows = []
    for (h, image), g in sorted(groups.items()):
        d = g["durations"]
        rows.append({"host": h, "image": image, "boots": len(d), "failures": g["failures"],
                     "p50_s": percentile(d, 50), "p95_s": percentile(d, 95),
                     "p99_s": percentile(d, 99), "min_s": min(d) if d else None,
                     "max_s": max(d) if d else None})
    return rows


def boot_durations(store, since: datetime | None, host: str | None = None) -> dict[str, list]:
    """Successful boot durations by image (for the CDF plot), each sorted."""
    out: dict[str, list[float]] = {}
    for doc in store.find(D.EVENTS, _where("event", since, host, {"event": "boot", "ok": True})):
        if isinstance(doc.get("duration_s"), (int, float)):
            out.setdefault(doc["meta"].get("image") or "-", []).append(doc["duration_s"])
    return {k: sorted(v) for k, v in sorted(out.items())}


TOP_KEYS = {"cpu": "cpu_pct", "mem": "rss_kb"}


def top(store, by: str, since: datetime | None, limit: int = 10,
        host: str | None = None) -> list[dict]:
    """Guests by CPU (percent of one core over the last interval) or memory (RSS)."""
    if by not in TOP_KEYS:
        raise BadQuery(f"top --by {by!r}: use one of {', '.join(TOP_KEYS)}")
    key = TOP_KEYS[by]
    rows = [{"host": d["meta"]["host"], "guest": d["meta"]["guest"],
             "image": d["meta"].get("image") or "-", "state": d.get("state"),
             "cpu_pct": d.get("cpu_pct"), "rss_kb": d.get("rss_kb"), "time": d["time"]}
            for d in latest_guests(store, since, host) if isinstance(d.get(key), (int, float))]
    rows.sort(key=lambda r: (-r[key], r["host"], r["guest"]))
    return rows[:limit] if limit else rows


def ksm(store, since: datetime | None, host: str | None = None) -> list[dict]:
    """KSM saving over time: rows of {time, host, saving_bytes, pages_shared,
    pages_sharing}."""
    rows = []
    for d in store.find(D.SAMPLES, _where(D.HOST, since, host,
                                          {"ksm_saving_bytes": {"$exists": True}})):
        counters = d.get("ksm") or {}
        rows.append({"time": d["time"], "host": d["meta"]["host"],
                     "saving_bytes": d["ksm_saving_bytes"],
                     "pages_shared": counters.get("pages_shared"),
                     "pages_sharing": counters.get("pages_sharing")})
    return rows


def net(store, since: datetime | None, limit: int = 10, host: str | None = None) -> list[dict]:
    """Busiest links: interfaces by mean throughput (rx+tx bytes/s) in the window,
    with the bytes, drops and errors counted over it."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for d in store.find(D.SAMPLES, _where(D.IFACE, since, host)):
        key = (d["meta"]["host"], d["meta"]["iface"])
        g = groups.setdefault(key, {"type": d["meta"].get("type"), "rates": [],
                                    "first": d, "last": d})
        g["last"] = d
        if "rx_bps" in d and "tx_bps" in d:
            g["rates"].append(d["rx_bps"] + d["tx_bps"])
    rows = []
    for (h, iface), g in groups.items():
        first, last = g["first"], g["last"]

        def delta(field: str) -> int:
            return max(0, last.get(field, 0) - first.get(field, 0))

        rates = g["rates"]
        rows.append({"host": h, "iface": iface, "type": g["type"],
                     "mean_bps": round(sum(rates) / len(rates), 3) if rates else 0.0,
                     "max_bps": max(rates) if rates else 0.0,
                     "bytes": delta("rx_bytes") + delta("tx_bytes"),
                     "packets": delta("rx_packets") + delta("tx_packets"),
                     "drops": delta("rx_dropped") + delta("tx_dropped"),
                     "errors": delta("rx_errors") + delta("tx_errors"),
                     "samples": len(rates) + 1})
    rows.sort(key=lambda r: (-r["mean_bps"], -r["bytes"], r["host"], r["iface"]))
    return rows[:limit] if limit else rows


def sniff(store, since: datetime | None, host: str | None = None) -> list[dict]:
    """Traffic by switch and protocol, summed over the window."""
    totals: dict[tuple[str, str, str], list[int]] = {}
    for d in store.find(D.SAMPLES, _where(D.SNIFF, since, host)):
        for proto, c in (d.get("protocols") or {}).items():
            t = totals.setdefault((d["meta"]["host"], d["meta"]["switch"], proto), [0, 0])
            t[0] += c.get("packets", 0)
            t[1] += c.get("bytes", 0)
    return [{"host": h, "switch": s, "protocol": p, "packets": n, "bytes": b}
            for (h, s, p), (n, b) in sorted(totals.items(), key=lambda kv: (-kv[1][1], kv[0]))]


def events(store, since: datetime | None, kind: str | None = None, host: str | None = None,
           guest: str | None = None, limit: int = 0) -> list[dict]:
    """Events, oldest first. `kind` is a level (info, warning, error) or an event
    name (boot, teardown, drops, ...)."""
    extra: dict[str, Any] = {}
    if kind in D.LEVELS:
        extra["level"] = kind
    elif kind:
        extra["event"] = kind
    if guest:
        extra["meta.guest"] = guest
    found = store.find(D.EVENTS, _where("event", since, host, extra))
    return found[-limit:] if limit else found
