"""The typed per-host network plan (netlang.hostplan), without root: every
statement builds exactly what it names, the plan serialises itself and two plans
diff item by item, big switches become trees of bridges, and what a host cannot
build is refused when compiling with its line."""

from __future__ import annotations

import hashlib
import json

import pytest

from megafleet import placement
from megafleet.netlang import frr, hostplan, limits, live
from megafleet.netlang.compiler import compile_text
from megafleet.netlang.errors import CompileError


def errors(text: str) -> list[str]:
    with pytest.raises(CompileError) as info:
        compile_text(text)
    return [f"{d.loc.line}: {d.message}" for d in info.value.diagnostics.items]


def configured_are_created(p: hostplan.Plan) -> None:
    missing = p.configured_ifaces() - p.created_ifaces()
    assert not missing, f"configured but never created: {sorted(missing)[:5]}"


# -- 2. every statement builds exactly what it names ---------------------------------

def test_parallel_links_are_each_built():
    net = compile_text("pool p 10.0.0.0/16\nrouter r1 ospf\nrouter r2 ospf\nlink r1 -- r2\n"
                       "link r1 -- r2 delay 5ms\n")
    p = live.plan(net, "tb")
    # Two networks, two interfaces on each router: one veth, one wire (the delay).
    assert [(x.eth_a, x.eth_b) for x in p.p2p] == [("eth0", "eth0")]
    (wire,) = p.wires
    assert {(e.where, e.ifname) for e in wire.ends} == {("tb-r1", "eth1"), ("tb-r2", "eth1")}
    assert wire.props.delay_us == 5000
    configured_are_created(p)
    # ospfd's interface stanzas name only interfaces the plan creates.
    for r in ("r1", "r2"):
        conf = frr.configs(net, r)["ospfd"]
        stanzas = {line.split()[1] for line in conf.splitlines() if line.startswith("interface ")}
        assert stanzas == {"eth0", "eth1"}
        assert stanzas <= {i for ns, i in p.created_ifaces() if ns == f"tb-{r}"}


def test_an_empty_vlan_on_a_trunk_plans_and_builds_its_bridges():
    net = compile_text("switch s1\nswitch s2\nhost a on s1 vlan 10\nhost b on s2 vlan 10\n"
                       "link s1 -- s2 vlan 10,20\n")
    p = live.plan(net, "tb")
    assert {(b.switch, b.vlan) for b in p.bridges} >= {("s1", 20), ("s2", 20)}
    assert sorted(t.vlan for t in p.trunks) == [10, 20]
    configured_are_created(p)


def test_container_guests_get_veths_from_the_plan_itself():
    from megafleet.vm.spec import validate_all

    net = compile_text('image tiny from "x.toml"\npool p 10.0.0.0/16\nswitch s\n'
                       "vm c[1..3] image tiny driver container on s\nvm q image tiny on s\n")
    p = live.plan(net, "tb")
    kinds = {port.node: port.kind for port in p.ports}
    assert kinds == {"c1": "cveth", "c2": "cveth", "c3": "cveth", "q": "tap"}
    validate_all(p.vms)              # the vm engine takes them as they are (no tap on a container)
    nics = {g.name: g.nics[0] for g in p.vms}
    assert nics["c1"].kind == "veth" and nics["q"].kind == "tap"
    # The launcher creates each pair on the port's bridge: the host's batch has
    # nothing to create for a container port, and the guest's NIC names the bridge.
    ports = [port for port in p.ports if isinstance(port, hostplan.ContainerPort)]
    assert all(port.ip_lines() == [] for port in ports)
    assert {(nics[port.node].ifname, nics[port.node].bridge) for port in ports} == {
        (port.host_if, port.bridge) for port in ports}
    assert all(port.bridge in {b.ifname for b in p.bridges} for port in ports)


def test_every_host_name_is_unique_and_short():
    net = compile_text("pool p 10.0.0.0/16 per /20\nswitch x-0\nswitch b\nhost b-x on b\nhost h[1..300] on x-0\n"
                       "link x-0 -- b\n")
    p = live.plan(net, "testbed1")
    names = p.host_names()
    assert len(names) == len(set(names)) and all(len(n) <= 15 for n in names)


# -- 6. the plan serialises itself, and two plans diff item by item -------------

PLAN_TEXT = """pool p 10.0.0.0/16
image tiny from "x.toml"
switch s1
switch s2 vde
switch s3
host a on s1 rate 10mbit
host d on s1 delay 2ms
host v on s2
vm c image tiny driver container on s1
vm q image tiny on s2
router r1 on s1 on s3 ospf
router r2 on s3 ospf
link r1 -- r2 loss 1%
link s1 -- s3 vlan 10
host t on s3 vlan 10
"""


