"""Samplers on this host's real /proc and /sys."""

from __future__ import annotations

import os
import time

import trio

from megafleet.collect import docs as D
from megafleet.collect.linkstats import read_links
from megafleet.collect.samplers import GuestInfo, GuestSampler, HostSampler, InterfaceSampler, read_proc_usage


def test_guest_readings_come_from_proc():
    cpu_s, rss_kb, start = read_proc_usage(os.getpid())
    assert cpu_s > 0 and rss_kb > 1000 and start > 0
    assert read_proc_usage(2**22 + 7) is None  # no such process: None, no error
    sampler = GuestSampler("mfc-h", lambda: [GuestInfo("mfc-g1", "running", os.getpid(), "tiny"),
                                             GuestInfo("mfc-g2", "stopped", None, "tiny")])
    first = {d["meta"]["guest"]: d for d in sampler.sample(1000)}
    sum(i * i for i in range(300_000))  # burn some CPU between the two readings
    second = {d["meta"]["guest"]: d for d in sampler.sample(2000)}
    assert "cpu_pct" not in first["mfc-g1"] and second["mfc-g1"]["cpu_pct"] > 0
    assert second["mfc-g1"]["rss_kb"] > 1000 and second["mfc-g1"]["pid"] == os.getpid()
    assert second["mfc-g2"] == {"_id": "guest:mfc-h:mfc-g2:2000", "time": D.ms_to_datetime(2000),
                                "meta": {"kind": "guest", "host": "mfc-h", "guest": "mfc-g2",
                                         "image": "tiny"}, "state": "stopped"}


def test_many_guests_are_read_in_slices_across_the_interval():
    guests = [GuestInfo(f"mfc-g{i}", "running", None, "tiny", cpu_s=1.0, rss_kb=1) for i in range(25)]
    sampler = GuestSampler("mfc-h", lambda: guests, interval=1.5, slice_size=10)
    got: list[tuple[float, dict]] = []

    async def main():
        start = trio.current_time()
        with trio.CancelScope() as scope:
            def submit(doc):
                got.append((trio.current_time() - start, doc))
                if len(got) == len(guests):
                    scope.cancel()  # one full interval seen
            await sampler.run(submit)

    trio.run(main)
    assert sorted(d["meta"]["guest"] for _, d in got) == sorted(g.name for g in guests)
    # Three slices of at most 10 guests, each not before its share of the interval
    # (a lower bound: sleeping never ends early, whatever the load).
    times = [t for t, _ in got]
    assert times[10] >= 0.5 - 1e-3 and times[20] >= 1.0 - 1e-3 and times[0] <= times[10]


def test_interfaces_and_host():
    kinds = {link.name: link.kind for link in read_links()}
    assert kinds["lo"] == "other" and set(kinds) == set(os.listdir("/sys/class/net"))
    docs = InterfaceSampler("mfc-h", select=lambda name, kind: name == "lo").sample(1000)
    assert [d["meta"]["iface"] for d in docs] == ["lo"]
    assert set(docs[0]) >= {"rx_bytes", "tx_bytes", "rx_packets", "rx_dropped", "tx_errors"}
    host = HostSampler("mfc-h").sample(1000)[0]
    assert host["mem_total_kb"] > host["mem_available_kb"] > 0 and host["load1"] >= 0


def test_lifecycle_from_engine_state_becomes_events():
    listing = [GuestInfo("mfc-g1", "starting", None, "tiny", changed_ms=1000)]
    sampler = GuestSampler("mfc-h", lambda: listing)

    def events(now):
        return [d for d in sampler.sample(now) if d["meta"]["kind"] == "event"]

    assert events(1500) == []
    listing[:] = [GuestInfo("mfc-g1", "running", None, "tiny", boot_s=4.25, changed_ms=2000),
                  GuestInfo("mfc-g2", "failed", None, "tiny", reason="timeout", changed_ms=2100)]
    boot = events(2500)
    assert [(e["event"], e["ok"], e.get("duration_s"), e.get("reason")) for e in boot] == [
        ("boot", True, 4.25, None), ("boot", False, None, "timeout")]
    assert boot[0]["_id"] == "event:mfc-h:mfc-g1:boot:2000"  # from the engine's change time
    assert events(3500) == []  # reported once
    listing[:] = listing[:1]
    gone = events(4500)
    assert [(e["event"], e["meta"]["guest"]) for e in gone] == [("teardown", "mfc-g2")]
    # A new sampler (a restarted collector) reports the same boot with the same id.
    again = GuestSampler("mfc-h", lambda: listing).sample(5000)
    assert [d["_id"] for d in again if d["meta"]["kind"] == "event"] == [boot[0]["_id"]]


