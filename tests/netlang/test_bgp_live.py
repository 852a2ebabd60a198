"""BGP over IPv6 on the wire (root; issue 13 item 4: a `reachable` that holds on
paper must hold on the wire).

Three `bgp` routers in a chain of point-to-point links (three ASes, so the
middle one is transit), a host LAN behind each end router, once with IPv6 only
and once dual-stack. Each description passes `net check` with its assertions
holding; then `megafleet up` builds it (namespaces, FRR) and its verify phase
pings every assertion from inside the nodes, every address family the
destination has, until BGP has converged; `megafleet verify` says so again;
pings of the test's own, both ways and in each family, and the routes in the
routers' kernel tables (learned by BGP, across the transit AS) confirm it.
`megafleet down` must leave no namespace, link or ledger record behind.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from megafleet import proc
from megafleet.experiment import verify
from megafleet.ledger import Ledger
from megafleet.netlang import live
from megafleet.netlang.compiler import compile_file
from tests.up.conftest import megafleet, megafleet_json

from .test_live import clean, leftovers

pytestmark = pytest.mark.root

CHAIN_V6 = """\
pool six fd7b::/48
switch lan1
switch lan3
router r1 on lan1 bgp 65001
router r2 bgp 65002
router r3 on lan3 bgp 65003
link r1 -- r2
link r2 -- r3
host h1 on lan1
host h3 on lan3
reachable h1 h3
reachable h3 h1
"""
CHAIN_DUAL = "pool four 10.123.0.0/16\n" + CHAIN_V6


@pytest.fixture(autouse=True)
def _root(root_only):
    pass


@pytest.fixture
def testbed():
    """Names of testbeds the test brings up with `megafleet up`; each is taken
    down afterwards, and nothing of it may be left."""
    names: list[str] = []
    yield names.append
    for name in names:
        megafleet("down", name, check=False)
        assert leftovers(name) == clean(name)
        # `up` records its own things too (deployment, telemetry, experiment state).
        assert [(r.owner, r.key) for r in Ledger().list()
                if r.key == name or r.key.startswith(name + "/")] == []


def ping_within(ns: str, addr: str, family: int, seconds: float) -> bool:
    """Whether `addr` answers a ping from inside namespace `ns` within `seconds`."""
    argv = ["ip", "netns", "exec", ns, "ping", f"-{family}", "-n", "-q", "-c1", "-W1", addr]
    deadline = time.monotonic() + seconds
    while proc.run(argv, check=False).returncode != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def lan_subnet(net, node: str, family: int) -> str:
    """The subnet of `node`'s first interface in `family` (its host LAN)."""
    addr = next(a[family] for _, _, a in net.node(node).ifaces if family in a)
    return str(ipaddress.ip_interface(addr).network)


@pytest.mark.parametrize("name, text, families", [
    ("mfb6o", CHAIN_V6, (6,)),
    ("mfb6d", CHAIN_DUAL, (4, 6)),
], ids=["ipv6-only", "dual-stack"])
def test_bgp_chain_reaches_end_to_end_in_every_family(testbed, tmp_path: Path, name: str, text: str,
                                                      families: tuple[int, ...]):
    fleet = tmp_path / f"{name}.fleet"
    fleet.write_text(text)
    # On paper: the assertions hold, and verify will ping each family the hosts have.
    r = megafleet("net", "check", str(fleet))
    assert "2 reachability assertions hold" in r.stdout, r.stdout
    net = compile_file(str(fleet))
    assert sorted({c.family for c in verify.checks(net)}) == list(families)

    # On the wire: `up` builds it and verifies every assertion live (waiting for BGP).
    testbed(name)
    summary = megafleet_json("up", str(fleet), "-N", name, "--no-ksm", check=False, timeout=600)
    v = summary["verify"]
    assert v["ok"] and v["failed"] == [], v
    assert v["checks"] == 2 * len(families)       # h1 -> h3 and h3 -> h1, per family
    assert summary["ok"], summary
    again = megafleet_json("verify", name, "--within", "30")
    assert again["ok"] and again["passed"] == 2 * len(families), again

    # Pings of our own from inside the hosts' namespaces, both ways, every family.
    netns = live.plan(net, name).netns
    for src, dst in (("h1", "h3"), ("h3", "h1")):
        for family, addr in sorted(verify.first_addresses(net, dst).items()):
            assert ping_within(netns[src], addr, family, 60), f"{src} -> {dst} ({addr}) over IPv{family}"
    # The far LAN came to r1 by BGP through the transit AS (r2), in each family.
    for family in families:
        routes = proc.run(["ip", f"-{family}", "-n", netns["r1"], "route", "show",
                           lan_subnet(net, "h3", family)]).stdout
        assert "proto bgp" in routes, (family, routes)
