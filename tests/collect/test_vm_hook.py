"""The collector hooked to the real vm engine: one real QEMU guest (TCG) booted by
`vm.api.apply`, its boot event from the engine's state, its state, CPU time
and RSS from the engine's state and /proc, its agent lines from the qemu
driver's agent.log; then torn down, with nothing left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from megafleet.collect import docs as D
from megafleet.collect import queries as Q
from megafleet.collect.collector import Collector
from megafleet.collect.stores import SqliteStore

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.root]


@pytest.fixture
def tiny_image(root_only):
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    vm = pytest.importorskip("megafleet.vm.spec")
    from megafleet.imagegen import store as images

    image = images.build(REPO / "examples/images/tiny.toml")
    return vm, image


def test_collector_follows_a_real_guest(tiny_image, tmp_path):
    vm, image = tiny_image
    from megafleet.imagegen.contract import GuestConfig
    from megafleet.vm.engine import Engine

    from megafleet.collect.sources import vm_agent_logs, vm_guest_source

    store = SqliteStore(tmp_path / "telemetry.sqlite")
    engine = Engine(timeout_s=120)
    specs = [vm.GuestSpec(name="mfc-vm1", image="tiny", driver="qemu", mem_mb=128,
                          config=GuestConfig(name="mfc-vm1", agent_interval=1))]
    collector = Collector("mfc-host", store, spool_dir=tmp_path / "spool",
                          guest_source=vm_guest_source(engine, "mfc-*"),
                          agent_logs=vm_agent_logs(engine, "mfc-*"),
                          guest_interval=1, agent_interval=1, host_interval=5,
                          iface_select=lambda name, kind: False, flush_interval=0.2)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            try:
                # No progress hook: the boot event comes from the engine's state, as
                # for a collector running in its own process.
                report = await engine.apply(specs)
                assert [r.outcome for r in report.results] == ["ready"], report.to_dict()
                # Until the guest was sampled running, its agent spoke and its
                # boot event is stored (a condition, not a fixed time: TCG on a
                # loaded machine is slow). A sample can say running before the
                # engine's record does (the ready line is on the console), and
                # the boot event comes from the record, on a later pass: torn
                # down before that pass, the guest would have none.
                with trio.fail_after(180):
                    while not (store.count(D.SAMPLES, {"meta.kind": "agent"})
                               and store.count(D.SAMPLES, {"state": "running",
                                                           "rss_kb": {"$gt": 10_000}})
                               and store.count(D.EVENTS, {"event": "boot"})):
                        await trio.sleep(0.5)
            finally:
                await engine.teardown("mfc-*")
                with trio.fail_after(60):  # the sampler notices the guest is gone
                    while not store.count(D.EVENTS, {"event": "teardown"}):
                        await trio.sleep(0.3)
                collector.stop()

    trio.run(main)
    assert engine.list("mfc-*") == []  # the engine's record is empty: nothing left

    since = D.ms_to_datetime(0)
    boots = Q.boot_times(store, since)
    assert len(boots) == 1 and boots[0]["image"] == "tiny" and boots[0]["boots"] == 1
    assert boots[0]["p50_s"] > 0
    running = store.find(D.SAMPLES, {"meta.kind": "guest", "state": "running"})
    assert running, "no sample of the running guest"
    assert max(d.get("cpu_s", 0) for d in running) > 0.5  # TCG burns CPU while booting
    assert max(d.get("rss_kb", 0) for d in running) > 10_000
    agent = store.find(D.SAMPLES, {"meta.kind": "agent", "meta.guest": "mfc-vm1"})
    assert agent and agent[-1]["mem_total_kb"] > 0
    assert [e["event"] for e in Q.events(store, since, kind="teardown")] == ["teardown"]
    store.close()
