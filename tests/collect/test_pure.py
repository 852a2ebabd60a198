"""Pure logic: durations, percentiles, ids, filter parsing, protocol classes."""

from __future__ import annotations

from datetime import datetime

import pytest

from megafleet.collect import docs as D
from megafleet.collect.filters import BadFilter, parse_filter_text, to_sql
from megafleet.collect.queries import BadQuery, parse_duration, parse_since, percentile
from megafleet.collect.sniff import Summary, classify


def test_parse_since_and_duration():
    now = datetime(2026, 11, 22, 12, 0, 0)
    assert parse_since("10m", now) == datetime(2026, 11, 22, 11, 50, 0)
    assert parse_since("1.5h", now) == datetime(2026, 11, 22, 10, 30, 0)
    assert parse_since("2026-11-22T13:00:00+01:00", now) == datetime(2026, 11, 22, 12, 0, 0)
    assert parse_since("all") is None and parse_since(None) is None
    with pytest.raises(BadQuery, match="--since 'ten'"):
        parse_since("ten")
    assert parse_duration("7d") == 7 * 86400
    with pytest.raises(BadQuery):
        parse_duration("7 weeks")


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (0, 20, 50, 95, 100)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    assert percentile([], 50) is None


def test_ids_are_deterministic_and_distinct():
    a = D.sample(D.GUEST, "h", {"state": "running"}, time_ms=5, guest="g1")
    assert a == D.sample(D.GUEST, "h", {"state": "running"}, time_ms=5, guest="g1")
    assert a["_id"] == "guest:h:g1:5"
    assert D.sample(D.GUEST, "h", {}, time_ms=6, guest="g1")["_id"] != a["_id"]
    e1 = D.event("boot", "h", time_ms=5, guest="g1", seq=1)
    e2 = D.event("boot", "h", time_ms=5, guest="g1", seq=2)
    assert e1["_id"] != e2["_id"]
    with pytest.raises(ValueError, match="unknown sample kind"):
        D.sample("disk", "h", {})
    with pytest.raises(ValueError, match="unknown event level"):
        D.event("boot", "h", level="fatal")


def test_filter_text_and_translation():
    flt = parse_filter_text('{"time": {"$gte": {"$date": "2026-01-01T00:00:00Z"}}, "a.b": 1}')
    assert flt["time"]["$gte"] == datetime(2026, 1, 1)
    sql, args = to_sql(flt)
    assert "time_ms >= ?" in sql and D.datetime_to_ms(datetime(2026, 1, 1)) in args
    assert '$."a"."b"' in args
    with pytest.raises(BadFilter, match="a filter must be a JSON object"):
        parse_filter_text("[1]")
    with pytest.raises(BadFilter, match="cannot mix operators and fields"):
        to_sql({"x": {"$gt": 1, "y": 2}})
    with pytest.raises(BadFilter, match=r"\$and: needs a non-empty list"):
        to_sql({"$and": []})


def frame(ethertype: int, proto: int | None = None, vlan: bool = False) -> bytes:
    head = b"\xff" * 12
    if vlan:
        head += b"\x81\x00\x00\x05"
    head += ethertype.to_bytes(2, "big")
    if ethertype == 0x0800:
        head += bytes([0x45, 0, 0, 84, 0, 0, 0, 0, 64, proto]) + bytes(10)
    elif ethertype == 0x86DD:
        head += bytes([0x60, 0, 0, 0, 0, 8, proto, 64]) + bytes(32)
    return head


def test_classify_frames():
    assert classify(frame(0x0800, 1), 98) == "ipv4_icmp"
    assert classify(frame(0x0800, 6, vlan=True), 1500) == "ipv4_tcp"
    assert classify(frame(0x86DD, 17), 100) == "ipv6_udp"
    assert classify(frame(0x0806), 42) == "arp"
    assert classify(frame(0x88B5), 60) == "ether_0x88b5"
    assert classify(b"\x00" * 10, 10) == "runt"
    s = Summary()
    s.add("arp", 42)
    s.add("arp", 60)
    assert s.fields(1.0, 3) == {"interval_s": 1.0, "packets": 2, "bytes": 102, "kernel_drops": 3,
                                "protocols": {"arp": {"packets": 2, "bytes": 102}}}
