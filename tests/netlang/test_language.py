"""Every construct of the language, compiled without root: names, counts,
patterns, groups, links, properties, VLANs, addressing, routing, includes,
parameters, assertions, graph, export and drawing."""

from __future__ import annotations

import json

import pytest

from megafleet.netlang import frr
from megafleet.netlang.compiler import compile_file, compile_text
from megafleet.netlang.draw import to_dot
from megafleet.netlang.errors import CompileError
from megafleet.netlang.export import to_json


def addrs(net, node):
    return [a for _, _, ad in net.node(node).ifaces for a in ad.values()]


def test_counts_and_zero_padding_and_suffix():
    net = compile_text("switch lan[1..3]\nhost web[1..100] on lan1\nhost r[01..10] on lan2\n"
                       "host h[1..2]x on lan3\n")
    assert net.counts() == {"switch": 3, "vm": 0, "host": 112, "router": 0}
    assert {"web1", "web100", "r01", "r10", "h1x", "h2x"} <= set(net.index)
    assert "r1" not in net.index


def test_statements_separated_by_semicolons_comments_and_continuations():
    net = compile_text("switch a; switch b   # two switches\nhost h1 \\\n  on a\n")
    assert set(net.switches) == {"a", "b"} and net.node("h1").ifaces[0][1].switch == "a"


def test_auto_addressing_v4_v6_routers_first_and_gateways():
    net = compile_text("pool lans 10.1.0.0/16\npool six fd00::/48\nswitch lan[1..2]\n"
                       "host h[1..3] on lan1\nrouter gw on lan*\n")
    # The router gets the low addresses although it is declared after the hosts.
    assert addrs(net, "gw") == ["10.1.0.1/24", "fd00::1/64", "10.1.1.1/24", "fd00:0:0:1::1/64"]
    assert addrs(net, "h1") == ["10.1.0.2/24", "fd00::2/64"]
    assert net.node("h3").gateways == {4: "10.1.0.1", 6: "fd00::1"}


def test_explicit_addresses_are_consecutive_for_a_group_and_skipped_by_auto():
    net = compile_text("switch lan subnet 10.0.0.0/24\nhost a[1..3] on lan 10.0.0.2\nhost b on lan\n")
    assert [addrs(net, f"a{i}")[0] for i in (1, 2, 3)] == ["10.0.0.2/24", "10.0.0.3/24", "10.0.0.4/24"]
    assert addrs(net, "b") == ["10.0.0.1/24"]
    net = compile_text("switch lan subnet 10.0.0.0/24\nhost a on lan 10.0.0.1\nhost b[1..2] on lan\n")
    assert addrs(net, "b1") == ["10.0.0.2/24"] and addrs(net, "b2") == ["10.0.0.3/24"]


def test_subnet_derived_from_explicit_addresses_and_none():
    net = compile_text("switch core\nrouter gw { iface core 10.0.0.1/24 }\nhost h on core 10.0.0.9/24\n"
                       "host l2 on core none\n")
    assert str(net.domains[0].subnets[4]) == "10.0.0.0/24"
    assert addrs(net, "l2") == []
    assert net.node("h").gateways == {4: "10.0.0.1"}


def test_pool_skips_explicit_subnets_and_per_length():
    net = compile_text("pool p 10.0.0.0/16 per /26\nswitch fixed subnet 10.0.0.0/26\nswitch a\nswitch b\n")
    subs = {d.name: str(d.subnets[4]) for d in net.domains}
    assert subs == {"fixed": "10.0.0.0/26", "a": "10.0.0.64/26", "b": "10.0.0.128/26"}


def test_named_pool_per_switch():
    net = compile_text("pool a 10.0.0.0/16\npool b 10.9.0.0/16\nswitch s1\nswitch s2 subnet b\n")
    assert str(net.domains[1].subnets[4]) == "10.9.0.0/24"


def test_patterns_ranges_and_groups_in_references():
    net = compile_text("pool p 10.0.0.0/16\nswitch lan[1..4]\nswitch wan\nrouter gw on lan* on wan\n"
                       "group probes { host p[1..3] on lan1 }\nhost x on lan2\n"
                       "reachable @probes x\nreachable p[1..2] x\n")
    assert [i.switch for _, i, _ in net.node("gw").ifaces] == ["lan1", "lan2", "lan3", "lan4", "wan"]
    assert len(net.reachable) == 2