def test_boot_progress_hook_reports_engine_results():
    manifest = __import__("pytest").importorskip("megafleet.vm.spec")
    from megafleet.collect.sources import boot_progress

    seen = []

    class Recorder:
        def boot(self, guest, **kw):
            seen.append((guest, kw))

    specs = [manifest.GuestSpec(name="mfc-a", image="tiny"), manifest.GuestSpec(name="mfc-b", image="big")]
    progress = boot_progress(Recorder(), specs)
    progress(1, 2, manifest.GuestResult("mfc-a", "qemu", "ready", boot_s=3.5, attempts=1))
    progress(2, 2, manifest.GuestResult("mfc-b", "qemu", "failed", attempts=2, reason="no ready line"))
    progress(2, 2, manifest.GuestResult("mfc-c", "qemu", "already"))
    assert seen == [("mfc-a", {"ok": True, "duration_s": 3.5, "image": "tiny", "reason": None}),
                    ("mfc-b", {"ok": False, "duration_s": None, "image": "big",
                               "reason": "no ready line"})]


def test_final_events_are_the_boots_since_the_last_interval():
    """What a stopping collector still stores (Collector.final_events): the
    boots recorded since its last interval, once, with the interval's ids."""
    listing = [GuestInfo("mfc-g1", "running", None, "tiny", boot_s=1.5, changed_ms=1000)]
    sampler = GuestSampler("mfc-h", lambda: listing)
    assert [d["_id"] for d in sampler.sample(1500) if d["meta"]["kind"] == "event"] == [
        "event:mfc-h:mfc-g1:boot:1000"]
    # Recorded running after that interval (down settled an interrupted up's guests).
    listing.append(GuestInfo("mfc-g2", "running", None, "tiny", boot_s=2.0, changed_ms=1700))
    final = sampler.final_events(1800)
    assert [(d["event"], d["meta"]["guest"], d["_id"]) for d in final] == [
        ("boot", "mfc-g2", "event:mfc-h:mfc-g2:boot:1700")]
    assert sampler.final_events(1900) == []          # each boot once


def test_a_guest_becoming_running_during_a_read_is_one_boot():
    """vm_guest_source reads the states, then each record's change time: a
    guest recorded running between the two reads is one boot event, not one
    with its 'starting' time and another with its 'running' one."""
    from types import SimpleNamespace

    from megafleet.collect.sources import vm_guest_source

    rec = {"state": "starting", "boot_s": None, "updated": 1.000}

    def becomes_running():      # the engine's write, between whichever two reads
        rec.update(state="running", boot_s=0.688, updated=2.5)

    class Engine:
        reads = 0

        def _read(self):
            self.reads += 1
            snapshot = dict(rec)
            if self.reads == 1:
                becomes_running()
            return snapshot

        def list(self, pattern):
            r = self._read()
            return [SimpleNamespace(name="mfc-g1", state=r["state"], pid=None, image="tiny", rss_bytes=None,
                                    boot_s=r["boot_s"], reason=None)]

        @property
        def state(self):
            return SimpleNamespace(updated=lambda: {"mfc-g1": self._read()["updated"]})

    sampler = GuestSampler("mfc-h", vm_guest_source(Engine()))
    ids = [d["_id"] for now in (1100, 2100, 3100) for d in sampler.sample(now) if d["meta"]["kind"] == "event"]
    assert ids == ["event:mfc-h:mfc-g1:boot:2500"]


def test_a_guest_running_by_its_console_before_its_record_is_one_boot_later():
    """Running by its console (Engine.list) before the engine records it: no
    boot yet, and the record's boot comes once it is there, even with the
    same change time (the change time is read after the state)."""
    listing = [GuestInfo("mfc-g1", "running", None, "tiny", boot_s=None, changed_ms=2500)]
    sampler = GuestSampler("mfc-h", lambda: listing)
    assert [d for d in sampler.sample(2600) if d["meta"]["kind"] == "event"] == []
    listing[:] = [GuestInfo("mfc-g1", "running", None, "tiny", boot_s=0.688, changed_ms=2500)]
    assert [d["_id"] for d in sampler.sample(3600) if d["meta"]["kind"] == "event"] == [
        "event:mfc-h:mfc-g1:boot:2500"]
    assert [d for d in sampler.sample(4600) if d["meta"]["kind"] == "event"] == []


def test_a_sampler_whose_pass_costs_cpu_stretches_its_interval():
    """Passes average at most `cpu_share` of a CPU: a pass burning ~50 ms of CPU
    on a 20 ms interval with a 25 % share runs about every 200 ms; the same
    sampler with a share of 1 keeps (near) its cadence."""
    class Busy(HostSampler):
        name = "busy"

        def sample(self, now_ms):
            end = time.thread_time() + 0.05
            while time.thread_time() < end:
                pass
            return [D.sample(D.HOST, self.host, {"n": 1}, time_ms=now_ms)]

    def passes(share: float) -> tuple[int, float | None]:
        sampler = Busy("mfc-h", 0.02)
        sampler.cpu_share = share
        got: list[dict] = []

        async def main():
            with trio.move_on_after(1.0):
                await sampler.run(got.append)

        trio.run(main)
        return len(got), sampler.stretched_s

    stretched, stretched_s = passes(0.25)
    steady, steady_s = passes(1.0)
    assert 3 <= stretched <= 7, stretched          # ~1 s / 0.2 s
    assert stretched_s is not None and 0.15 <= stretched_s <= 0.5
    assert steady >= 2 * stretched and steady_s is None