def test_plan_json_round_trip_is_equal_and_the_same_digest():
    p = live.plan(compile_text(PLAN_TEXT), "tb")
    data = json.loads(json.dumps(p.to_json()))
    back = hostplan.Plan.from_json(data)
    assert back == p and back.compute_digest() == p.digest
    assert {type(x).__name__ for x in back.items()} >= {
        "Bridge", "VdeSwitch", "VethPort", "WiredPort", "VdePort", "ContainerPort", "GuestVdePort",
        "Trunk", "Wire"}
    with pytest.raises(hostplan.PlanError, match="unknown kind"):
        hostplan.item_from_json({"kind": "teleporter"})


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_plan_digest_is_the_sha256_of_its_sorted_json(monkeypatch, chunk):
    """The digest is defined on the plan's whole JSON; it is computed a chunk
    of items at a time, which must not change it."""
    monkeypatch.setattr(hostplan, "_DIGEST_CHUNK", chunk)
    p = live.plan(compile_text(PLAN_TEXT), "tb")
    body = {k: v for k, v in p.to_json().items() if k != "digest"}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    assert p.compute_digest() == expected and len(p.ports) > 2


def test_diff_names_the_items_that_changed():
    old = live.plan(compile_text(PLAN_TEXT), "tb")
    assert not hostplan.diff(old, old)
    new = live.plan(compile_text(PLAN_TEXT.replace("rate 10mbit", "rate 20mbit")
                                 .replace("host v on s2\n", "")
                                 + "host e on s1\n"), "tb")
    d = hostplan.diff(old, new)
    changed = {(o.kind, o.node) for o, n in d.changed if isinstance(o, hostplan.VethPort)}
    assert changed == {("veth", "a")}
    assert ("vde", "v") in {(x.kind, getattr(x, "node", None)) for x in d.removed}
    assert ("netns", "v") in {(x.kind, getattr(x, "name", None)) for x in d.removed}
    assert ("veth", "e") in {(x.kind, getattr(x, "node", None)) for x in d.added}


def _as_sets(d: hostplan.PlanDiff) -> tuple:
    return (sorted(map(repr, d.removed)), sorted(map(repr, d.added)), sorted(map(repr, d.changed)))


@pytest.mark.parametrize("edit", [
    lambda t: t,                                                            # nothing
    lambda t: t.replace("rate 10mbit", "rate 20mbit"),                      # a port's props
    lambda t: t.replace("host v on s2\n", "") + "host e on s1\n",           # a node gone, one new
    lambda t: t.replace("vm c image tiny", "vm c image tiny mem 64M"),       # a guest changed
    lambda t: t.replace("link r1 -- r2 loss 1%\n", "link r1 -- r2\n"),      # a wire becomes a veth
    lambda t: t.replace("router r2 on s3 ospf", "router r2 on s3 ospf\nhost x on s3 exec \"true\""),
    lambda t: t.replace("pool p 10.0.0.0/16", "pool p 10.9.0.0/16"),        # every address
])
def test_diff_json_is_diff_without_parsing_the_plans(edit):
    old = live.plan(compile_text(PLAN_TEXT), "tb")
    new = live.plan(compile_text(edit(PLAN_TEXT)), "tb")
    oj, nj = json.loads(json.dumps(old.to_json())), json.loads(json.dumps(new.to_json()))
    assert _as_sets(hostplan.diff_json(oj, nj)) == _as_sets(hostplan.diff(old, new))
    assert hostplan.counts_json(nj) == new.counts()


# -- Switches of any size: trees of bridges ------------------------------------------

def test_a_switch_beyond_one_bridge_is_a_tree_of_bridges():
    net = compile_text("switch big\nswitch other\nlink big -- other\nhost h[1..2500] on big\n")
    p = live.plan(net, "tb")
    roots = [b for b in p.bridges if b.switch == "big" and b.root is None]
    leaves = [b for b in p.bridges if b.root is not None]
    assert len(roots) == 1 and len(leaves) == limits.leaf_count(2500, limits.BRIDGE_PORTS - 2) == 10
    assert {sum(port.bridge == leaf.ifname for port in p.ports) for leaf in leaves} == {250}
    assert all(b.root == roots[0].ifname and b.uplink and b.downlink for b in leaves)
    # No bridge gets more ports than Linux allows.
    load: dict[str, int] = {}
    for port in p.ports:
        load[port.bridge] = load.get(port.bridge, 0) + 1
    for t in p.trunks:
        load[t.bridge_a] = load.get(t.bridge_a, 0) + 1
    for leaf in leaves:
        load[leaf.ifname] += 1               # its uplink
        load[leaf.root] = load.get(leaf.root, 0) + 1
    assert max(load.values()) <= limits.BRIDGE_PORTS
    assert load[roots[0].ifname] + 1 <= limits.BRIDGE_PORTS     # room for a VXLAN tunnel
    assert load[roots[0].ifname] == 10 + 1   # the leaves and the switch link: no host port
    names = p.host_names()
    assert len(names) == len(set(names))
    # A small switch stays one bridge.
    small = live.plan(compile_text("switch s\nhost h[1..1000] on s\n"), "tb")
    assert [b.root for b in small.bridges] == [None]


