"""Static routes of trees of routers (megafleet.netlang.treeroutes): default
routes toward the core, merged prefixes, and the shortest-path rule where a
tree does not apply. Pure logic: compiled descriptions, packets walked through
the route tables on paper."""

from __future__ import annotations

import ipaddress
from collections import deque

import pytest

from megafleet.netlang import treeroutes
from megafleet.netlang.compiler import compile_text
from megafleet.netlang.ipam import Subnet, parse_subnet
from megafleet.netlang.treeroutes import merge_prefixes


def sub(text: str) -> Subnet:
    s = parse_subnet(text)
    assert isinstance(s, Subnet), s
    return s


def fabric(pods: int, racks_per_pod: int) -> str:
    """A spine of pod routers, each pod a switch of rack routers, one host per rack."""
    lines = ["pool racks 10.0.0.0/8 per /24", "pool pods 100.64.0.0/10 per /26",
             "switch spine subnet 100.63.0.0/16"]
    for p in range(1, pods + 1):
        lines += [f"switch pod{p} subnet pods", f"router p{p} {{ iface spine auto; iface pod{p} auto }}"]
    for r in range(1, pods * racks_per_pod + 1):
        p = (r - 1) // racks_per_pod + 1
        lines += [f"switch rack{r}", f"router r{r} {{ iface pod{p} auto; iface rack{r} auto }}",
                  f"host h{r} on rack{r}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# merge_prefixes
# ---------------------------------------------------------------------------

def test_merge_joins_halves_repeatedly_and_keeps_the_rest():
    got = merge_prefixes([sub(f"10.0.{i}.0/24") for i in (3, 0, 2, 1, 5)])
    assert [str(s) for s in got] == ["10.0.0.0/22", "10.0.5.0/24"]


def test_merge_drops_duplicates_and_prefixes_inside_others():
    got = merge_prefixes([sub("10.0.0.0/16"), sub("10.0.4.0/24"), sub("10.0.4.0/24"), sub("10.1.0.0/16")])
    assert [str(s) for s in got] == ["10.0.0.0/15"]


def test_merge_never_joins_neighbours_that_are_not_halves_of_one_prefix():
    # 10.0.1.0/24 + 10.0.2.0/24 are adjacent, but no /23 is exactly their union.
    got = merge_prefixes([sub("10.0.1.0/24"), sub("10.0.2.0/24")])
    assert [str(s) for s in got] == ["10.0.1.0/24", "10.0.2.0/24"]


def test_merge_covers_exactly_the_same_addresses():
    import random
    rng = random.Random(7)
    subs = [sub(f"10.{rng.randrange(4)}.{rng.randrange(256)}.0/24") for _ in range(300)]
    want = ipaddress.collapse_addresses(ipaddress.ip_network(str(s)) for s in subs)
    assert [str(s) for s in merge_prefixes(subs)] == [str(n) for n in want]


def test_merge_ipv6_and_errors():
    assert [str(s) for s in merge_prefixes([sub("fd00:0:0:1::/64"), sub("fd00::/64")])] == ["fd00::/63"]
    assert merge_prefixes([]) == []
    with pytest.raises(ValueError, match="more than one address family"):
        merge_prefixes([sub("10.0.0.0/24"), sub("fd00::/64")])


# ---------------------------------------------------------------------------
# Trees: defaults toward the core, siblings direct, prefixes merged
# ---------------------------------------------------------------------------

def walk(net, routes: dict, start: str, dest: int, limit: int = 64) -> tuple[str | None, int]:
    """Forward a packet for `dest` from router `start` by longest prefix match
    through `routes` ({router: [(Subnet, via)]}): (the router that delivers it
    on an attached network, or None when a router has no route; hops)."""
    owner = {a[4]: r for d in net.domains for r, a in d.routers if 4 in a}
    attached: dict[str, list[Subnet]] = {}
    for d in net.domains:
        for r, a in d.routers:
            if 4 in a:
                attached.setdefault(r, []).append(d.subnets[4])
    r, hops = start, 0
    while hops < limit:
        if any(s.contains(dest) for s in attached[r]):
            return r, hops
        match = [(s.plen, via) for s, via in routes.get(r, []) if s.family == 4 and s.contains(dest)]
        if not match:
            return None, hops
        r, hops = owner[max(match)[1]], hops + 1
    raise AssertionError(f"routing loop from {start} to {dest}")


def shortest_hops(net, start: str, dest: int) -> int:
    """Routers crossed on a shortest path, breadth-first over the networks."""
    doms: dict[str, list] = {}
    for d in net.domains:
        for r, _ in d.routers:
            doms.setdefault(r, []).append(d)
    seen, queue = {start}, deque([(start, 0)])
    while queue:
        r, n = queue.popleft()
        if any(d.subnets[4].contains(dest) for d in doms[r]):
            return n
        for d in doms[r]:
            for t, _ in d.routers:
                if t not in seen:
                    seen.add(t)
                    queue.append((t, n + 1))
    raise AssertionError("unreachable")


@pytest.mark.parametrize("aggregate_above", [0, 10_000])
def test_every_router_reaches_every_network_on_a_shortest_path(aggregate_above):
    net = compile_text(fabric(4, 4))
    routes = treeroutes.static_routes(net, aggregate_above=aggregate_above)
    for r in net.routers():
        for d in net.domains:
            dest = d.subnets[4].first_host()
            got, hops = walk(net, routes, r, dest)
            assert got is not None, (r, d.name)
            assert hops == shortest_hops(net, r, dest), (r, d.name)
        # Outside the testbed: refused at the core, never a loop.
        assert walk(net, routes, r, int(ipaddress.ip_address("192.0.2.1")))[0] is None


def test_rack_routers_default_to_their_pod_and_reach_siblings_directly():
    net = compile_text(fabric(4, 4))
    routes = treeroutes.static_routes(net, aggregate_above=0)
    p1_on_pod1 = dict(net.node("p1").ifaces[1][2])[4].split("/")[0]
    r1 = [(str(s), ipaddress.ip_address(v).compressed) for s, v in routes["r1"]]
    assert r1[0] == ("0.0.0.0/0", p1_on_pod1)
    # One route per sibling rack (r2..r4), via that sibling; nothing about other pods.
    assert len(r1) == 4
    rack_subnets = {str(net.node(f"r{i}").ifaces[1][1].domain.subnets[4]) for i in (2, 3, 4)}
    assert {d for d, _ in r1[1:]} == rack_subnets
    # The spine's routers (the core) have no default; each other pod is one
    # merged prefix for its racks plus its pod network.
    p1 = [str(s) for s, _ in routes["p1"]]
    assert "0.0.0.0/0" not in p1
    assert len(p1) == 3 * 2 + 4


def test_small_networks_keep_one_route_per_subnet():
    net = compile_text(fabric(2, 4))
    assert len(net.domains) <= treeroutes.AGGREGATE_ABOVE
    p1 = dict((str(s), v) for s, v in net.static_routes["p1"])
    assert len(p1) == 4 + 4 + 1          # own racks, p2's racks and pod network
    assert all(s.endswith("/24") or s.endswith("/26") for s in p1)


def test_routes_grow_with_the_network_not_its_square():
    """A rack router: a default and its pod's other racks; a pod router: its
    racks and two prefixes per other pod. Every router to every subnet would be
    routers x subnets (144 x 145 here)."""
    pods, per = 16, 8
    net = compile_text(fabric(pods, per))
    routes = treeroutes.static_routes(net, aggregate_above=0)
    assert {len(routes[f"r{r}"]) for r in range(1, pods * per + 1)} == {1 + (per - 1)}
    assert {len(routes[f"p{p}"]) for p in range(1, pods + 1)} == {per + 2 * (pods - 1)}


def test_a_ring_keeps_the_shortest_path_rule_without_defaults():
    net = compile_text("pool p 10.0.0.0/16\nswitch lan[1..4]\nrouter a on lan1 on lan2\n"
                       "router b on lan2 on lan3\nrouter c on lan3 on lan4\nrouter d on lan4 on lan1\n")
    routes = treeroutes.static_routes(net, aggregate_above=0)
    for r in "abcd":
        dests = [s for s, _ in routes[r]]
        assert all(s.plen > 0 for s in dests)
        assert len(dests) == 2               # the two networks it is not on
        for d in net.domains:
            dest = d.subnets[4].first_host()
            assert walk(net, routes, r, dest)[1] == shortest_hops(net, r, dest)


def test_a_users_default_route_wins_over_the_generated_one():
    text = fabric(2, 2).replace("router r1 { iface pod1 auto; iface rack1 auto }",
                                "router r1 route default via 192.0.2.1 { iface pod1 auto; iface rack1 auto }")
    net = compile_text(text)
    mine = net.static_routes["r1"]
    assert all(s.plen > 0 for s, _ in mine)          # none generated
    # Every other network explicitly, as the shortest-path rule gives it.
    assert len(mine) == len(net.domains) - 2
    assert net.node("r1").routes[-1] == ("0.0.0.0/0", "192.0.2.1")
    # The others still get theirs.
    assert net.static_routes["r3"][0][0].plen == 0


def test_ipv6_trees_get_an_ipv6_default():
    net = compile_text("pool p 10.0.0.0/16\npool q fd00::/48\nswitch core\nswitch lan[1..2]\n"
                       "router a on core on lan1\nrouter b on core on lan2\nswitch leaf\nrouter c on lan2 on leaf\n")
    routes = treeroutes.static_routes(net, aggregate_above=0)
    c = [(s.family, s.plen) for s, _ in routes["c"]]
    assert (4, 0) in c and (6, 0) in c
    assert not any(s.plen == 0 for s, _ in routes["a"])
