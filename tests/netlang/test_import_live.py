"""Imported testbeds brought up live (root): each format's test input, and the
GÉANT 2012 map with OSPF and a host LAN per PoP. The `reachable` assertions of
each are checked by pinging from inside the namespaces; every test asserts that
teardown leaves no namespace, link or ledger record with its prefix."""

from __future__ import annotations

import re
import time
from pathlib import Path

import networkx as nx
import pytest
from click.testing import CliRunner

from megafleet import proc
from megafleet.cli import root
from megafleet.netlang import live
from megafleet.netlang.compiler import compile_text
from megafleet.netlang.importers import ImportOptions, convert

from .test_live import clean, leftovers, ping

pytestmark = pytest.mark.root
REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "importdata"
ZOO = REPO.parent / "shared" / "testdata" / "topologyzoo"


@pytest.fixture(autouse=True)
def _root(root_only):
    pass


@pytest.fixture
def testbed():
    names = []

    def use(name: str) -> str:
        names.append(name)
        return name

    yield use
    for name in names:
        live.down(name)
        assert leftovers(name) == clean(name)


def data_address(net, node: str) -> str:
    """The node's first IPv4 address off the management network."""
    return next(a[4].split("/")[0] for _, i, a in net.node(node).ifaces if 4 in a and i.switch != "mgmt")


def assert_reachable_live(net, name: str, seconds: float) -> dict[tuple[str, str], float]:
    """Ping every pair of every `reachable` assertion from inside the source's
    namespace (retrying while routing converges); the seconds each took."""
    netns = live.plan(net, name).netns
    took = {}
    t0 = time.monotonic()
    for a, b, loc in net.reachable:
        for x, y in ((a, b), (b, a)):
            addr = data_address(net, y)
            while ping(netns[x], addr, timeout=1).returncode != 0:
                assert time.monotonic() - t0 < seconds, f"{loc}: reachable {x} {y} does not hold live ({addr})"
                time.sleep(0.5)
            took[(x, y)] = time.monotonic() - t0
    return took


def imported(paths: list[Path], assertion: str, opts: ImportOptions | None = None, name: str = "t"):
    result = convert(paths, opts=opts)
    return compile_text(result.text + assertion + "\n", f"{name}.fleet")


def test_clab_lab_comes_up_and_its_assertions_hold(testbed):
    name = testbed("mfnic")
    net = imported([DATA / "lab.clab.yml"], "reachable client1 client2", name=name)
    live.up(net, name)
    assert_reachable_live(net, name, 30)
    netns = live.plan(net, name).netns
    # Interface names as in the lab; the management network answers at mgmt-ipv4.
    out = proc.run(["ip", "-n", netns["srl1"], "-br", "link"]).stdout
    assert {line.split()[0].split("@")[0] for line in out.splitlines()} == {"lo", "eth0", "e1-1", "ethernet-1-2"}
    assert ping(netns["client2"], "172.31.10.21").returncode == 0
    # client1's exec command ran in its namespace.
    assert "192.0.2.21/32" in proc.run(["ip", "-n", netns["client1"], "-o", "addr", "show", "dev", "lo"]).stdout


def test_clab_multi_host_pair_comes_up_as_one_testbed(testbed):
    name = testbed("mfnip")
    net = imported([DATA / "pair-a.clab.yml", DATA / "pair-b.clab.yml"], "reachable ha hb", name=name)
    live.up(net, name)
    assert_reachable_live(net, name, 30)


def test_graphml_zoo_map_with_hyperedge_comes_up_with_ospf(testbed):
    name = testbed("mfniz")
    net = imported([DATA / "zoo-mini.graphml"], "reachable Zurich_h1 New_York_h1\nreachable Paris_2_h1 Geneve_h1",
                   ImportOptions(hosts_per_router=1), name=name)
    live.up(net, name)
    assert_reachable_live(net, name, 90)


def test_gml_map_comes_up_with_static_routes(testbed):
    name = testbed("mfnim")
    net = imported([DATA / "mini.gml"], "reachable Amsterdam_h1 Dublin_h1",
                   ImportOptions(hosts_per_router=1, routing="static"), name=name)
    live.up(net, name)
    assert_reachable_live(net, name, 30)


def test_netlab_topology_comes_up_with_ospf_and_bgp(testbed):
    name = testbed("mfnin")
    net = imported([DATA / "netlab-topology.yml"], "reachable h1 h2", name=name)
    live.up(net, name)
    assert_reachable_live(net, name, 90)


