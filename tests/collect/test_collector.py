"""The collector on a real host: a real bridge with two network namespaces pinging
each other across it (sniff and interface samplers), a real process as a guest
(guest sampler reading /proc), agent lines, events; into the SQLite store.
Everything created is recorded first and removed; the test checks nothing is
left behind."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest
import trio

from megafleet.collect import docs as D
from megafleet.collect import queries as Q
from megafleet.collect.collector import Collector
from megafleet.collect.samplers import GuestInfo
from megafleet.collect.stores import SqliteStore
from megafleet.ledger import Ledger
from megafleet.proc import RecordedProcess, run

pytestmark = pytest.mark.root


class SwitchWithTwoNamespaces:
    """bridge mfcbrXXXX; namespaces mfc-aXXXX / mfc-bXXXX, each with one veth on it."""

    def __init__(self, ledger: Ledger):
        self.tag = secrets.token_hex(2)
        self.ledger = ledger
        self.bridge = f"mfcbr{self.tag}"
        self.ns = {side: f"mfc-{side}{self.tag}" for side in "ab"}
        self.host_end = {side: f"mfcv{side}{self.tag}" for side in "ab"}
        self.addr = {"a": "10.250.77.1", "b": "10.250.77.2"}

    def up(self) -> None:
        self.ledger.record("collect-test", "bridge", self.bridge)
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "link", "set", self.bridge, "up"])
        for side in "ab":
            ns, host_end, peer = self.ns[side], self.host_end[side], f"mfcp{side}{self.tag}"
            self.ledger.record("collect-test", "netns", ns)
            run(["ip", "netns", "add", ns])
            self.ledger.record("collect-test", "veth", host_end)
            run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", peer])
            run(["ip", "link", "set", peer, "netns", ns])
            run(["ip", "link", "set", host_end, "master", self.bridge, "up"])
            run(["ip", "-n", ns, "addr", "add", f"{self.addr[side]}/24", "dev", peer])
            run(["ip", "-n", ns, "link", "set", peer, "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def down(self) -> None:
        for r in self.ledger.list("collect-test"):
            if r.key.endswith(self.tag) and r.kind in ("veth", "bridge"):
                run(["ip", "link", "del", r.key], check=False)
                self.ledger.forget("collect-test", r.kind, r.key)
            elif r.key.endswith(self.tag) and r.kind == "netns":
                run(["ip", "netns", "del", r.key], check=False)
                self.ledger.forget("collect-test", r.kind, r.key)

    def leftovers(self) -> list[str]:
        links = run(["ip", "-o", "link", "show"]).stdout
        spaces = run(["ip", "netns", "list"]).stdout
        return [line for line in (links + spaces).splitlines() if self.tag in line and "mfc" in line]


@pytest.fixture
def testnet(root_only):
    net = SwitchWithTwoNamespaces(Ledger())
    try:
        net.up()
        yield net
    finally:
        net.down()
        assert net.leftovers() == []
        assert not [r for r in net.ledger.list("collect-test") if r.key.endswith(net.tag)]


AGENT_LINE = ("\r[  9.1] MEGAFLEET-AGENT v=1 name=mfc-g1 seq=3 up=12.50 load=0.10,0.05,0.00 "
              "mem=60212,48712,51200 if=eth0:1280:12:980:9,lo:0:0:0:0 addr=eth0:10.0.0.5/24")


def test_collector_samples_a_real_host(testnet, tmp_path):
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    proc = RecordedProcess.of(busy.pid)
    tag = testnet.tag
    collector = Collector(
        "mfc-host", store, spool_dir=tmp_path / "spool",
        guest_source=lambda: [GuestInfo("mfc-g1", "running", busy.pid, "tiny"),
                              GuestInfo("mfc-g2", "failed", None, "tiny")],
        guest_interval=0.5, iface_interval=0.5, host_interval=0.5, sniff_interval=0.5,
        switches=[testnet.bridge], iface_select=lambda name, kind: name.endswith(tag),
        flush_interval=0.2)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            collector.boot("mfc-g1", ok=True, duration_s=4.2, image="tiny")
            collector.boot("mfc-g2", ok=False, duration_s=60.0, image="tiny",
                           reason="no readiness line in 60 s")
            collector.agent_line("mfc-g1", "MEGAFLEET-READY name=mfc-g1 uptime=3.42")
            collector.agent_line("mfc-g1", AGENT_LINE)
            collector.agent_line("mfc-g1", "MEGAFLEET-AGENT v=1 name=mfc-g1 seq=x up=oops")
            collector.agent_line("mfc-g1", "[    0.5] an ordinary kernel line")
            await trio.run_process(["ip", "netns", "exec", testnet.ns["a"], "ping", "-c", "20",
                                    "-i", "0.05", "-q", testnet.addr["b"]],
                                   capture_stdout=True)
            # Wait until the samplers have seen the traffic (a condition, not a
            # fixed time: the machine may be loaded).
            with trio.fail_after(120):
                while not seen_traffic():
                    await trio.sleep(0.3)
            collector.stop()

    def seen_traffic() -> bool:
        since = D.ms_to_datetime(0)
        icmp = sum(r["packets"] for r in Q.sniff(store, since) if r["protocol"] == "ipv4_icmp")
        veth = [r for r in Q.net(store, since, limit=0) if r["iface"] == testnet.host_end["a"]]
        cpu = store.count(D.SAMPLES, {"meta.guest": "mfc-g1", "cpu_pct": {"$gt": 0}})
        return icmp >= 40 and bool(veth) and veth[0]["bytes"] >= 20 * 98 * 2 and cpu > 0

    try:
        trio.run(main)
    finally:
        proc.stop()
        busy.wait()

    since = D.ms_to_datetime(0)
    # Sniff: ICMP across the bridge, counted by protocol (requests and replies).
    traffic = {r["protocol"]: r for r in Q.sniff(store, since) if r["switch"] == testnet.bridge}
    assert traffic["ipv4_icmp"]["packets"] >= 40, traffic
    assert traffic["ipv4_icmp"]["bytes"] >= 40 * 98
    # Interfaces: the bridge and both veths, with their types and counters.
    links = {r["iface"]: r for r in Q.net(store, since, limit=0)}
    assert set(links) == {testnet.bridge, *testnet.host_end.values()}
    assert links[testnet.host_end["a"]]["type"] == "veth"
    assert links[testnet.bridge]["type"] == "bridge"
    assert links[testnet.host_end["a"]]["bytes"] >= 20 * 98 * 2
    # Guests: state from the source, CPU and RSS from /proc of the real process.
    assert Q.status(store, since) == [
        {"host": "mfc-host", "state": "failed", "guests": 1},
        {"host": "mfc-host", "state": "running", "guests": 1}]
    busy_row = Q.top(store, "cpu", since, limit=1)[0]
    # > 0, not more: on a loaded shared machine the busy loop may get little CPU.
    assert busy_row["guest"] == "mfc-g1" and busy_row["cpu_pct"] > 0 and busy_row["rss_kb"] > 1000
    # Host and KSM (when the kernel has it).
    host_docs = store.find(D.SAMPLES, {"meta.kind": "host"})
    assert host_docs and host_docs[0]["mem_total_kb"] > 0
    if os.path.exists("/sys/kernel/mm/ksm/run"):
        assert Q.ksm(store, since) and "pages_sharing" in host_docs[0]["ksm"]
    # Agent lines parsed with the guest contract; a malformed one is a warning.
    agent = store.find(D.SAMPLES, {"meta.kind": "agent"})
    assert len(agent) == 1 and agent[0]["seq"] == 3 and agent[0]["ifaces"]["eth0"]["rx_bytes"] == 1280
    names = [e["event"] for e in Q.events(store, since)]
    assert {"boot", "ready", "agent-error"} <= set(names)
    failures = Q.events(store, since, kind="error")
    assert [(e["event"], e["reason"]) for e in failures] == [("boot", "no readiness line in 60 s")]
    assert Q.boot_times(store, since)[0]["p50_s"] == 4.2
    # The pipeline's own counters went in too; nothing was dropped or left spooled.
    counters = store.find(D.SAMPLES, {"meta.kind": "pipeline"})[-1]
    assert counters["dropped"] == 0 and counters["spooled"] == 0
    assert collector.spool.segments() == []
    store.close()


def test_sniff_on_missing_switch_is_an_error_event(tmp_path, root_only):
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    collector = Collector("mfc-host", store, spool_dir=tmp_path / "spool",
                          switches=["mfcnosuch0"], iface_select=lambda n, k: False,
                          host_interval=5, flush_interval=0.1)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            await trio.sleep(0.3)
            collector.stop()

    trio.run(main)
    errors = Q.events(store, None, kind="error")
    assert errors and errors[0]["event"] == "sniff-error" and "mfcnosuch0" in errors[0]["message"]
    store.close()


def test_ksm_package_samples_are_collected(tmp_path):
    """The ksm package's read-only sample stream (real sysfs) into the collector."""
    ksm_daemon = pytest.importorskip("megafleet.ksm.daemon")
    if not os.path.exists("/sys/kernel/mm/ksm/run"):
        pytest.skip("no KSM in this kernel")
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    collector = Collector("mfc-host", store, spool_dir=tmp_path / "spool", host_interval=60,
                          iface_select=lambda n, k: False, flush_interval=0.1)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            count = 0
            async for sample in ksm_daemon.samples(interval=0.3):
                collector.ksm_sample(sample)
                count += 1
                if count == 3:
                    break
            collector.stop()

    trio.run(main)
    docs = store.find(D.SAMPLES, {"meta.kind": "ksm"})
    assert len(docs) == 3
    assert all(isinstance(d["saved_bytes"], int) and "pages_sharing" in d["counters"] for d in docs)
    assert "ksmd_cpu_pct" in docs[-1] or docs[-1].get("ksmd_cpu_s") is None
    store.close()