def test_group_defaults_apply_and_members_override():
    net = compile_text('image tiny from "tiny.toml"\nimage big from "big.toml"\npool p 10.0.0.0/16\n'
                       "switch lan\n"
                       "group web image tiny mem 96M on lan {\n  vm a[1..2]\n  vm b image big mem 256M\n"
                       "  host probe\n}\n")
    a = net.groups[net.index["a1"][0]].props
    b = net.groups[net.index["b"][0]].props
    assert (a["image"], a["mem_mib"]) == ("tiny", 96)
    assert (b["image"], b["mem_mib"]) == ("big", 256)
    # a host takes the attachment but not the vm-only defaults
    probe = net.node("probe")
    assert "image" not in probe.props and probe.ifaces[0][1].switch == "lan"


def test_vm_properties():
    net = compile_text('image tiny from "images/tiny.toml"\nvm v image tiny mem 1G vcpus 2 driver libvirt\n',
                       name="/x/t.fleet")
    g = net.groups[0]
    assert g.props == {"image": "tiny", "mem_mib": 1024, "vcpus": 2, "driver": "libvirt"}
    assert net.images["tiny"][0] == "/x/images/tiny.toml"


def test_point_to_point_links_get_their_own_subnet_and_props():
    net = compile_text("pool p 10.0.0.0/16\nrouter r[1..3]\nlink r1 -- r2 delay 50ms jitter 5ms loss 1% "
                       "rate 10mbit mtu 9000\nlink r2 10.9.0.1/30 -- r3 10.9.0.2/30\n")
    eth, iface, a = net.node("r1").ifaces[0]
    assert (eth, iface.peer, a[4]) == ("eth0", "r2", "10.0.0.1/30")
    assert iface.props.to_json() == {"rate_bit": 10_000_000, "delay_us": 50_000, "jitter_us": 5000,
                                     "loss_pct": 1.0, "mtu": 9000}
    assert iface.domain.mtu == 9000
    assert addrs(net, "r2") == ["10.0.0.2/30", "10.9.0.1/30"]
    assert addrs(net, "r3") == ["10.9.0.2/30"]


def test_node_to_switch_link_and_switch_links_merge_networks():
    net = compile_text("pool p 10.0.0.0/16\nswitch a\nswitch b\nhost h on a\nlink a -- b rate 1gbit\n"
                       "host k on b\nlink k -- a\n")
    assert addrs(net, "h")[0].rsplit(".", 1)[0] == addrs(net, "k")[0].rsplit(".", 1)[0]
    assert [i.switch for _, i, _ in net.node("k").ifaces] == ["b", "a"]
    assert net.switch_links[0].props.rate_bit == 10**9


def test_vlans_are_separate_networks_and_trunks_join_them():
    net = compile_text("pool p 10.0.0.0/16\nswitch s1\nswitch s2\nhost a on s1 vlan 10\n"
                       "host b on s1 vlan 20\nhost c on s2 vlan 10\nlink s1 -- s2 vlan 10,20\n")
    dom = {n: net.node(n).ifaces[0][1].domain for n in "abc"}
    assert dom["a"] is dom["c"] and dom["a"] is not dom["b"]
    assert net.switches["s1"].vlans == {10, 20}
    assert net.switch_links[0].vlans == [10, 20]
    with pytest.raises(CompileError, match="cannot hold"):
        compile_text("pool p 10.0.0.0/16\nswitch s\nhost a on s vlan 10\nhost b on s vlan 20\nreachable a b\n")


def test_static_routes_follow_the_shortest_router_path():
    net = compile_text("pool p 10.0.0.0/16\nswitch lan[1..4]\nrouter r1 on lan1 on lan2\n"
                       "router r2 on lan2 on lan3\nrouter r3 on lan3 on lan4\nhost a on lan1\nhost d on lan4\n"
                       "reachable a d\n")
    r1 = dict(net.node("r1").routes)
    assert r1 == {"10.0.2.0/24": "10.0.1.2", "10.0.3.0/24": "10.0.1.2"}
    r2 = dict(net.node("r2").routes)
    assert r2 == {"10.0.0.0/24": "10.0.1.1", "10.0.3.0/24": "10.0.2.2"}


