"""Unit tests of manifest building: demands for placement, cutting a testbed's plan
into per-host manifests (VXLAN, MTU, container NICs), JSON round trips, and the
errors for links that cannot cross hosts. Pure: nothing is created."""

from __future__ import annotations

import json

import pytest

from megafleet import manifest, placement
from megafleet.netlang import compile_text, live
from megafleet.vm.driver import DRIVER_KINDS

from .conftest import REPO

TWO_LANS = f"""
image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.50.0.0/16
switch lanA
switch lanB
router r1 {{
  iface lanA auto
  iface lanB auto
}}
host a[1..6] on lanA
vm c[1..2] image tiny driver container mem 64M on lanA
host b[1..2] on lanB
"""


def cut(text: str, hosts: list[tuple[str, int]], **kwargs):
    net = compile_text(text, name=str(REPO / "tests" / "up" / "t.fleet"))
    p = live.plan(net, "tb")
    placed = placement.place(manifest.demands(net, p),
                             [placement.HostOffer(h, cap, 100_000) for h, cap in hosts])
    addresses = {h: f"192.0.2.{i + 1}" for i, (h, _) in enumerate(hosts)}
    return net, p, placed, manifest.split(p, placed, addresses=addresses, **kwargs)


def test_demands_namespace_container_and_segments():
    net = compile_text(TWO_LANS, name=str(REPO / "tests" / "up" / "t.fleet"))
    p = live.plan(net, "tb")
    by_name = {d.name: d for d in manifest.demands(net, p)}
    assert by_name["a1"].segment == "lanA" and by_name["a1"].mem_mb == manifest.NAMESPACE_MB
    assert by_name["c1"].driver == "container" and by_name["c1"].image == "tiny"
    # A container costs its driver's small footprint, not its `mem`.
    assert placement.demand_mb(by_name["c1"], 0.3) == DRIVER_KINDS["container"].overhead_mb
    assert by_name["b2"].segment == "lanB"
    assert by_name["r1"].segment == "lanA"        # its first interface


def test_point_to_point_nodes_share_a_segment():
    text = """
pool p 10.51.0.0/16
switch s1
switch s2
router r1 on s1 ospf
router r2 ospf
router r3 on s2 ospf
link r1 -- r2
link r2 -- r3
host h1 on s1
"""
    net = compile_text(text)
    p = live.plan(net, "tb")
    by_name = {d.name: d for d in manifest.demands(net, p)}
    assert by_name["r1"].segment == by_name["r2"].segment == by_name["r3"].segment == "tied:r1"
    assert by_name["h1"].segment == "s1"


def test_one_host_has_everything_and_no_tunnels():
    _, p, placed, ms = cut(TWO_LANS, [("h0", 100)])
    assert list(ms) == ["h0"]
    m = ms["h0"]
    assert m.vxlan == []
    assert m.counts() == {"namespaces": 9, "routers": 1, "vms": 0, "containers": 2, "bridges": 2, "vxlan": 0}


def test_spanning_segment_gets_one_vni_vxlan_on_each_host_and_lowered_mtu():
    _, p, placed, ms = cut(TWO_LANS, [("h0", 6), ("h1", 6)], underlay_mtu=1500)
    spanning = manifest.spanning_segments(p, placed)
    assert [s["segment"] for s in spanning] == ["lanA"]
    vni = spanning[0]["vni"]
    for host, other in (("h0", "192.0.2.2"), ("h1", "192.0.2.1")):
        (x,) = [x for x in ms[host].vxlan if x.segment == "lanA"]
        assert x.vni == vni and x.remotes == (other,) and x.mtu == 1450
        assert x.local == {"h0": "192.0.2.1", "h1": "192.0.2.2"}[host]
        sub = manifest.plan_from_json(ms[host].net)
        lan_a = [port for port in sub.ports if port.switch == "lanA"]
        assert lan_a and all(port.mtu == 1450 for port in lan_a)
        for port in lan_a:
            if getattr(port, "ns", None):
                ups = [op for op in sub.ns_ops[port.ns] if type(op).__name__ == "LinkUp" and op.dev == port.eth]
                assert ups[0].mtu == 1450
    # Every node on exactly one host; hosts partition the nodes.
    nodes = [n for m in ms.values() for n in list(m.net["netns"]) + [v["name"] for v in m.net["vms"]]]
    assert sorted(nodes) == sorted(placed.node_host)


