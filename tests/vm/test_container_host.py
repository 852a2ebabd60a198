"""Container guests set up from the host: their network configured by the
launcher over rtnetlink (no `ip` in the guest), no agent process inside, and
their telemetry read by the host's container sampler. Real containers on a real
bridge; each test asserts nothing is left."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio

from megafleet.collect.containers import ContainerSampler
from megafleet.collect.sources import vm_container_source
from megafleet.imagegen.contract import GuestConfig, NicConfig
from megafleet.vm.engine import Engine
from megafleet.vm.spec import GuestSpec, NicSpec

from .vmhelpers import assert_nothing_left, live_pids

pytestmark = pytest.mark.root

BRIDGE = "mfvhbr0"
TICK = 1 / os.sysconf("SC_CLK_TCK")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _links(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(prefix))


@pytest.fixture
def lan(root_only):
    """A bridge with three veth pairs, as the network layer hands them over:
    host end on the bridge, far end waiting on the host."""
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", "10.251.0.1/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    pairs = []
    for i in range(3):
        host, peer = f"mfvhh{i}", f"mfvhp{i}"
        _ip("link", "add", host, "mtu", "1400", "type", "veth", "peer", "name", peer, "mtu", "1400")
        _ip("link", "set", host, "master", BRIDGE, "up")
        pairs.append((host, peer))
    yield pairs
    for host, _ in pairs:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_network_configured_from_the_host(tiny, lan):
    specs = []
    for i, (host, peer) in enumerate(lan):
        mac = f"52:54:00:0f:0d:0{i + 1}"
        specs.append(GuestSpec(
            name=f"mfvh{i + 1}", image="tiny", driver="container",
            nics=[NicSpec(mac=mac, kind="veth", ifname=host, peer=peer)],
            config=GuestConfig(name=f"mfvh{i + 1}",
                               # The third guest, IPv4 only: no IPv6 address at all.
                               nics=(NicConfig(mac, (f"10.251.0.{i + 2}/24",) + ((f"fd00:251::{i + 2}/64",)
                                                                                 if i < 2 else ()), 1400),),
                               gateway="10.251.0.1", routes=(("10.99.0.0/16", "10.251.0.1"),),
                               forward=(i == 2))))
    engine = Engine(timeout_s=120)
    try:
        report = trio.run(lambda: engine.apply(specs))
        assert len(report.ready) == 3, [(r.name, r.reason) for r in report.failed]
        views = {v.name: v for v in engine.list("mfvh*")}
        pid = views["mfvh1"].pid

        def inside(target_pid: int, *argv: str) -> str:
            return subprocess.run(["nsenter", "-t", str(target_pid), "-n", *argv],
                                  capture_output=True, text=True, check=True).stdout

        addrs = inside(pid, "ip", "-o", "addr", "show", "dev", "eth0")
        assert "10.251.0.2/24" in addrs and "fd00:251::2/64" in addrs
        assert "tentative" not in addrs        # no DAD: the address is usable at once
        link = inside(pid, "ip", "-o", "link", "show", "eth0")
        assert "52:54:00:0f:0d:01" in link and "mtu 1400" in link and "state UP" in link
        assert "state UNKNOWN" in inside(pid, "ip", "-o", "link", "show", "lo")   # lo up
        routes = inside(pid, "ip", "route")
        assert "default via 10.251.0.1 dev eth0" in routes
        assert "10.99.0.0/16 via 10.251.0.1 dev eth0" in routes
        assert "fe80::" in addrs               # a guest with IPv6 keeps its link-local address
        v4_only = inside(views["mfvh3"].pid, "ip", "-o", "addr", "show", "dev", "eth0")
        assert "10.251.0.4/24" in v4_only and "inet6" not in v4_only, v4_only
        assert "mtu 1400" in inside(views["mfvh3"].pid, "ip", "-o", "link", "show", "eth0")
        assert inside(views["mfvh3"].pid, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
        assert inside(pid, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"
        # Guests reach each other and the bridge, over IPv4 and IPv6.
        for target in ("10.251.0.3", "10.251.0.4", "10.251.0.1", "fd00:251::3"):
            ping = subprocess.run(["nsenter", "-t", str(pid), "-n", "ping", "-c", "1", "-W", "5", target],
                                  capture_output=True, text=True)
            assert ping.returncode == 0, (target, ping.stdout + ping.stderr)

        # Nothing but the init and its idle `sleep` runs in a guest: no agent, no ip.
        for v in views.values():
            tree = _children(v.pid)
            assert [_comm(c) for c in tree] == ["sleep"], [_comm(c) for c in tree]
        console = (Path(engine.state.list("mfvh1")[0].handle["gdir"]) / "console.log").read_text()
        assert "MEGAFLEET-READY name=mfvh1" in console and "mode=container" in console

        # Their telemetry, read by the host: the agent's record with the guest's view.
        sampler = ContainerSampler("mfvhost", vm_container_source(engine, "mfvh*"), interval=1.0)
        docs = {d["meta"]["guest"]: d for d in sampler.sample(int(time.time() * 1000))}
        assert sorted(docs) == ["mfvh1", "mfvh2", "mfvh3"]
        doc = docs["mfvh1"]
        assert doc["meta"]["kind"] == "agent" and doc["source"] == "host" and doc["seq"] == 0
        assert doc["ifaces"]["eth0"]["tx_packets"] >= 4 and doc["ifaces"]["eth0"]["rx_packets"] >= 4
        assert "lo" in doc["ifaces"]
        assert "10.251.0.2/24" in doc["addresses"]["eth0"] and "fd00:251::2/64" in doc["addresses"]["eth0"]
        assert doc["addresses"]["lo"].startswith("127.0.0.1/8")
        assert 0 <= doc["up_s"] < 120 and doc["mem_total_kb"] > 0 and doc["rss_kb"] > 0
        # The next pass of a 5 s guest comes 5 s later, not at every sampler tick.
        assert sampler.sample(int(time.time() * 1000) + 1000) == []
        later = sampler.sample(int(time.time() * 1000) + 5000)
        assert {d["seq"] for d in later} == {1}

        pids = [v.pid for v in views.values()]
        assert len(trio.run(lambda: engine.teardown("mfvh*"))) == 3
        assert live_pids(pids) == []
        assert_nothing_left("mfvh")
        # The guests' ends went with their namespaces, and with them the pairs.
        deadline = time.monotonic() + 30
        while _links("mfvhh") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _links("mfvhh") == [] and _links("mfvhp") == []
    finally:
        trio.run(lambda: engine.teardown("mfvh*"))


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a container: its init (with reaped children) and the live
    processes under it."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
        stack += _children(p)
    return total * TICK


def test_idle_container_costs_what_one_without_agent_costs(tiny, root_only):
    """Default settings (agent every 5 s, read by the host) against the same image
    with the agent disabled, over the same 20 s: the default's CPU, counting the
    host's sampling passes, stays within 1.5x of the reference."""
    n = 10
    default = [GuestSpec(name=f"mfvid{i}", image="tiny", driver="container") for i in range(n)]
    quiet = [GuestSpec(name=f"mfviq{i}", image="tiny", driver="container",
                       config=GuestConfig(name=f"mfviq{i}", agent_interval=0)) for i in range(n)]
    engine = Engine(timeout_s=120)
    try:
        report = trio.run(lambda: engine.apply(default + quiet))
        assert len(report.ready) == 2 * n, [(r.name, r.reason) for r in report.failed]
        time.sleep(2)  # past the boot
        pids = {v.name: v.pid for v in engine.list("mfvi*")}
        sampler = ContainerSampler("mfvhost", vm_container_source(engine, "mfvid*"), interval=5.0)
        sampled = []
        sampler_cpu = [0.0]
        stop = threading.Event()

        def sample_loop() -> None:      # the host's share of the default's cost
            while not stop.is_set():
                t = time.thread_time()
                sampled.extend(sampler.sample(int(time.time() * 1000)))
                sampler_cpu[0] += time.thread_time() - t
                stop.wait(5.0)

        before = {name: _tree_cpu_s(pid) for name, pid in pids.items()}
        thread = threading.Thread(target=sample_loop)
        thread.start()
        time.sleep(20)
        stop.set()
        thread.join()
        used = {name: _tree_cpu_s(pid) - before[name] for name, pid in pids.items()}
        default_s = sum(v for k, v in used.items() if k.startswith("mfvid")) + sampler_cpu[0]
        quiet_s = sum(v for k, v in used.items() if k.startswith("mfviq"))
        # Both are read in clock ticks: n ticks is the finest difference visible.
        floor = n * TICK
        assert default_s <= 1.5 * max(quiet_s, floor), (default_s, quiet_s, sampler_cpu[0])
        # ... and the default guests did report, every 5 s.
        assert len(sampled) >= 4 * n and {d["meta"]["guest"] for d in sampled} == {s.name for s in default}
        assert len(trio.run(lambda: engine.teardown("mfvi*"))) == 2 * n
        assert live_pids(list(pids.values())) == []
        assert_nothing_left("mfvi")
    finally:
        trio.run(lambda: engine.teardown("mfvi*"))