def test_explicit_routes_and_no_static_routes_for_ospf_routers():
    net = compile_text("pool p 10.0.0.0/16\nswitch lan[1..3]\nrouter r1 on lan1 on lan2 ospf area 1 cost 5\n"
                       "router r2 on lan2 on lan3 ospf\nhost h on lan1 route 192.168.0.0/16 via 10.0.0.9\n")
    assert net.node("r1").routes == []
    assert net.node("h").routes == [("192.168.0.0/16", "10.0.0.9")]
    conf = frr.configs(net, "r1")["ospfd"]
    assert "interface eth0\n ip ospf area 1\n" in conf and " ip ospf cost 5" in conf
    assert "ospf router-id 10.0.0.1" in conf


def test_ospf_point_to_point_links_and_bgp_neighbors():
    net = compile_text("pool p 10.0.0.0/16\nrouter a bgp 65001 ospf\nrouter b bgp as 65002\nlink a -- b\n")
    conf = frr.configs(net, "a")
    assert " ip ospf network point-to-point" in conf["ospfd"]
    assert "router bgp 65001" in conf["bgpd"]
    assert " neighbor 10.0.0.2 remote-as 65002" in conf["bgpd"]
    assert "ospfd" not in frr.configs(net, "b")


def test_include_and_parameters(tmp_path):
    (tmp_path / "common.fleet").write_text("param n = 2\npool p 10.0.0.0/16\nswitch lan\n")
    main = tmp_path / "main.fleet"
    main.write_text('include "common.fleet"\nhost h[1..$n] on lan\n')
    assert compile_file(str(main)).counts()["host"] == 2
    net = compile_file(str(main), defines={"n": "5"})
    assert net.counts()["host"] == 5 and net.params == {"n": "5"}


def test_all_errors_reported_at_once():
    with pytest.raises(CompileError) as info:
        compile_text("switch a\nhost x on nowhere\nhost y on a mem 1G\nswitch a\n")
    assert len(info.value.messages) == 3


def test_graph_has_nodes_switches_and_edges():
    net = compile_text("pool p 10.0.0.0/16\nswitch lan[1..2]\nrouter gw on lan*\nhost h[1..5] on lan1\n"
                       "router r2\nlink gw -- r2\nlink lan1 -- lan2\n")
    g = net.graph
    assert g.number_of_nodes() == 2 + 1 + 5 + 1
    assert g.has_edge("h3", "lan1") and g.has_edge("gw", "r2") and g.has_edge("lan1", "lan2")
    assert g.nodes["h3"]["kind"] == "host" and g.nodes["lan1"]["kind"] == "switch"


def test_export_is_json_with_every_node():
    net = compile_text("pool p 10.0.0.0/16\nswitch lan\nrouter gw on lan\nhost h[1..3] on lan\n")
    data = json.loads(json.dumps(to_json(net)))
    assert [n["name"] for n in data["nodes"]] == ["gw", "h1", "h2", "h3"]
    assert data["nodes"][1]["gateways"] == {"ipv4": "10.0.0.1"}
    assert data["networks"][0]["subnets"] == ["10.0.0.0/24"]


def test_drawing_collapses_groups():
    net = compile_text("pool p 10.0.0.0/8 per /16\nswitch lan[1..10]\nrouter gw on lan*\n"
                       + "".join(f"host h{i}x[1..1000] on lan{i}\n" for i in range(1, 11)))
    assert net.node_count() == 10001
    dot = to_dot(net)
    assert dot.count("shape=box") == 10 and '"h1x1 .. h1x1000\\n1000 hosts"' in dot
    assert "×1000" in dot


def test_example_files_compile():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.fleet"))
    assert examples
    for path in examples:
        assert compile_file(str(path)).node_count() > 0