def test_leaves_are_small_while_the_root_has_room_and_full_beyond():
    assert limits.leaf_count(1100, 1021) == 5 and limits.leaf_share(1100, 5) == 220
    assert limits.leaf_count(5000, 1021) == 20 and limits.leaf_share(5000, 20) == 250
    # 1,000 leaves of 256 would not fit on the root: full leaves instead.
    n = limits.leaf_count(300_000, 1000)
    assert n == -(-300_000 // limits.LEAF_PORTS) and limits.leaf_share(300_000, n) <= limits.LEAF_PORTS
    assert limits.leaf_count(limits.LEAF_PORTS * 1000 + 1, 1000) is None


def test_a_tree_split_over_hosts_puts_each_leaf_with_its_ports_and_the_root_everywhere():
    from megafleet import manifest

    net = compile_text("switch big\nhost h[1..2100] on big\n")
    p = live.plan(net, "tb")
    placed = placement.place(manifest.demands(net, p),
                             [placement.HostOffer("h0", 1200, 100_000), placement.HostOffer("h1", 1200, 100_000)])
    ms = manifest.split(p, placed, addresses={"h0": "192.0.2.1", "h1": "192.0.2.2"})
    for host, m in ms.items():
        sub = manifest.plan_from_json(m.net)
        here = {b.ifname for b in sub.bridges}
        assert sum(b.root is None for b in sub.bridges) == 1
        assert {port.bridge for port in sub.ports} <= here
        assert all(b.root in here for b in sub.bridges if b.root)
        (x,) = sub.vxlan
        assert x.bridge == next(b.ifname for b in sub.bridges if b.root is None)


# -- What a host cannot build is refused when compiling ---------------------------

def test_unbuildable_statements_are_refused_with_their_lines():
    got = errors('image tiny from "x.toml"\nswitch s\nswitch v vde\n'
                 "vm a image tiny on s delay 5ms\n"
                 "vm b image tiny driver libvirt on v\n"
                 "vm c image tiny on v rate 10mbit\n")
    assert [g.split(":")[0] for g in got] == ["4", "5", "6"]
    assert "delay, jitter or loss on a vm's port" in got[0]
    assert "libvirt driver cannot attach to a VDE switch" in got[1]
    got = errors("switch a\nswitch b\nswitch c\nlink a -- b\nlink b -- c\nlink c -- a\n")
    assert got == [f"6: link c -- a closes a loop of switches: bridges run no spanning tree, so frames "
                   f"would circle forever; remove a link"]
    # Different VLANs between the same two switches are no loop.
    compile_text("switch a\nswitch b\nlink a -- b vlan 10\nlink a -- b vlan 20\n")


def test_a_switch_beyond_the_tree_limit_is_refused(monkeypatch):
    monkeypatch.setattr(limits, "SWITCH_PORTS_MAX", 5)
    got = errors("switch s\nhost h[1..6] on s\n")
    assert got == ["1: switch s has 6 ports; a tree of Linux bridges holds at most 5"]


def test_container_nics_of_a_big_switch_name_their_leaf_bridge():
    """1,500 containers on one switch: their ports sit on the tree's leaves
    (a bridge takes at most 1,024 ports), and each guest's NIC names the leaf
    its launcher puts the host end on, never the root."""
    from megafleet.netlang import limits

    net = compile_text('image tiny from "x.toml"\nswitch s subnet 10.0.0.0/20\n'
                       "vm c[1..1500] image tiny driver container mem 16M on s\n")
    p = live.plan(net, "tb")
    leaves = {b.ifname for b in p.bridges if b.root}
    assert len(leaves) >= 2
    port_bridge = {port.host_if: port.bridge for port in p.ports}
    per_bridge: dict[str, int] = {}
    for g in p.vms:
        (nic,) = g.nics
        assert nic.bridge == port_bridge[nic.ifname] and nic.bridge in leaves
        per_bridge[nic.bridge] = per_bridge.get(nic.bridge, 0) + 1
    assert max(per_bridge.values()) <= limits.LEAF_PORTS
