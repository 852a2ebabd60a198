"""The durable spool: order, bounds, corruption (real files, pure logic)."""

from __future__ import annotations

import pytest

from megafleet.collect import docs as D
from megafleet.collect.spool import HEADER, Spool


def batch(n: int, start: int = 0) -> list[dict]:
    return [D.sample(D.GUEST, "mfc-h", {"state": "running", "i": i}, time_ms=1000 + i,
                     guest=f"mfc-g{i}") for i in range(start, start + n)]


def drain(spool: Spool) -> list[tuple[str, list[dict]]]:
    out = []
    while (item := spool.peek()) is not None:
        collection, docs, position = item
        out.append((collection, docs))
        spool.commit(position)
    return out


def test_replays_in_order_and_removes_segments(tmp_path):
    spool = Spool(tmp_path / "spool", segment_bytes=2000)
    batches = [batch(5, 5 * k) for k in range(6)]
    for k, b in enumerate(batches):
        assert spool.append(D.EVENTS if k == 2 else D.SAMPLES, b)
    assert len(spool.segments()) > 1 and not spool.empty()
    replayed = drain(spool)
    assert [docs for _, docs in replayed] == batches  # same documents, same order
    assert [c for c, _ in replayed][2] == D.EVENTS
    assert spool.empty() and spool.segments() == []
    spool.close()


def test_survives_reopening(tmp_path):
    first = Spool(tmp_path / "spool")
    first.append(D.SAMPLES, batch(3))
    first.close()  # as after a crash: a new process opens the same directory
    second = Spool(tmp_path / "spool")
    second.append(D.SAMPLES, batch(3, 3))
    assert [d["i"] for _, docs in drain(second) for d in docs] == [0, 1, 2, 3, 4, 5]
    second.close()


def test_full_spool_refuses_samples_keeps_events(tmp_path):
    warnings = []
    spool = Spool(tmp_path / "spool", max_bytes=2000, warn=warnings.append)
    assert spool.append(D.SAMPLES, batch(10))
    refused = not spool.append(D.SAMPLES, batch(10, 10))
    assert refused and spool.full
    assert len(warnings) == 1 and "is full" in warnings[0]
    assert not spool.append(D.SAMPLES, batch(10, 20))  # one warning, not one per batch
    assert len(warnings) == 1
    assert spool.append(D.EVENTS, batch(10, 30), force=True)  # events always go in
    drain(spool)
    assert spool.append(D.SAMPLES, batch(1))
    assert "room again" in warnings[-1]
    spool.close()


@pytest.mark.parametrize("damage", ["flip-payload", "bad-marker", "truncate"])
def test_corrupt_segment_skipped_with_warning(tmp_path, damage):
    warnings = []
    spool = Spool(tmp_path / "spool", segment_bytes=1, warn=warnings.append)  # 1 batch each
    for k in range(5):
        spool.append(D.SAMPLES, batch(4, 4 * k))
    spool.close()
    segments = spool.segments()
    assert len(segments) == 5
    victim = segments[2]
    data = bytearray(victim.read_bytes())
    if damage == "flip-payload":
        data[HEADER.size + 20] ^= 0xFF
    elif damage == "bad-marker":
        data[0:4] = b"XXXX"
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))

    reopened = Spool(tmp_path / "spool", warn=warnings.append)
    got = [d["i"] for _, docs in drain(reopened) for d in docs]
    assert got == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17, 18, 19]
    assert len(warnings) == 1 and str(victim) in warnings[0] and "corrupt" in warnings[0]
    assert reopened.corrupt_segments == 1 and reopened.segments() == []


def test_one_collector_per_spool_directory(tmp_path):
    from megafleet.collect.spool import SpoolBusy

    first = Spool(tmp_path / "spool")
    with pytest.raises(SpoolBusy, match="in use by another collector"):
        Spool(tmp_path / "spool")
    first.close()
    Spool(tmp_path / "spool").close()  # free again once closed