def test_container_nics_become_veths_on_their_ports_bridge_with_the_segments_mtu():
    _, p, placed, ms = cut(TWO_LANS, [("h0", 6), ("h1", 6)], underlay_mtu=1500)
    guests = [g for m in ms.values() for g in manifest.plan_from_json(m.net).vms]
    assert sorted(g.name for g in guests) == ["c1", "c2"]
    ports = {port.host_if: port for m in ms.values() for port in manifest.plan_from_json(m.net).ports
             if port.node in ("c1", "c2")}
    assert ports and all(port.kind == "cveth" for port in ports.values())
    for g in guests:
        (nic,) = g.nics
        assert nic.kind == "veth" and nic.ifname in ports
        # The launcher makes the pair: both ends with lanA's lowered MTU, on the port's bridge.
        assert g.config.nics[0].mtu == 1450 and nic.mtu == 1450          # lanA spans hosts
        assert nic.bridge == ports[nic.ifname].bridge


def test_big_underlay_keeps_segment_mtu():
    _, _, _, ms = cut(TWO_LANS, [("h0", 6), ("h1", 6)], underlay_mtu=9000)
    assert all(x.mtu == 1500 for m in ms.values() for x in m.vxlan)


def test_manifest_json_round_trip_and_determinism():
    _, p, placed, ms = cut(TWO_LANS, [("h0", 6), ("h1", 6)], ksm=False, telemetry="sqlite:/x")
    for m in ms.values():
        data = json.loads(json.dumps(m.to_json()))
        back = manifest.HostManifest.from_json(data)
        assert json.loads(json.dumps(back.to_json())) == data
        assert back.digest() == m.digest()
    _, _, _, again = cut(TWO_LANS, [("h0", 6), ("h1", 6)], ksm=False, telemetry="sqlite:/x")
    assert {h: m.to_json() for h, m in again.items()} == {h: m.to_json() for h, m in ms.items()}


def test_digest_ignores_daemon_settings_but_not_the_network():
    _, _, _, a = cut(TWO_LANS, [("h0", 100)], ksm=True, collect_interval=5)
    _, _, _, b = cut(TWO_LANS, [("h0", 100)], ksm=False, collect_interval=1)
    assert a["h0"].digest() == b["h0"].digest()
    _, _, _, c = cut(TWO_LANS.replace("a[1..6]", "a[1..5]"), [("h0", 100)])
    assert c["h0"].digest() != a["h0"].digest()


def test_malformed_manifest_is_a_clear_error():
    with pytest.raises(manifest.ManifestError, match="malformed host manifest"):
        manifest.HostManifest.from_json({"testbed": "tb", "host": "h0", "net": {}, "bogus": 1})


def test_point_to_point_link_across_hosts_is_refused():
    text = """
pool p 10.52.0.0/16
router r1 ospf
router r2 ospf
link r1 -- r2
"""
    net = compile_text(text)
    p = live.plan(net, "tb")
    # A placement that ignores the tie (placement itself keeps them together).
    forced = placement.Plan(hosts={"h0": ["r1"], "h1": ["r2"]}, node_host={"r1": "h0", "r2": "h1"},
                            segment_hosts={}, vnis={})
    with pytest.raises(manifest.ManifestError, match="point-to-point link .* would cross hosts"):
        manifest.split(p, forced, addresses={"h0": "192.0.2.1", "h1": "192.0.2.2"})


def test_switch_link_lives_on_one_host():
    text = """
pool p 10.53.0.0/16
switch s1
switch s2
link s1 -- s2
host a[1..4] on s1
host b[1..4] on s2
"""
    net = compile_text(text)
    p = live.plan(net, "tb")
    placed = placement.place(manifest.demands(net, p),
                             [placement.HostOffer("h0", 4, 1000), placement.HostOffer("h1", 4, 1000)])
    ms = manifest.split(p, placed, addresses={"h0": "192.0.2.1", "h1": "192.0.2.2"})
    links = [(h, link) for h, m in ms.items() for link in m.net["trunks"]]
    assert len(links) == 1
    host = links[0][0]
    # That host carries both bridges; the other switch spans to it by VXLAN.
    assert len(ms[host].net["bridges"]) == 2
    assert len(manifest.spanning_segments(p, placed)) == 1
