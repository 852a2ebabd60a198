"""Importers (containerlab, GraphML/GML, netlab, GNS3) and exporters: pure logic,
no root. Inputs are in importdata/ (written from each format's documentation)
and ../shared/testdata/topologyzoo (real Topology Zoo maps)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import networkx as nx
import pytest
import yaml
from click.testing import CliRunner

from megafleet.cli import root
from megafleet.netlang import live
from megafleet.netlang.compiler import compile_file, compile_text
from megafleet.netlang.errors import CompileError
from megafleet.netlang.importers import ImportFailed, ImportOptions, convert, detect, formats_export
from megafleet.netlang.importers.common import Namer, readable
from megafleet.netlang.importers.graphml import geo_delay_us

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "importdata"
ZOO = REPO.parent / "shared" / "testdata" / "topologyzoo"


def zoo(name: str) -> Path:
    path = ZOO / name
    if not path.exists():
        pytest.skip(f"Topology Zoo test data not found at {path} (../shared/testdata beside the repo)")
    return path


def ifaces(net, node: str) -> dict[str, object]:
    return {eth: iface for eth, iface, _ in net.node(node).ifaces}


def p2p_links(net) -> set[frozenset[str]]:
    """{ {a:ifname, b:ifname} } of every point-to-point link."""
    out = set()
    for _, _, n in net.iter_nodes():
        for eth, iface, _ in net.node(n).ifaces:
            if iface.peer is not None:
                peer = next(e for e, i, _ in net.node(iface.peer).ifaces if i.domain is iface.domain)
                out.add(frozenset((f"{n}:{eth}", f"{iface.peer}:{peer}")))
    return out


# -- format detection ---------------------------------------------------------------

def test_formats_are_recognised_by_extension_or_content(tmp_path):
    assert detect(DATA / "lab.clab.yml") == "clab"
    assert detect(DATA / "netlab-topology.yml") == "netlab"
    assert detect(DATA / "lab.gns3") == "gns3"
    assert detect(DATA / "zoo-mini.graphml") == "graphml"
    assert detect(DATA / "mini.gml") == "gml"
    assert detect(REPO / "examples" / "triangle.fleet") is None
    # By content, whatever the name.
    (tmp_path / "lab.yaml").write_text((DATA / "lab.clab.yml").read_text())
    (tmp_path / "map.xml").write_text((DATA / "zoo-mini.graphml").read_text())
    (tmp_path / "proj.json").write_text((DATA / "lab.gns3").read_text())
    assert [detect(tmp_path / f) for f in ("lab.yaml", "map.xml", "proj.json")] == ["clab", "graphml", "gns3"]


# -- containerlab ------------------------------------------------------------------------

def test_clab_nodes_links_mgmt_and_interface_names():
    net = compile_file(DATA / "lab.clab.yml")        # through the compiler's import hook
    assert net.counts() == {"switch": 2, "vm": 0, "host": 2, "router": 2}
    kinds = {n: g.kind for g, _, n in net.iter_nodes()}
    assert kinds == {"srl1": "router", "frr1": "router", "client1": "host", "client2": "host"}
    assert p2p_links(net) == {frozenset({"srl1:e1-1", "frr1:eth1"}), frozenset({"frr1:eth2", "client1:eth1"})}
    # ethernet-1/2 is no Linux interface name: the nearest one.
    assert "ethernet-1-2" in ifaces(net, "srl1") and ifaces(net, "srl1")["ethernet-1-2"].switch == "br1"
    # mgmt: eth0 of every node on switch mgmt; client1 at its mgmt-ipv4; routers without an address.
    c1 = net.node("client1")
    assert c1.ifaces[0][0] == "eth0" and c1.ifaces[0][1].switch == "mgmt"
    assert c1.ifaces[0][2][4] == "172.31.10.21/24"
    assert net.node("srl1").ifaces[0][1].switch == "mgmt" and net.node("srl1").ifaces[0][2] == {}
    # The hosts' gateway is on their data network, not on mgmt.
    frr1_addrs = {eth: addrs for eth, _, addrs in net.node("frr1").ifaces}
    assert c1.gateways[4] == frr1_addrs["eth2"][4].split("/")[0]
    # Impairments of the link kept.
    props = ifaces(net, "srl1")["e1-1"].props
    assert (props.delay_us, props.jitter_us, props.loss_pct, props.rate_bit) == (5000, 1000, 0.5, 10_000_000)


def test_clab_reports_what_has_no_equivalent_node_by_node_with_file_and_line():
    result = convert([DATA / "lab.clab.yml"])
    notes = [n.render() for n in result.warnings]
    file = str(DATA / "lab.clab.yml")

    def has(pattern: str) -> bool:
        return any(re.search(pattern, n) for n in notes)

    assert has(rf"^{re.escape(file)}:17:5: warning: node srl1: kind nokia_srlinux .*vendor configuration")
    assert has(rf"^{re.escape(file)}:19:7: warning: node srl1: not carried over: startup-config")
    assert has(r"lab.clab.yml:23:7: warning: node frr1: not carried over: binds, image")
    assert has(r"lab.clab.yml:54:7: warning: link client2:eth9 -- host:client2-eth9: 'host' endpoints")
    assert has(r"interface srl1:ethernet-1/2 is named ethernet-1-2")
    # Each statement says where it came from; the exec command is client1's startup command.
    assert re.search(r"^link srl1:e1-1 -- frr1:eth1 .*# .*lab.clab.yml:36:7$", result.text, re.M)
    assert re.search(r'^  exec "ip addr add 192.0.2.21/32 dev lo"  # .*lab.clab.yml:29:11$', result.text, re.M)
    assert not has("exec")
    net = compile_text(result.text, "lab.fleet")
    assert [argv for argv, _ in net.groups[net.index["client1"][0]].props["exec"]] == \
        [("ip", "addr", "add", "192.0.2.21/32", "dev", "lo")]


EXEC_LAB = """\
name: ex
topology:
  nodes:
    r1:
      kind: frr
      exec:
        - ip addr add 192.0.2.1/32 dev lo
        - bash -c "echo up > /dev/null"
    h1:
      kind: linux
      exec: ["sh -c \\"echo it's\\"", "echo $HOME", "sleep 1"]
    br:
      kind: bridge
      exec: ["true"]
  links:
    - endpoints: ["r1:eth1", "h1:eth1"]
"""


def test_clab_exec_becomes_startup_commands_and_what_cannot_be_carried_is_reported(tmp_path):
    lab = tmp_path / "ex.clab.yml"
    lab.write_text(EXEC_LAB)
    result = convert([lab])
    net = compile_text(result.text, "ex.fleet")
    cmds = lambda n: [argv for argv, _ in net.groups[net.index[n][0]].props.get("exec", [])]  # noqa: E731
    # Router and host commands are carried (re-quoted with ' where the line had ").
    assert cmds("r1") == [("ip", "addr", "add", "192.0.2.1/32", "dev", "lo"), ("bash", "-c", "echo up > /dev/null")]
    assert "exec \"bash -c 'echo up > /dev/null'\"" in result.text
    assert cmds("h1") == [("sleep", "1")]
    notes = [n.render() for n in result.warnings]
    # Both quotes, a $NAME (a parameter in .fleet) and a bridge's commands: comments and warnings.
    assert any(re.search(r"ex.clab.yml:11:\d+: warning: node h1: exec .*echo it.* cannot be quoted", n) for n in notes)
    assert any(re.search(r"ex.clab.yml:11:\d+: warning: node h1: exec 'echo \$HOME' not carried", n) for n in notes)
    assert any(re.search(r"ex.clab.yml:14:\d+: warning: node br: exec 'true' not carried over: a bridge", n)
               for n in notes)
    assert "# exec on h1" in result.text and "# exec on br" in result.text
    # As container guests, the hosts' commands are not carried; the router's are.
    cont = convert([lab], opts=ImportOptions(linux="container"))
    assert any("node h1: exec 'sleep 1' not carried over: commands for container guests" in n.render()
               for n in cont.warnings)
    net2 = compile_text(cont.text, "ex.fleet")
    assert len(net2.groups[net2.index["r1"][0]].props["exec"]) == 2
    # Exported back to containerlab, the commands are the node's exec list again.
    back = yaml.safe_load(formats_export(net, "clab", "ex"))
    assert back["topology"]["nodes"]["r1"]["exec"] == ["ip addr add 192.0.2.1/32 dev lo",
                                                       "bash -c 'echo up > /dev/null'"]


def test_clab_multi_host_pair_becomes_one_testbed():
    result = convert([DATA / "pair-a.clab.yml", DATA / "pair-b.clab.yml"])
    net = compile_text(result.text + "reachable ha hb\n", "pair.fleet")
    assert frozenset({"ra:eth2", "rb:eth2"}) in p2p_links(net)
    assert any("vxlan vni 100" in n.message and "becomes one link" in n.message for n in result.warnings)
    # One half alone: the tunnel's far end is reported, the rest imports.
    half = convert([DATA / "pair-a.clab.yml"])
    assert any(re.search(r"pair-a.clab.yml:\d+:\d+: warning: vxlan link of ra:eth2 to 192.0.2.12 vni 100: "
                         r"its other end is not among the imported files", n.render()) for n in half.warnings)
    assert compile_text(half.text, "half.fleet").counts()["router"] == 1


def test_clab_round_trip_keeps_nodes_links_and_interface_names(tmp_path):
    original = yaml.safe_load((DATA / "lab.clab.yml").read_text())
    net = compile_file(DATA / "lab.clab.yml")
    exported = yaml.safe_load(formats_export(net, "clab", "lab1"))
    assert set(exported["topology"]["nodes"]) == set(original["topology"]["nodes"])
    assert exported["topology"]["nodes"]["br1"]["kind"] == "bridge"
    assert exported["mgmt"]["ipv4-subnet"] == "172.31.10.0/24"
    assert exported["topology"]["nodes"]["client1"]["mgmt-ipv4"] == "172.31.10.21"

    def node_ends(doc) -> set[frozenset[str]]:
        out = set()
        for link in doc["topology"]["links"]:
            eps = link["endpoints"]
            eps = [e if isinstance(e, str) else f"{e['node']}:{e['interface']}" for e in eps]
            if any(e.split(":")[0] in ("host",) for e in eps):
                continue
            # A bridge's port names are host interfaces: compared by the bridge alone.
            out.add(frozenset(e.split(":")[0] if e.startswith("br1:") else e for e in eps))
        return out

    want = node_ends(original)
    want = {frozenset(e.replace("ethernet-1/2", "ethernet-1-2") for e in link) for link in want}
    assert node_ends(exported) == want
    # And back again: the same testbed.
    (tmp_path / "again.clab.yml").write_text(formats_export(net, "clab", "lab1"))
    again = compile_file(tmp_path / "again.clab.yml")
    assert p2p_links(again) == p2p_links(net) and again.counts() == net.counts()


# -- GraphML / GML ------------------------------------------------------------------

def test_zoo_labels_become_unique_readable_names():
    assert readable("Zürich") == "Zurich" and readable("New York") == "New_York"
    assert readable("1st Ave") == "n_1st_Ave" and readable("???") == "n"
    namer = Namer()
    assert [namer.take(x) for x in ("Paris", "Paris", "paris")] == ["Paris", "Paris_2", "paris_3"]
    # A name taken as a label of its own is skipped by the suffixes that follow.
    assert [namer.take(x) for x in ("Paris_4", "Paris", "Paris")] == ["Paris_4", "Paris_5", "Paris_6"]
    # Many nodes of one label: each suffix found where the last one stopped.
    many = Namer()
    assert [many.take("X") for _ in range(20_000)][-1] == "X_20000"


def test_graphml_positions_name_line_and_column_of_nodes_and_edges():
    from megafleet.netlang.importers.graphml import _xml_positions
    text = ('<graphml>\n  <graph>\n    <node id="a"/><node id="b&amp;c"/>\n'
            '      <edge source="b&amp;c" target="a"/>\n  <edge target="a" source="b&amp;c"/>\n</graph>')
    nodes, edges = _xml_positions("m.graphml", text)
    assert {k: str(v) for k, v in nodes.items()} == {"a": "m.graphml:3:5", "b&c": "m.graphml:3:19"}
    assert [str(x) for x in edges[("a", "b&c")]] == ["m.graphml:4:7", "m.graphml:5:3"]


def test_graphml_hyperedges_parallel_edges_geo_delays_and_rates():
    result = convert([DATA / "zoo-mini.graphml"], opts=ImportOptions(delays="geo", rates=True))
    net = compile_text(result.text, "zoo.fleet")
    assert sorted(net.routers()) == ["Geneve", "New_York", "Paris", "Paris_2", "Zurich"]
    assert list(net.switches) == ["None"]       # the hyperedge pseudo-node
    assert {n for n, i in ifaces(net, "New_York").items() if i.switch == "None"} == {"eth0"}
    # Two parallel Geneve -- Paris edges: two links, each its own network.
    to_paris = [i for i in ifaces(net, "Geneve").values() if i.peer == "Paris"]
    assert len(to_paris) == 2 and to_paris[0].domain is not to_paris[1].domain
    zurich = next(i for i in ifaces(net, "Zurich").values() if i.peer == "Geneve")
    # Zürich -- Genève is ~224 km: ~1.12 ms at 2/3 c; LinkSpeedRaw 10 Gbit/s.
    assert 1050 <= zurich.props.delay_us <= 1200 and zurich.props.rate_bit == 10**10
    assert all("ospf" in net.groups[net.index[r][0]].props for r in net.routers())
    assert "label Zürich" in result.text and "a hyperedge" in result.text


def test_geo_delay_is_great_circle_at_two_thirds_c():
    # Equator, 1 degree of longitude = 111.195 km -> 556 µs.
    assert geo_delay_us({"Latitude": 0, "Longitude": 0}, {"Latitude": 0, "Longitude": 1}) == 556
    assert geo_delay_us({"Latitude": 0}, {"Latitude": 0, "Longitude": 1}) is None


def test_gml_with_parallel_edges_and_a_hyperedge():
    net = compile_file(DATA / "mini.gml")
    assert sorted(net.routers()) == ["Amsterdam", "Dublin", "London"] and list(net.switches) == ["Bus"]
    assert len([i for i in ifaces(net, "Amsterdam").values() if i.peer == "London"]) == 2


def test_graphml_routing_and_hosts_per_router_options():
    bgp = compile_text(convert([DATA / "zoo-mini.graphml"], opts=ImportOptions(routing="bgp")).text, "b.fleet")
    asns = {bgp.groups[bgp.index[r][0]].props["bgp"]["as"] for r in bgp.routers()}
    assert len(asns) == 5 and all(64512 <= a <= 65534 for a in asns)
    static = compile_text(convert([DATA / "zoo-mini.graphml"], opts=ImportOptions(routing="static")).text, "s.fleet")
    assert not any({"ospf", "bgp"} & set(static.groups[static.index[r][0]].props) for r in static.routers())
    hosts = compile_text(convert([DATA / "zoo-mini.graphml"], opts=ImportOptions(hosts_per_router=3)).text, "h.fleet")
    assert hosts.counts()["host"] == 15 and "Zurich_lan" in hosts.switches
    assert hosts.node("Zurich_h2").gateways[4] == hosts.node("Zurich").ifaces[0][2][4].split("/")[0]


def test_geant_and_abilene_import_with_ospf():
    geant = compile_file(zoo("Geant2012.graphml"))
    assert geant.counts() == {"switch": 0, "vm": 0, "host": 0, "router": 40}
    assert len(p2p_links(geant)) == 61
    assert all(geant.groups[geant.index[r][0]].props.get("ospf") for r in geant.routers())
    abilene = convert([zoo("Abilene.graphml")], opts=ImportOptions(hosts_per_router=1, delays="geo"))
    net = compile_text(abilene.text + "reachable New_York_h1 Los_Angeles_h1\n", "abilene.fleet")
    assert net.counts()["router"] == 11 and "New_York" in net.routers()


def test_graphml_export_and_import_keep_interface_names_and_parallel_links(tmp_path):
    net = compile_text("pool p 10.0.0.0/16\nrouter a\nrouter b\nswitch s\nhost h\n"
                       "link a:up0 -- b:up0 delay 2ms\nlink a:up1 -- b:up1\nlink h -- s\nlink a -- s\n")
    (tmp_path / "x.graphml").write_text(formats_export(net, "graphml", "x"))
    g = nx.read_graphml(tmp_path / "x.graphml")
    assert g.number_of_edges("a", "b") == 2
    back = compile_file(tmp_path / "x.graphml")
    assert p2p_links(back) == {frozenset({"a:up0", "b:up0"}), frozenset({"a:up1", "b:up1"})}
    assert back.counts() == net.counts()
    assert next(i for i in ifaces(back, "a").values() if i.name == "up0").props.delay_us == 2000


def test_a_generated_10k_node_graphml_imports():
    g = nx.random_labeled_tree(10_000, seed=1) if hasattr(nx, "random_labeled_tree") else \
        nx.random_tree(10_000, seed=1)
    text = "\n".join(nx.generate_graphml(g))
    from megafleet.netlang.importers import graphml
    result = graphml.convert([("big.graphml", text)], ImportOptions(routing="static"))
    assert result.text.count("\nrouter ") == 10_000 and result.text.count("\nlink ") == 9_999


# -- netlab ----------------------------------------------------------------------

def test_netlab_nodes_groups_links_and_modules():
    net = compile_file(DATA / "netlab-topology.yml")
    props = {r: net.groups[net.index[r][0]].props for r in net.routers()}
    assert sorted(props) == ["c1", "c2", "e1", "e2"]
    assert [props[r]["bgp"]["as"] for r in ("c1", "c2", "e1", "e2")] == [65001, 65000, 65100, 65200]
    assert all("ospf" in p for p in props.values())
    assert sorted(n for g, _, n in net.iter_nodes() if g.kind == "host") == ["h1", "h2"]
    # e1-e2-h1 is a LAN; c1 alone a stub; c2's interface name and the link's tc kept.
    lan = next(s for s in net.switches if s.startswith("lan"))
    assert {n for n in ("e1", "e2", "h1") if any(i.switch == lan for i in ifaces(net, n).values())} == \
        {"e1", "e2", "h1"}
    assert "c1_stub" in net.switches
    eth9 = ifaces(net, "c2")["eth9"]
    assert eth9.peer == "e2" and eth9.props.delay_us == 3000 and eth9.props.rate_bit == 100_000_000
    assert str(eth9.domain.subnets[4]).startswith("10.1.")      # netlab's p2p pool


# -- GNS3 --------------------------------------------------------------------------

def test_gns3_nodes_links_and_filters():
    result = convert([DATA / "lab.gns3"])
    net = compile_text(result.text, "gns3.fleet")
    kinds = {n: g.kind for g, _, n in net.iter_nodes()}
    assert kinds == {"R1": "router", "R2": "router", "PC_1": "host", "web": "host"}
    assert list(net.switches) == ["Switch1"]
    link = ifaces(net, "R1")["FastEthernet0-0"]
    assert link.peer == "R2" and (link.props.delay_us, link.props.jitter_us, link.props.loss_pct) == (20000, 2000, 1.0)
    assert "eth1" in ifaces(net, "R2") and ifaces(net, "web")["eth0"].peer == "R2"
    notes = " | ".join(n.render() for n in result.warnings)
    assert "node NAT1: type nat has no equivalent" in notes
    assert "filter bpf" in notes and "node PC 1 is named PC_1" in notes
    assert re.search(r"lab.gns3:\d+:\d+: warning: node R1: dynamips router", notes)


# -- bad input --------------------------------------------------------------------

BAD = [
    ("lab.clab.yml", "name: x\ntopology:\n  nodes:\n    a: {kind: linux\n", r"bad.clab.yml:5:1: error: invalid YAML"),
    ("lab.clab.yml", "name: x\ntopology:\n  nodes:\n    a: {kind: linux}\n    a: {kind: linux}\n",
     r"bad.clab.yml:5:5: error: duplicate key 'a' \(first at .*:4:5\)"),
    ("lab.clab.yml", "name: x\ntopology:\n  nodes:\n    a: {kind: linux}\n  links:\n"
                     "    - endpoints: [\"a:eth1\", \"ghost:eth1\"]\n",
     r"bad.clab.yml:6:29: error: link endpoint ghost:eth1 refers to node 'ghost', which is not in topology.nodes"),
    ("lab.clab.yml", "name: x\ntopology:\n  nodes:\n    a: {kind: linux}\n  links:\n    - endpoints: [\"a:eth1\"]\n",
     r"bad.clab.yml:6:7: error: a link's 'endpoints' must list two ends"),
    ("x.graphml", '<?xml version="1.0"?>\n<graphml xmlns="http://graphml.graphdrawing.org/xmlns">\n'
                  '<graph edgedefault="undirected">\n<node id="a"/>\n<edge source="a" target="b"/>\n</graph>\n'
                  '</graphml>\n', r"bad.graphml:5:1: error: an edge refers to node 'b', which is not declared"),
    ("x.graphml", '<?xml version="1.0"?>\n<graphml xmlns="http://graphml.graphdrawing.org/xmlns">\n'
                  '<graph edgedefault="undirected">\n<node id="a">\n</graph>\n</graphml>\n',
     r"bad.graphml:5:3: error: invalid GraphML \(XML\): mismatched tag"),
    ("x.gml", "graph [\n  node [ id 0 ]\n  edge [ source 0 target 7 ]\n]\n",
     r"bad.gml:3:3: error: edge #0 refers to node 7 as its target, which is not declared"),
    ("x.gml", "graph [\n  node [ id 0 label \"a ]\n]\n", r"bad.gml:\d+:\d+: error: invalid GML: expected"),
    ("x.gns3", '{"topology": {"nodes": [], "links": []},\n "project_id": "p", "name": oops}\n',
     r"bad.gns3:2:29: error: invalid JSON: Expecting value"),
    ("x.gns3", '{"project_id": "p", "topology": {"nodes": [], "links": [\n'
               '  {"link_id": "L1", "nodes": [{"node_id": "n1"}, {"node_id": "n2"}]}]}}\n',
     r"bad.gns3:2:15: error: link L1 refers to node_id n1, which is not a node"),
    ("x.yml", "nodes: [r1, r2]\nlinks:\n- r1-r3\n",
     r"bad.yml:3:3: error: link refers to node 'r3', which is not in 'nodes'"),
    ("x.yml", "nodes: [r1]\nmodule: [bgp]\n", r"bad.yml:1:9: error: node r1 runs the bgp module but has no bgp.as"),
]


@pytest.mark.parametrize("kind,text,expect", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_input_names_file_line_and_column_and_writes_nothing(tmp_path, kind, text, expect):
    suffix = {"lab.clab.yml": ".clab.yml", "x.graphml": ".graphml", "x.gml": ".gml", "x.gns3": ".gns3",
              "x.yml": ".yml"}[kind]
    src = tmp_path / f"bad{suffix}"
    src.write_text(text)
    with pytest.raises(ImportFailed) as info:
        convert([src])
    assert re.search(expect, str(info.value)), str(info.value)
    # Through the compiler (net check, up, plan, draw): a CompileError quoting the line.
    with pytest.raises(CompileError) as cinfo:
        compile_file(src)
    assert re.search(expect, str(cinfo.value)), str(cinfo.value)
    # The import command writes nothing and fails.
    out = tmp_path / "out.fleet"
    r = CliRunner().invoke(root, ["import", str(src), "-o", str(out)])
    assert r.exit_code == 1 and "nothing written" in r.output and not out.exists()
    assert list(tmp_path.iterdir()) == [src]


# -- the command -----------------------------------------------------------------

def test_import_command_writes_a_readable_fleet_and_check_reads_the_original(tmp_path):
    out = tmp_path / "lab.fleet"
    r = CliRunner().invoke(root, ["import", str(DATA / "lab.clab.yml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"wrote {out} (clab: 2 switches, 0 vms, 2 hosts, 2 routers; " in r.output
    text = out.read_text()
    assert text.startswith("# Imported from containerlab") and "# Not carried over" in text
    assert compile_file(out).counts() == compile_file(DATA / "lab.clab.yml").counts()
    r = CliRunner().invoke(root, ["net", "check", str(DATA / "zoo-mini.graphml")])
    assert r.exit_code == 0 and "5 routers" in r.output, r.output
    r = CliRunner().invoke(root, ["import", str(DATA / "pair-a.clab.yml"), str(DATA / "pair-b.clab.yml"),
                                  "-o", "-", "--json"])
    assert r.exit_code == 0 and "link ra:eth2 -- rb:eth2" in r.output
    r = CliRunner().invoke(root, ["net", "export", "--format", "clab", str(DATA / "lab.clab.yml")])
    # stdout is the lab alone: what the import did not carry over goes to stderr.
    assert r.exit_code == 0 and yaml.safe_load(r.stdout)["topology"]["nodes"]["srl1"]["kind"] == "linux"
    assert "lab.clab.yml:17:5: warning: node srl1" in r.stderr


def test_plan_and_draw_read_foreign_files_directly_and_report_what_is_not_carried(tmp_path):
    """`megafleet plan` and `megafleet net draw` of a containerlab lab and of a
    GraphML map, as given (no import step, no root): the nodes the import makes,
    placed and drawn; what the lab has that is not carried over is printed with
    its file:line, as `megafleet import` reports it."""
    lab, zoo_map = DATA / "lab.clab.yml", DATA / "zoo-mini.graphml"
    r = CliRunner().invoke(root, ["plan", str(lab), "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["testbed"] == "labclab"
    assert sorted(plan["node_host"]) == ["client1", "client2", "frr1", "srl1"]
    assert [(h["host"], h["nodes"], h["namespaces"]) for h in plan["hosts"]] == [("local", 4, 4)]
    assert f"{lab}:17:5: warning: node srl1: kind nokia_srlinux (image ghcr.io/nokia/srlinux:23.10.1) becomes " \
           f"an FRR router; its vendor configuration (startup-config, binds) is not carried over" in r.stderr
    assert f"{lab}:54:7: warning: link client2:eth9 -- host:client2-eth9" in r.stderr
    r = CliRunner().invoke(root, ["plan", str(zoo_map), "--json"])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(r.stdout)["node_host"]) == ["Geneve", "New_York", "Paris", "Paris_2", "Zurich"]

    r = CliRunner().invoke(root, ["net", "draw", str(lab), "-o", str(tmp_path / "lab.dot")])
    assert r.exit_code == 0 and f"{lab}:17:5: warning: node srl1" in r.stderr, r.output
    dot = (tmp_path / "lab.dot").read_text()
    for node in ("srl1", "frr1", "client1", "client2", "mgmt", "br1"):
        assert f'label="{node}' in dot, node
    r = CliRunner().invoke(root, ["net", "draw", str(zoo_map), "-o", str(tmp_path / "zoo.dot")])
    assert r.exit_code == 0, r.output
    dot = (tmp_path / "zoo.dot").read_text()
    labels = set(re.findall(r'label="([^"\\]+)', dot))
    assert {"Zurich", "Geneve", "Paris", "Paris_2", "New_York"} <= labels
    # Six edges: the hyperedge's three to its switch, one single, two parallel drawn as one "×2".
    assert dot.count(" -- ") == 5 and dot.count(' -- "s:') == 3 and dot.count('[label="×2"]') == 1


FRR_LAB = """\
name: k
topology:
  nodes:
    r1:
      kind: frr
      startup-config: r1.conf
    h1:
      kind: linux
  links:
    - endpoints: ["r1:eth1", "h1:eth1"]
"""


def test_clab_kind_frr_becomes_an_frr_router_with_a_warning(tmp_path):
    """A node of the literal kind `frr`: a router (with the lab's routing, FRR's
    daemons), and a warning with its line that its configuration is not carried."""
    lab = tmp_path / "k.clab.yml"
    lab.write_text(FRR_LAB)
    net = compile_file(lab)
    assert {n: g.kind for g, _, n in net.iter_nodes()} == {"r1": "router", "h1": "host"}
    assert net.import_warnings == [
        f"{lab}:4:5: warning: node r1: kind frr becomes an FRR router; its vendor configuration "
        f"(startup-config, binds) is not carried over",
        f"{lab}:6:7: warning: node r1: not carried over: startup-config"]
    ospf = compile_text(convert([lab], opts=ImportOptions(routing="ospf")).text, "k.fleet")
    daemons = live.plan(ospf, "kfrr").frr["r1"]
    assert sorted(daemons) == ["ospfd", "zebra"]
    assert re.search(r"^interface eth1$", daemons["ospfd"], re.M), daemons["ospfd"]
    r = CliRunner().invoke(root, ["net", "check", str(lab)])
    assert r.exit_code == 0 and f"{lab}:4:5: warning: node r1: kind frr becomes an FRR router" in r.stderr


def test_clab_linux_nodes_as_container_guests():
    result = convert([DATA / "lab.clab.yml"], opts=ImportOptions(linux="container", image="/images/tiny.toml"))
    net = compile_text(result.text + "reachable client1 client2\n", "c.fleet")
    assert net.counts() == {"switch": 3, "vm": 2, "host": 0, "router": 2}
    assert net.groups[net.index["client1"][0]].props["driver"] == "container"
    assert net.images["linux"][0] == "/images/tiny.toml"
    # A guest names its NICs in order: client1's eth1 stays eth1, behind a switch of its own.
    assert [(e, i.switch) for e, i, _ in net.node("client1").ifaces] == [("eth0", "mgmt"), ("eth1", "frr1_client1")]
    assert ifaces(net, "frr1")["eth2"].switch == "frr1_client1"
    assert not any("client1:eth1 is eth" in n.message for n in result.warnings)


def test_link_speeds_from_zoo_attributes():
    from megafleet.netlang.importers.graphml import link_rate_bit
    assert link_rate_bit({"LinkSpeedRaw": 2.5e9}) == 2_500_000_000
    assert link_rate_bit({"LinkSpeed": "155", "LinkSpeedUnits": "M"}) == 155_000_000
    assert link_rate_bit({"LinkType": "OC-192", "LinkLabel": "OC-192c"}) == 9_953_280_000
    assert link_rate_bit({"LinkLabel": "dark fibre"}) is None


def test_graphml_hyperedge_elements_and_directed_graphs(tmp_path):
    """GraphML `<hyperedge>` elements (which networkx cannot read) become switches;
    a directed networkx graph gives one link per pair of opposite edges."""
    (tmp_path / "h.graphml").write_text(
        '<?xml version="1.0"?>\n<graphml xmlns="http://graphml.graphdrawing.org/xmlns">\n'
        '<graph edgedefault="undirected">\n<node id="a"/>\n<node id="b"/>\n<node id="c"/>\n'
        '<hyperedge id="bus">\n  <endpoint node="a"/>\n  <endpoint node="b"/>\n  <endpoint node="c"/>\n'
        '</hyperedge>\n<edge source="a" target="b"/>\n</graph>\n</graphml>\n')
    net = compile_file(tmp_path / "h.graphml")
    assert list(net.switches) == ["bus"]
    assert all(any(i.switch == "bus" for i in ifaces(net, n).values()) for n in ("a", "b", "c"))
    assert [i.peer for i in ifaces(net, "a").values() if i.peer] == ["b"]
    g = nx.DiGraph([("r1", "r2"), ("r2", "r1"), ("r2", "r3")])
    nx.write_graphml(g, tmp_path / "d.graphml")
    result = convert([tmp_path / "d.graphml"])
    assert result.text.count("\nlink ") == 2 and any("directed graph" in n.message for n in result.warnings)
    # A hyperedge naming a node that does not exist is named, with its line.
    (tmp_path / "bad.graphml").write_text((tmp_path / "h.graphml").read_text().replace('node="c"/>\n</hyper',
                                                                                      'node="zz"/>\n</hyper'))
    with pytest.raises(ImportFailed, match=r"bad.graphml:7:1: error: hyperedge bus refers to node 'zz'"):
        convert([tmp_path / "bad.graphml"])
