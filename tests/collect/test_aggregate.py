"""One document per host and interval for all its guests (GuestSampler's
`aggregate`), read from this host's real /proc."""

from __future__ import annotations

import os

import trio

from megafleet.collect import docs as D
from megafleet.collect.samplers import GuestInfo, GuestSampler


def test_aggregated_guest_samples_are_one_document_per_interval():
    guests = [GuestInfo("mfc-a1", "running", os.getpid(), "tiny"),
              GuestInfo("mfc-a2", "running", None, "tiny", cpu_s=2.0, rss_kb=100),
              GuestInfo("mfc-a3", "failed", None, "tiny", reason="no ready line", changed_ms=900)]
    sampler = GuestSampler("mfc-h", lambda: guests, aggregate=True)
    first = sampler.sample(1000)
    sum(i * i for i in range(300_000))      # CPU between the two readings
    second = sampler.sample(2000)
    samples = [d for d in second if d["meta"]["kind"] == D.GUEST]
    assert len(samples) == 1
    agg = samples[0]
    assert agg["_id"] == "guest:mfc-h::all:2000" and agg["meta"] == {"kind": "guest", "host": "mfc-h"}
    assert agg["aggregate"] is True and agg["guests"] == 3
    assert agg["states"] == {"running": 2, "failed": 1}
    own_rss = next(d for d in first if d["meta"]["kind"] == D.GUEST)["rss_kb"]
    assert agg["rss_kb"] > own_rss // 2 and agg["rss_kb_max"] >= 100
    assert agg["cpu_pct"] > 0 and agg["cpu_pct_max"] == agg["cpu_pct"]   # only the live one moved
    # The failed guest's boot event stays a per-guest event (once).
    assert [e["meta"].get("guest") for e in first if e["meta"]["kind"] == "event"] == ["mfc-a3"]
    assert not [e for e in second if e["meta"]["kind"] == "event"]


def test_an_aggregating_sampler_sends_one_document_per_interval():
    guests = [GuestInfo(f"mfc-g{i}", "running", None, "tiny", cpu_s=1.0, rss_kb=1) for i in range(2500)]
    sampler = GuestSampler("mfc-h", lambda: guests, interval=0.2, slice_size=1000, aggregate=True)
    sampler.cpu_share = 1.0             # the cadence is tested here, not the CPU budget
    got: list[dict] = []

    async def main():
        with trio.move_on_after(0.5):
            await sampler.run(got.append)

    trio.run(main)
    assert 2 <= len(got) <= 4          # one per 0.2 s interval, not 2,500 per interval
    assert all(d["guests"] == 2500 and d["rss_kb"] == 2500 for d in got)