def test_gns3_project_comes_up_through_net_up(testbed):
    """`megafleet net up` reads the .gns3 file itself (the compiler's import hook)."""
    name = testbed("mfnis")
    r = CliRunner().invoke(root, ["net", "up", str(DATA / "lab.gns3"), "-N", name])
    assert r.exit_code == 0, r.output
    net = imported([DATA / "lab.gns3"], "reachable PC_1 web", name=name)
    assert_reachable_live(net, name, 30)
    r = CliRunner().invoke(root, ["net", "down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)


@pytest.mark.slow
def test_geant_comes_up_with_ospf_and_its_far_ends_reach_each_other(testbed):
    path = ZOO / "Geant2012.graphml"
    if not path.exists():
        pytest.skip(f"Topology Zoo test data not found at {path} (../shared/testdata beside the repo)")
    name = testbed("mfnge")
    g = nx.read_graphml(path)
    # The two PoPs farthest apart in hops.
    lengths = dict(nx.all_pairs_shortest_path_length(g))
    a, b = max(((x, y) for x in lengths for y in lengths[x]), key=lambda p: lengths[p[0]][p[1]])
    result = convert([path], opts=ImportOptions(hosts_per_router=1))
    names = {}
    for line in result.text.splitlines():
        if line.startswith("router ") and "(node " in line:
            names[line.split("(node ")[1].split(",")[0]] = line.split()[1]
    net = compile_text(result.text + f"reachable {names[a]}_h1 {names[b]}_h1\n", f"{name}.fleet")
    assert net.counts()["router"] == 40 and net.counts()["host"] == 40
    live.up(net, name)
    # 40 FRR routers on a shared 2-CPU host: generous, convergence is not what is timed here.
    assert_reachable_live(net, name, 240)


def test_megafleet_up_of_an_imported_multi_host_pair_verifies_its_assertions(tmp_path):
    """The two halves of a containerlab multi-host lab, imported together, come up
    as one testbed through `megafleet up`, whose verify phase pings the
    `reachable` assertion live."""
    name = "mfuip"
    fleet = tmp_path / "pair.fleet"
    r = CliRunner().invoke(root, ["import", str(DATA / "pair-a.clab.yml"), str(DATA / "pair-b.clab.yml"),
                                  "-o", str(fleet)])
    assert r.exit_code == 0, r.output
    fleet.write_text(fleet.read_text() + "reachable ha hb  # added by the test\n")
    try:
        r = CliRunner().invoke(root, ["up", str(fleet), "-N", name])
        assert r.exit_code == 0, r.output
        assert re.search(r"^verify: \d+ reachability checks pass", r.output, re.M), r.output
        net = compile_text(fleet.read_text(), str(fleet))
        assert ping(live.plan(net, name).netns["ha"], data_address(net, "hb")).returncode == 0
    finally:
        r = CliRunner().invoke(root, ["down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)


CONTAINER_LAB = """\
name: cont
topology:
  nodes:
    mfuilr: {kind: linux, image: "frrouting/frr:v8.4.1"}
    mfuilc1: {kind: linux, image: alpine}
    mfuilc2: {kind: linux, image: alpine}
  links:
    - endpoints: ["mfuilc1:eth1", "mfuilr:eth1"]
    - endpoints: ["mfuilc2:eth1", "mfuilr:eth2"]
"""


def test_clab_linux_nodes_as_container_guests_through_megafleet_up(tmp_path):
    """`--linux container`: kind linux nodes become container guests (each joined
    to its peer through a switch of its own); `megafleet up` boots them and its
    verify phase pings the assertion live."""
    from megafleet.vm.engine import Engine

    name = "mfuil"
    (tmp_path / "cont.clab.yml").write_text(CONTAINER_LAB)
    fleet = tmp_path / "cont.fleet"
    r = CliRunner().invoke(root, ["import", str(tmp_path / "cont.clab.yml"), "--linux", "container",
                                  "--image", str(REPO / "examples" / "images" / "tiny.toml"), "-o", str(fleet)])
    assert r.exit_code == 0, r.output
    assert "vm mfuilc1 image linux driver container" in fleet.read_text()
    fleet.write_text(fleet.read_text() + "reachable mfuilc1 mfuilc2\n")
    try:
        r = CliRunner().invoke(root, ["up", str(fleet), "-N", name])
        assert r.exit_code == 0, r.output
        assert "2/2 guests ready" in r.output, r.output
        assert re.search(r"^verify: \d+ reachability checks pass", r.output, re.M), r.output
    finally:
        r = CliRunner().invoke(root, ["down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)
    assert Engine().list("mfuilc*") == []