def test_vm_nodes_become_guest_specs_for_the_vm_engine():
    from megafleet.netlang.live import plan
    from megafleet.vm.spec import validate_all

    net = compile_text('image tiny from "tiny.toml"\npool p 10.0.0.0/16\nswitch lan[1..2]\n'
                       "router gw on lan*\nvm web[1..3] image tiny mem 112M vcpus 2 on lan1\n"
                       "router vr image tiny on lan2 ospf\n")
    p = plan(net, "mfnp")
    specs = validate_all(p.vms)
    assert [s.name for s in specs] == ["web1", "web2", "web3", "vr"]
    web1 = next(s for s in specs if s.name == "web1")
    assert (web1.image, web1.mem_mb, web1.vcpus, web1.driver) == ("tiny", 112, 2, "qemu")
    assert web1.nics[0].kind == "tap" and web1.nics[0].ifname.startswith("mfnp")
    args = web1.guest_config().kernel_args()
    assert f"megafleet.net={web1.nics[0].mac},10.0.0.2/24" in args and "megafleet.gw=10.0.0.1" in args
    # Their taps are planned on the bridge, with no namespace.
    assert sorted(port.host_if for port in p.ports if port.kind == "tap") == \
        sorted(s.nics[0].ifname for s in specs)
    assert "web1" not in p.netns and "gw" in p.netns


def test_group_reference_where_a_switch_is_needed_is_an_error():
    with pytest.raises(CompileError) as info:
        compile_text("switch s\ngroup g { host a on s }\nhost b on @g\n")
    assert info.value.messages == ["'a' is a host, not a switch"]


def test_group_routes_are_copied_per_member():
    net = compile_text("switch s subnet 10.0.0.0/24\ngroup g route 10.9.0.0/16 via 10.0.0.1 {\n"
                       "  host a on s route 10.8.0.0/16 via 10.0.0.1\n  host b on s\n}\n")
    assert [d for d, _ in net.node("a").routes] == ["10.9.0.0/16", "10.8.0.0/16"]
    assert [d for d, _ in net.node("b").routes] == ["10.9.0.0/16"]


def test_ospf6_for_ipv6_networks():
    net = compile_text("pool p 10.0.0.0/16\npool q fd00::/48\nswitch lan\nrouter a on lan ospf\nrouter b ospf\n"
                       "link a -- b\n")
    conf = frr.configs(net, "a")
    assert "interface eth0\n ipv6 ospf6 area 0\n" in conf["ospf6d"]
    assert "interface eth1\n ipv6 ospf6 area 0\n ipv6 ospf6 network point-to-point" in conf["ospf6d"]
    assert "router ospf6\n ospf6 router-id 10.0.0.1" in conf["ospf6d"]
    v4only = compile_text("pool p 10.0.0.0/16\nswitch lan\nrouter a on lan ospf\n")
    assert "ospf6d" not in frr.configs(v4only, "a")


def test_parser_is_kept_in_the_cache_and_rebuilt_when_its_file_is_bad(tmp_path, monkeypatch):
    """The built parser is saved once and loaded after that; a truncated cache
    file is replaced by a good one, and the parser it gives parses alike."""
    from megafleet.netlang import parser as P

    monkeypatch.setenv("MEGAFLEET_CACHE", str(tmp_path))
    text = "switch s1\nhost h1 on s1 { ip 10.0.0.1/24 }\n"
    expected = P.Lark(P.GRAMMAR, **P._OPTIONS).parse(text)
    loads: list[int] = []                  # parsers made from the file, not built
    real_load = P.Lark._load
    monkeypatch.setattr(P.Lark, "_load", lambda self, *a, **k: loads.append(1) or real_load(self, *a, **k))
    built = P._load_or_build()
    [saved] = (tmp_path / "netlang").glob("parser*.lark")
    assert built.parse(text) == expected and loads == []
    assert P._load_or_build().parse(text) == expected and loads == [1]      # from the file
    saved.write_bytes(saved.read_bytes()[:100])
    assert P._load_or_build().parse(text) == expected and loads == [1]      # rebuilt
    assert P._load_or_build().parse(text) == expected and loads == [1, 1]   # and saved again
    assert [p.name for p in (tmp_path / "netlang").iterdir()] == [saved.name]   # no temporary left
