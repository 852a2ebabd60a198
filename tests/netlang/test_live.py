"""Live networks on this host (root): namespaces, bridges, veths, netem, VLANs,
VDE, static and OSPF routing, idempotent up, teardown after a crash. Every test
asserts that nothing with its testbed prefix is left: no namespace, no link, no
process, no ledger record. Only addresses inside our own namespaces are pinged."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megafleet import proc
from megafleet.ledger import Ledger
from megafleet.netlang import live
from megafleet.netlang.compiler import compile_file, compile_text

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _root(root_only):
    pass


def leftovers(testbed: str) -> dict:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    links = [m for m in re.findall(r"^\d+: ([^:@]+)", out, re.M) if m.startswith(testbed)]
    return {
        "netns": sorted(n for n in live.existing_netns() if n.startswith(testbed + "-")),
        "links": links,
        "ledger": [(r.kind, r.key) for r in Ledger().list(live.OWNER)
                   if r.key == testbed or r.key.startswith(testbed + "/")],
    }


def clean(testbed: str) -> dict:
    """What leftovers(testbed) must be after teardown."""
    return {"netns": [], "links": [], "ledger": []}


def ping(ns: str, addr: str, count: int = 1, timeout: int = 2) -> subprocess.CompletedProcess:
    return proc.run(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
                     "-W", str(timeout), addr], check=False)


def ping_within(ns: str, addr: str, seconds: float) -> bool:
    """Whether addr answers a ping from ns within `seconds` (a guest booting,
    routers converging)."""
    deadline = time.monotonic() + seconds
    while ping(ns, addr, timeout=1).returncode != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def addr_of(net, node: str, iface: int = 0) -> str:
    return net.node(node).ifaces[iface][2][4].split("/")[0]


@pytest.fixture
def testbed(request):
    names = []

    def use(name: str) -> str:
        names.append(name)
        return name

    yield use
    for name in names:
        live.down(name)
        assert leftovers(name) == clean(name)


def test_two_subnets_joined_by_a_router(testbed):
    name = testbed("mfnr")
    net = compile_text("pool p 10.71.0.0/16\npool p6 fd71::/48\nswitch lan[1..2]\nrouter gw on lan1 on lan2\n"
                       "host a[1..3] on lan1\nhost b[1..3] on lan2\nreachable a* b*\n")
    result = live.up(net, name)
    assert result["namespaces"] == 7 and result["changed"]
    for a in ("a1", "a2", "a3"):
        for b in ("b1", "b2", "b3"):
            r = ping(f"{name}-{a}", addr_of(net, b))
            assert r.returncode == 0, r.stdout + r.stderr
    # IPv6 too: no duplicate address detection (so link-local addresses work at
    # once), default route via the router, forwarding on in the router.
    for ns, key in ((f"{name}-a1", "net.ipv6.conf.eth0.accept_dad"), (f"{name}-gw", "net.ipv6.conf.all.forwarding"),
                    (f"{name}-gw", "net.ipv4.ip_forward")):
        value = proc.run(["ip", "netns", "exec", ns, "sysctl", "-n", key]).stdout.strip()
        assert value == ("0" if "dad" in key else "1"), (ns, key, value)
    b3_v6 = net.node("b3").ifaces[0][2][6].split("/")[0]
    argv = ["ip", "netns", "exec", f"{name}-a1", "ping", "-6", "-n", "-c1", "-W1", b3_v6]
    deadline = time.monotonic() + 10
    while proc.run(argv, check=False).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    r = proc.run(argv, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # The router forwards, and the hosts' gateway is the router.
    routes = proc.run(["ip", "-n", f"{name}-a1", "route"]).stdout
    assert f"default via {addr_of(net, 'gw', 0)}" in routes
    # Up again: nothing changes.
    before = leftovers(name)
    again = live.up(net, name)
    assert again["changed"] is False and leftovers(name) == before
    # Another description under the same name is refused, nothing touched.
    other = compile_text("pool p 10.72.0.0/16\nswitch lan\nhost z on lan\n")
    with pytest.raises(live.LiveError, match="different description"):
        live.up(other, name)
    assert leftovers(name) == before
    down = live.down(name)
    assert down["namespaces"] == 7
    assert leftovers(name) == clean(name)
    live.down(name)     # twice is fine


def test_a_jumbo_switch_carries_full_size_frames(testbed):
    """A switch with its own MTU: the bridge, both veth ends and the hosts'
    interfaces get it, and a frame of exactly that size crosses unfragmented."""
    name = testbed("mfnj")
    net = compile_text("pool p 10.73.0.0/16\nswitch lan mtu 9000\nhost a on lan\nhost b on lan\n")
    live.up(net, name)
    for ns in (f"{name}-a", f"{name}-b"):
        out = proc.run(["ip", "-n", ns, "-o", "link", "show", "eth0"]).stdout
        assert " mtu 9000 " in out, out
    # 9000 - 20 (IPv4) - 8 (ICMP) bytes of payload, don't-fragment set.
    r = proc.run(["ip", "netns", "exec", f"{name}-a", "ping", "-n", "-q", "-c1", "-W2", "-M", "do",
                  "-s", "8972", addr_of(net, "b")], check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_names_of_others_are_never_taken(testbed):
    name = testbed("mfnk")
    from megafleet.names import ifname
    foreign = ifname(name, "b", "s")      # what our bridge would be called
    proc.run(["ip", "link", "add", foreign, "type", "bridge"])
    try:
        net = compile_text("pool p 10.80.0.0/16\nswitch s\nhost a on s\n")
        with pytest.raises(live.LiveError, match="not ours"):
            live.up(net, name)
        live.down(name)
        assert foreign in live.existing_links()      # still there: not ours to remove
    finally:
        proc.run(["ip", "link", "del", foreign])


def test_a_50ms_link_measured_by_ping(testbed):
    name = testbed("mfnd")
    net = compile_text("pool p 10.73.0.0/16\nhost a\nhost b\nlink a -- b delay 50ms\n"
                       "switch s\nhost c on s delay 50ms\nhost d on s\n")
    live.up(net, name)
    # 50 ms each way: a round trip of at least 100 ms (the first ping also waits
    # for ARP, so the minimum is the measure).
    for src, dst in (("a", "b"), ("d", "c")):
        r = ping(f"{name}-{src}", addr_of(net, dst), count=4, timeout=3)
        assert r.returncode == 0, r.stdout
        rtt_min = float(re.search(r"= ([\d.]+)/", r.stdout).group(1))
        assert 99 <= rtt_min < 250, r.stdout
    # Without a delay, the same bridge answers fast.
    r = ping(f"{name}-d", addr_of(net, "d"), count=1)
    assert r.returncode == 0


def test_vlans_separate_hosts_on_one_bridge(testbed):
    name = testbed("mfnv")
    net = compile_text("switch s\nhost a on s 10.74.0.1/24 vlan 10\nhost b on s 10.74.0.2/24 vlan 10\n"
                       "host c on s 10.74.1.3/24 vlan 20\nhost d on s 10.74.2.4/24\n")
    live.up(net, name)
    assert ping(f"{name}-a", "10.74.0.2").returncode == 0
    # Make the other subnets on-link everywhere: only the VLANs can keep them apart.
    for n in "acd":
        for sub in ("10.74.0.0/16",):
            proc.run(["ip", "-n", f"{name}-{n}", "route", "add", sub, "dev", "eth0"])
    assert ping(f"{name}-a", "10.74.1.3", timeout=1).returncode != 0
    assert ping(f"{name}-a", "10.74.2.4", timeout=1).returncode != 0
    # VLAN 10 is its own bridge holding a's and b's ports.
    from megafleet.names import ifname
    out = proc.run(["ip", "-o", "link", "show", "master", ifname(name, "b", "s", "10")]).stdout
    assert "mfnva-0" in out and "mfnvb-0" in out and "mfnvc-0" not in out


def test_vde_switch(testbed):
    name = testbed("mfne")
    net = compile_text("pool p 10.75.0.0/16\nswitch s vde\nhost a on s\nhost b on s\n"
                       "host c on s delay 30ms\n")
    live.up(net, name)
    recorded = [proc.RecordedProcess(r.data["pid"], r.data["start"])
                for r in Ledger().list(live.OWNER, "process") if r.key.startswith(name + "/")]
    # the switch, one plug per plain host, c's own vde_switch and its wirefilter
    assert len(recorded) == 5
    assert ping(f"{name}-a", addr_of(net, "b"), timeout=3).returncode == 0
    r = ping(f"{name}-a", addr_of(net, "c"), count=3, timeout=3)
    assert r.returncode == 0 and float(re.search(r"= ([\d.]+)/", r.stdout).group(1)) >= 59, r.stdout
    live.down(name)
    assert not any(rp.alive() for rp in recorded)


def test_three_frr_routers_converge_and_survive_a_cut(testbed):
    name = testbed("mfno")
    net = compile_file(str(REPO / "examples" / "triangle.fleet"))
    live.up(net, name)
    recorded = [(r.data["pid"], r.data["start"]) for r in Ledger().list(live.OWNER, "process")
                if r.key.startswith(name + "/frr/")]
    assert len(recorded) == 9       # zebra, ospfd and ospf6d on three routers
    b = addr_of(net, "b")
    b6 = net.node("b").ifaces[0][2][6].split("/")[0]

    def reaches(deadline_s: float, addr: str = b) -> bool:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if ping(f"{name}-a", addr, timeout=1).returncode == 0:
                return True
            time.sleep(0.5)
        return False

    assert reaches(60), "OSPF did not converge"
    assert reaches(60, b6), "OSPFv3 (IPv6) did not converge"
    routes = proc.run(["ip", "-n", f"{name}-r1", "route"]).stdout
    assert "proto ospf" in routes
    # Cut the direct link r1 -- r3 (r1's eth2): traffic must go round through r2.
    direct = next(eth for eth, i, _ in net.node("r1").ifaces if i.peer == "r3")
    proc.run(["ip", "-n", f"{name}-r1", "link", "del", direct])
    assert reaches(60), "no path after the cut"
    assert reaches(60, b6), "no IPv6 path after the cut"
    trace = proc.run(["ip", "-n", f"{name}-r1", "route", "get", b]).stdout
    r2_side = next(a[4].split("/")[0] for _, i, a in net.node("r2").ifaces if i.peer == "r1")
    assert f"via {r2_side}" in trace
    live.down(name)
    assert all(not proc.RecordedProcess(pid, start).alive() for pid, start in recorded)


def test_teardown_after_a_crash_during_up(testbed, tmp_path):
    name = testbed("mfnc")
    desc = tmp_path / "crash.fleet"
    desc.write_text("pool p 10.76.0.0/16\nswitch lan[1..4]\nrouter gw on lan*\n"
                    + "".join(f"host h{i}x[1..50] on lan{i}\n" for i in range(1, 5)))
    child = subprocess.Popen([sys.executable, "-m", "megafleet", "net", "up", str(desc), "-N", name],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it as soon as it has started creating things.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(n.startswith(name + "-") for n in live.existing_netns()):
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert leftovers(name)["ledger"], "the ledger must list what was being created"
    # A shell left running inside one of the namespaces is found and stopped too.
    some_ns = next((n for n in live.existing_netns() if n.startswith(name + "-")), None)
    sleeper = None
    if some_ns:
        sleeper = subprocess.Popen(["ip", "netns", "exec", some_ns, "sleep", "300"])
        time.sleep(0.2)
    result = subprocess.run([sys.executable, "-m", "megafleet", "net", "down", name],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert leftovers(name) == clean(name)
    if sleeper:
        assert sleeper.wait(timeout=5) is not None


def test_bgp_between_two_routers(testbed):
    name = testbed("mfng")
    net = compile_text("pool p 10.78.0.0/16\nswitch lanA\nswitch lanB\nrouter r1 on lanA bgp 65001\n"
                       "router r2 on lanB bgp as 65002\nlink r1 -- r2\nhost a on lanA\nhost b on lanB\n"
                       "reachable a b\n")
    live.up(net, name)
    b = addr_of(net, "b")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and ping(f"{name}-a", b, timeout=1).returncode != 0:
        time.sleep(0.5)
    assert ping(f"{name}-a", b).returncode == 0, "BGP did not exchange routes"
    assert "proto bgp" in proc.run(["ip", "-n", f"{name}-r1", "route"]).stdout


def test_a_lossy_link_drops_and_a_rate_is_shaped(testbed):
    name = testbed("mfnl")
    net = compile_text("pool p 10.79.0.0/16\nhost a\nhost b\nhost c\nlink a -- b loss 100%\n"
                       "link a -- c rate 10mbit\n")
    live.up(net, name)
    assert ping(f"{name}-a", addr_of(net, "b"), timeout=1).returncode != 0
    assert ping(f"{name}-a", addr_of(net, "c", 0)).returncode == 0
    eth = next(e for e, i, _ in net.node("a").ifaces if i.peer == "c")
    qdisc = proc.run(["tc", "-n", f"{name}-a", "qdisc", "show", "dev", eth]).stdout
    assert "tbf" in qdisc and "rate 10Mbit" in qdisc


@pytest.mark.qemu
@pytest.mark.slow
def test_a_vm_node_on_a_bridge_with_namespace_hosts(testbed, tmp_path):
    """A real QEMU guest (TCG) booted by the vm engine on its tap, reachable from
    a namespace host through the router; torn down with the rest."""
    import shutil
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    pytest.importorskip("megafleet.vm.spec")
    name = testbed("mfnq")
    desc = tmp_path / "vm.fleet"
    desc.write_text(f'image tiny from "{REPO}/examples/images/tiny.toml"\npool p 10.82.0.0/16\n'
                    "switch lan[1..2]\nrouter gw on lan*\nvm mfnqv1 image tiny mem 128M on lan1\n"
                    "host h on lan2\nreachable h mfnqv1\n")
    net = compile_file(str(desc))
    live.up(net, name, vm_options={"timeout_s": 240})
    from megafleet.vm.engine import Engine
    assert [g.name for g in Engine().list("mfnqv1")] == ["mfnqv1"]
    vm_addr = addr_of(net, "mfnqv1")
    assert ping_within(f"{name}-h", vm_addr, 30)
    live.down(name)
    assert Engine().list("mfnqv1") == []


def test_netlink_configures_a_namespace_and_names_what_the_kernel_refused():
    from megafleet.netlang import netlink

    ns = "mfnn-x"
    home = os.stat("/proc/thread-self/ns/net").st_ino
    proc.run(["ip", "netns", "add", ns])
    try:
        proc.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
        netlink.apply(f"/run/netns/{ns}", sysctls={"ipv4/ip_forward": "1"}, ops=[
            netlink.LinkUp("lo"), netlink.LinkUp("eth0", mtu=1400), netlink.LinkUp("eth1"),
            netlink.AddrAdd("eth0", 4, 0x0A530001, 24), netlink.AddrAdd("eth0", 6, 0xFD83 << 112 | 1, 64),
            netlink.RouteAdd(4, 0x0A540000, 16, 0x0A530002)])
        out = proc.run(["ip", "-n", ns, "addr", "show", "eth0"]).stdout
        assert "mtu 1400" in out and "10.83.0.1/24" in out and "fd83::1/64" in out and "UP" in out
        assert "10.84.0.0/16 via 10.83.0.2 dev eth0" in proc.run(["ip", "-n", ns, "route"]).stdout
        # The sysctl landed in the namespace, not on the host.
        assert proc.run(["ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        with pytest.raises(netlink.NetlinkError, match=r"mfnn-x: route add default via 10.99.0.1: "
                                                       r"Network is unreachable"):
            netlink.apply(f"/run/netns/{ns}", [netlink.RouteAdd(4, 0, 0, 0x0A630001)])
        with pytest.raises(netlink.NetlinkError, match="no interface eth7 in mfnn-x"):
            netlink.apply(f"/run/netns/{ns}", [netlink.LinkUp("eth7")])
        # This thread is back in the host's namespace.
        assert os.stat("/proc/thread-self/ns/net").st_ino == home
    finally:
        proc.run(["ip", "netns", "del", ns])
    assert ns not in live.existing_netns()


def test_a_vm_node_on_a_vde_switch(testbed, tmp_path):
    """A real QEMU guest whose NIC is a port of a VDE switch (QEMU's vde
    netdev), reached from a namespace host plugged into the same switch."""
    import shutil
    if not shutil.which("qemu-system-x86_64") or not shutil.which("vde_switch"):
        pytest.skip("qemu-system-x86_64 or vde_switch is not installed")
    name = testbed("mfnw")
    desc = tmp_path / "vde.fleet"
    desc.write_text(f'image tiny from "{REPO}/examples/images/tiny.toml"\npool p 10.83.0.0/16\n'
                    "switch s vde\nvm mfnwv1 image tiny mem 128M on s\nhost h on s\n")
    net = compile_file(str(desc))
    live.up(net, name, vm_options={"timeout_s": 240})
    from megafleet.vm.engine import Engine
    from megafleet.vm.state import VmState
    (guest,) = Engine().list("mfnwv1")
    cmdline = open(f"/proc/{guest.pid}/cmdline").read().split("\0")
    assert any(arg.startswith("vde,") for arg in cmdline), cmdline
    assert VmState().get("mfnwv1").spec["nics"][0]["kind"] == "vde"
    vm_addr = addr_of(net, "mfnwv1")
    assert ping_within(f"{name}-h", vm_addr, 30)
    live.down(name)
    assert Engine().list("mfnwv1") == []


def test_a_vm_router_runs_ospf_with_a_namespace_router(testbed, tmp_path):
    """A router that is a QEMU guest of the router image forwards and runs
    OSPF (configuration written into it through its exec channel) with a
    namespace router: hosts behind each reach each other only through both."""
    import shutil
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    name = testbed("mfno")
    desc = tmp_path / "vmrouter.fleet"
    desc.write_text(f'image router from "{REPO}/examples/images/router.toml"\npool p 10.84.0.0/16\n'
                    "switch lan[1..3]\n"
                    "router rv image router mem 256M ospf {\n  iface lan1 auto\n  iface lan2 auto\n}\n"
                    "router rn ospf {\n  iface lan2 auto\n  iface lan3 auto\n}\n"
                    "host h1 on lan1\nhost h3 on lan3\nreachable h1 h3\n")
    net = compile_file(str(desc))
    live.up(net, name, vm_options={"timeout_s": 240})
    try:
        import trio

        from megafleet.vm.engine import guests_dir
        from megafleet.vm.guestexec import exec_in_guest

        # h1 reaches h3 only if rv forwards and has learnt lan3 from rn over OSPF
        # (rv has no static route to it: it runs OSPF instead).
        target = addr_of(net, "h3")
        reached = ping_within(f"{name}-h1", target, 90)
        routes = trio.run(exec_in_guest, guests_dir() / "rv" / "exec.sock", ["ip", "route"])
        assert reached, routes.stdout.decode()
        # The route to lan3 is in rv's table though rv was given no static route.
        from megafleet.vm.state import VmState
        assert VmState().get("rv").spec["config"]["routes"] == []
        lan3 = str(ipaddress.ip_interface(f"{target}/24").network)
        assert any(line.startswith(lan3 + " via ") for line in routes.stdout.decode().splitlines())
        assert trio.run(exec_in_guest, guests_dir() / "rv" / "exec.sock", ["pidof", "ospfd"]).rc == 0
    finally:
        live.down(name)
    assert leftovers(name) == clean(name)


def test_up_and_net_up_refuse_each_others_testbed_from_another_description(testbed):
    """One instantiation for `net up` and `up`'s hosts: a testbed name taken by
    another description is refused by both paths, and nothing of it is touched."""
    import trio

    from megafleet import host

    name = testbed("mfnd")
    a = compile_text("pool p 10.73.0.0/16\nswitch lan\nhost a on lan\n", name="a.fleet")
    b = compile_text("pool p 10.74.0.0/16\nswitch lan\nhost b on lan\n", name="b.fleet")
    live.up(a, name)
    before = leftovers(name)
    with pytest.raises(host.HostError, match=r"different description \(a\.fleet\)"):
        trio.run(host.apply_net, live.plan(b, name), Ledger(), lambda s: None, "b.fleet")
    with pytest.raises(live.LiveError, match=r"different description \(a\.fleet\)"):
        live.up(b, name)
    assert leftovers(name) == before and f"{name}-a" in before["netns"]


def test_a_switch_beyond_one_bridge_is_a_tree_of_bridges_that_forwards(testbed):
    """1,100 namespace hosts on one switch: more than a Linux bridge's 1,023
    ports, so the switch is a root bridge with leaves of about 256 ports; hosts
    on different leaves and on the same leaf reach each other, and down leaves
    nothing."""
    from megafleet.netlang import limits

    name = testbed("mfnt")
    net = compile_text("pool p 10.76.0.0/16 per /20\nswitch big\nhost h[1..1100] on big\n")
    p = live.plan(net, name)
    leaves = [b for b in p.bridges if b.root]
    assert len(leaves) == limits.leaf_count(1100, limits.BRIDGE_PORTS - 1) == 5
    share = limits.leaf_share(1100, len(leaves))
    live.up(net, name)
    for b in p.bridges:
        ports = proc.run(["ip", "-o", "link", "show", "master", b.ifname]).stdout.count("\n")
        assert ports <= limits.BRIDGE_PORTS
    assert ports == 1100 - (len(leaves) - 1) * share + 1     # the last leaf: its hosts and its uplink
    # A broadcast on a switch this size is ~1,100 copies at once: the receive
    # backlog is raised to fit while the testbed is up, and put back after.
    # So is the neighbour table (one for all namespaces), past 1,024 entries.
    backlog = live.SYSCTL / "net/core/netdev_max_backlog"
    gc3 = live.SYSCTL / "net/ipv4/neigh/default/gc_thresh3"
    assert int(backlog.read_text()) >= 2 * 1100 and int(gc3.read_text()) >= 4 * 1100
    # Across leaves, within the first leaf (the oldest ports, whose copies of a
    # broadcast come last), across the first leaves' boundary, within the last.
    for a, b in (("h1", "h1100"), ("h1100", "h1"), ("h1", "h2"), ("h10", "h11"),
                 (f"h{share}", f"h{share + 1}"), ("h1099", "h1100")):
        r = ping(f"{name}-{a}", addr_of(net, b), count=1, timeout=3)
        assert r.returncode == 0, (a, b, r.stdout + r.stderr)
    live.down(name)
    assert int(backlog.read_text()) < 2 * 1100 and int(gc3.read_text()) < 4 * 1100


def test_container_guests_through_net_up_get_veths(testbed, tmp_path):
    """`net up` of container guests: the plan gives them veth ports (not taps),
    each container's launcher makes its pair (far end born inside), and a
    namespace host reaches them. No bridge port has an IPv6 address."""
    pytest.importorskip("megafleet.vm.spec")
    from megafleet.vm.engine import Engine

    name = testbed("mfnc")
    desc = tmp_path / "c.fleet"
    desc.write_text(f'image tiny from "{REPO}/examples/images/tiny.toml"\npool p 10.78.0.0/16\nswitch lan\n'
                    "vm mfncg[1..3] image tiny driver container mem 64M on lan\nhost h on lan\n")
    net = compile_file(str(desc))
    assert {port.kind for port in live.plan(net, name).ports} == {"cveth", "veth"}
    live.up(net, name, vm_options={"timeout_s": 120})
    assert sorted(g.name for g in Engine().list("mfncg*")) == ["mfncg1", "mfncg2", "mfncg3"]
    for g in ("mfncg1", "mfncg2", "mfncg3"):
        assert ping_within(f"{name}-h", addr_of(net, g), 30), g
    ports = [port for port in live.plan(net, name).ports if port.kind in ("cveth", "veth")]
    for port in ports:
        shown = subprocess.run(["ip", "-o", "addr", "show", "dev", port.host_if], capture_output=True,
                               text=True, check=True).stdout
        assert "inet6" not in shown, shown
    live.down(name)
    assert Engine().list("mfncg*") == []