def test_a_host_end_left_by_a_previous_incarnation_is_replaced(tiny, root_only):
    """A killed container's veth pair goes with its network namespace, which
    the kernel deletes later, from a work queue: a restart right after finds
    the host end's name still taken. The launcher deletes that stale end and
    creates the pair again (was: EEXIST, the guest failed)."""
    bridge, host = "mfvhbr1", "mfvhs0"
    _ip("link", "add", bridge, "type", "bridge")
    # What the previous incarnation left: a veth under the host end's name,
    # its peer (standing in for the dying namespace's end) beside it.
    _ip("link", "add", host, "type", "veth", "peer", "name", "mfvhs0old")
    engine = Engine(timeout_s=60)
    spec = GuestSpec(name="mfvhs", image="tiny", driver="container",
                     nics=[NicSpec(mac="52:54:00:77:00:01", kind="veth", ifname=host, bridge=bridge)],
                     config=GuestConfig(name="mfvhs", nics=(NicConfig(mac="52:54:00:77:00:01",
                                                                       addresses=("10.251.7.2/24",)),)))
    try:
        report = trio.run(lambda: engine.apply([spec]))
        assert [r.name for r in report.ready] == ["mfvhs"], [(r.name, r.reason) for r in report.failed]
        assert not Path("/sys/class/net/mfvhs0old").exists()
        assert os.path.basename(os.readlink(f"/sys/class/net/{host}/master")) == bridge
    finally:
        trio.run(lambda: engine.teardown("mfvhs"))
        subprocess.run(["ip", "link", "del", "mfvhs0old"], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    assert_nothing_left("mfvhs")


def test_pairs_made_on_a_bridge_have_host_ends_without_ipv6(tiny, root_only):
    """The launcher makes each pair from the host's namespace: host end up on
    the bridge with IPv6 off (no ff00::/8 route per port in the host's table,
    no link-local address), far end born in the container. The bridge still
    forwards IPv6 between the guests."""
    bridge = "mfvhbr2"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("link", "set", bridge, "up")
    engine = Engine(timeout_s=60)
    specs = []
    for i in range(2):
        mac = f"52:54:00:77:01:0{i + 1}"
        specs.append(GuestSpec(name=f"mfvhb{i + 1}", image="tiny", driver="container",
                               nics=[NicSpec(mac=mac, kind="veth", ifname=f"mfvhb{i}", bridge=bridge)],
                               config=GuestConfig(name=f"mfvhb{i + 1}", nics=(NicConfig(
                                   mac, (f"10.251.8.{i + 2}/24", f"fd00:258::{i + 2}/64")),))))
    try:
        report = trio.run(lambda: engine.apply(specs))
        assert len(report.ready) == 2, [(r.name, r.reason) for r in report.failed]
        for i in range(2):
            host = f"mfvhb{i}"
            assert Path(f"/proc/sys/net/ipv6/conf/{host}/disable_ipv6").read_text().strip() == "1"
            assert os.path.basename(os.readlink(f"/sys/class/net/{host}/master")) == bridge
            link = subprocess.run(["ip", "-o", "link", "show", host], capture_output=True, text=True).stdout
            assert "state UP" in link, link
            v6 = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", host],
                                capture_output=True, text=True).stdout
            assert v6 == "", v6
            local = subprocess.run(["ip", "-6", "route", "show", "table", "local", "dev", host],
                                   capture_output=True, text=True).stdout
            assert "ff00::/8" not in local, local
        pid = {v.name: v.pid for v in engine.list("mfvhb*")}["mfvhb1"]
        for target in ("10.251.8.3", "fd00:258::3"):
            ping = subprocess.run(["nsenter", "-t", str(pid), "-n", "ping", "-c", "1", "-W", "5", target],
                                  capture_output=True, text=True)
            assert ping.returncode == 0, (target, ping.stdout + ping.stderr)
    finally:
        trio.run(lambda: engine.teardown("mfvhb*"))
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    assert_nothing_left("mfvhb")
