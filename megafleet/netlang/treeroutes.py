"""Static routes that grow with the network, not with its square.

The simple rule (every static router gets a route to every subnet it is not
on) costs routers x subnets routes: 4,620 routers and 4,621 subnets in a
million-guest fabric of 4,480 racks, 21 million routes, gigabytes in the
controller. Most real fabrics are trees of routers and networks (racks under
pods under a spine), and in a tree a router needs far less:

- the networks below it, one route per router under it (the prefixes of that
  router's whole subtree, merged when the network is large);
- the networks below the other routers of its upstream network (its
  siblings), one route per sibling, for the same reason: a packet to a
  sibling's rack goes straight to the sibling, not up and back down;
- a default route via the router above it (its upstream network's own
  upstream router), for everything else.

Routers on the root network (the network with most routers: the spine) have
no default route: they know every prefix of the tree, so a packet to an
address outside the testbed stops there instead of looping. Forwarding inside
the testbed is exactly that of the shortest-path rule (in a tree the path is
unique); only packets to addresses outside it differ: they go up to the root
before being refused.

A component (per address family) that is not a tree (a ring, a mesh, two
routers joining the same two networks) keeps the shortest-path rule, one
route per subnet, computed per router (`shortest_path_routes`). So does a
router given its own `route default`, whose default must stay the user's.

Networks of at most AGGREGATE_ABOVE subnets keep one route per subnet (the
table a reader of the description expects); above that, each next hop's
prefixes are merged exactly (`merge_prefixes`: the same addresses, fewer
routes, e.g. the 32 /24 racks of a pod into one /19).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from megafleet.netlang.ipam import BITS, Subnet
from megafleet.netlang.model import Domain, Net

# Components with more subnets than this get merged prefixes.
AGGREGATE_ABOVE = 256

Route = tuple[Subnet, int]          # (destination, next hop address)


def merge_prefixes(subnets: list[Subnet]) -> list[Subnet]:
    """The fewest prefixes covering exactly the addresses of `subnets` (one
    family), sorted by address. Duplicates and prefixes inside others go;
    two halves of one prefix become that prefix, repeatedly (10.0.0.0/24 and
    10.0.1.0/24 -> 10.0.0.0/23). Raises ValueError on mixed families."""
    if not subnets:
        return []
    family = subnets[0].family
    if any(s.family != family for s in subnets):
        raise ValueError("merge_prefixes: subnets of more than one address family")
    bits = BITS[family]
    out: list[Subnet] = []
    for s in sorted(subnets, key=lambda s: (s.net, s.plen)):
        if out and out[-1].contains(s.net):
            continue            # inside the previous prefix (sorted: it cannot reach beyond it)
        out.append(s)
        # Join halves while the last two are the two halves of one prefix.
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            if a.plen != b.plen or a.plen == 0:
                break
            size = 1 << (bits - a.plen)
            if a.net % (2 * size) != 0 or b.net != a.net + size:
                break
            out[-2:] = [Subnet(family, a.net, a.plen - 1)]
    return out


def _merged(routes: list[Route], aggregate: bool) -> list[Route]:
    """`routes`, with each next hop's destinations merged when `aggregate`;
    order: by first appearance of the next hop."""
    if not aggregate:
        return routes
    by_via: dict[int, list[Subnet]] = {}
    for dest, via in routes:
        by_via.setdefault(via, []).append(dest)
    return [(d, via) for via, dests in by_via.items() for d in merge_prefixes(dests)]


@dataclass
class _Component:
    """One connected part of the graph of routers and networks, in one family:
    edges are a router's addresses of that family on a network."""

    routers: list[str] = field(default_factory=list)
    domains: list[Domain] = field(default_factory=list)
    edges: int = 0

    def is_tree(self) -> bool:
        return self.edges == len(self.routers) + len(self.domains) - 1


def _family_graph(net: Net, fam: int) -> tuple[dict[str, list[tuple[Domain, int]]], dict[int, list[tuple[str, int]]]]:
    """(router -> [(network, its address there)], network id -> [(router, address)]),
    for the routers' addresses of family `fam`, in declaration order."""
    by_router: dict[str, list[tuple[Domain, int]]] = {}
    by_domain: dict[int, list[tuple[str, int]]] = {}
    for dom in net.domains:
        if fam not in dom.subnets:
            continue
        for name, addrs in dom.routers:
            if fam in addrs:
                by_router.setdefault(name, []).append((dom, addrs[fam]))
                by_domain.setdefault(dom.id, []).append((name, addrs[fam]))
    return by_router, by_domain


def _components(by_router: dict[str, list[tuple[Domain, int]]],
                by_domain: dict[int, list[tuple[str, int]]]) -> list[_Component]:
    seen_r: set[str] = set()
    seen_d: set[int] = set()
    out = []
    for start in by_router:
        if start in seen_r:
            continue
        comp = _Component()
        seen_r.add(start)
        queue: deque[str] = deque([start])
        while queue:
            r = queue.popleft()
            comp.routers.append(r)
            for dom, _ in by_router[r]:
                comp.edges += 1
                if dom.id in seen_d:
                    continue
                seen_d.add(dom.id)
                comp.domains.append(dom)
                for t, _ in by_domain[dom.id]:
                    if t not in seen_r:
                        seen_r.add(t)
                        queue.append(t)
        out.append(comp)
    return out


def _center(comp: _Component, by_router: dict[str, list[tuple[Domain, int]]],
            by_domain: dict[int, list[tuple[str, int]]]) -> Domain:
    """The root network of a tree: its center (peel leaves until one or two
    nodes are left; the spine of a fabric, the middle of a chain), so paths up
    to it are short. A router in the center gives its network with most
    routers (the first on ties)."""
    # Nodes: routers by name (str), networks by id (int).
    degree: dict[str | int, int] = {r: len(by_router[r]) for r in comp.routers}
    degree.update({d.id: len(by_domain[d.id]) for d in comp.domains})
    doms = {d.id: d for d in comp.domains}
    left = len(degree)
    leaves = [n for n, k in degree.items() if k <= 1]
    while left > 2:
        left -= len(leaves)
        nxt: list[str | int] = []
        for n in leaves:
            near: list[str | int] = ([t for t, _ in by_domain[n]] if isinstance(n, int)
                                     else [d.id for d, _ in by_router[n]])
            for m in near:
                degree[m] -= 1
                if degree[m] == 1:
                    nxt.append(m)
        leaves = nxt
    last = next((n for n in leaves if isinstance(n, int)), leaves[0])
    if isinstance(last, int):
        return doms[last]
    mine = [d for d, _ in by_router[last]]
    return max(mine, key=lambda d: (len(by_domain[d.id]), -d.id))


def tree_routes(comp: _Component, by_router: dict[str, list[tuple[Domain, int]]],
                by_domain: dict[int, list[tuple[str, int]]], fam: int,
                aggregate: bool) -> tuple[dict[str, list[Route]], dict[str, bool]]:
    """Routes of every router of a tree component: ({router: routes}, {router:
    whether its routes include a default route}). See the module's docstring."""
    root = _center(comp, by_router, by_domain)
    # Walk down from the root: each router's upstream network, each network's
    # upstream router (None for the root network).
    up_dom: dict[str, Domain] = {}
    up_router: dict[int, tuple[str, int] | None] = {root.id: None}
    order: list[str] = []                       # routers, parents before children
    queue: deque[Domain] = deque([root])
    while queue:
        dom = queue.popleft()
        parent = up_router[dom.id]
        for r, _ in by_domain[dom.id]:
            if parent is not None and r == parent[0]:
                continue
            up_dom[r] = dom
            order.append(r)
            for d, addr in by_router[r]:
                if d.id != dom.id:
                    up_router[d.id] = (r, addr)
                    queue.append(d)

    def children(r: str) -> list[tuple[Domain, list[tuple[str, int]]]]:
        """r's downstream networks, each with its routers other than r."""
        return [(d, [(t, a) for t, a in by_domain[d.id] if t != r])
                for d, _ in by_router[r] if d.id != up_dom[r].id]

    # Each router's subtree: the subnets of its downstream networks and of
    # everything below them; leaves first.
    below: dict[str, list[Subnet]] = {}
    for r in reversed(order):
        subs: list[Subnet] = []
        for d, others in children(r):
            subs.append(d.subnets[fam])
            for t, _ in others:
                subs.extend(below[t])
        below[r] = merge_prefixes(subs) if aggregate else subs

    routes: dict[str, list[Route]] = {}
    has_default: dict[str, bool] = {}
    for r in order:
        out: list[Route] = []
        dom = up_dom[r]
        parent = up_router[dom.id]
        if parent is not None:
            out.append((Subnet(fam, 0, 0), parent[1]))
        for s, addr in by_domain[dom.id]:
            if s != r and (parent is None or s != parent[0]):
                out.extend((p, addr) for p in below[s])
        for _, others in children(r):
            for t, addr in others:
                out.extend((p, addr) for p in below[t])
        routes[r] = out
        has_default[r] = parent is not None
    return routes, has_default


def shortest_path_routes(r: str, by_router: dict[str, list[tuple[Domain, int]]],
                         by_domain: dict[int, list[tuple[str, int]]], fam: int) -> list[Route]:
    """A route to every subnet of family `fam` that router r is not on, via the
    first router on a shortest path (breadth-first over routers): O(routers +
    networks) per router."""
    mine = by_router.get(r, [])
    seen_doms = {d.id for d, _ in mine}
    seen_routers = {r}
    queue: deque[tuple[str, int]] = deque()
    for dom, _ in mine:
        for s, addr in by_domain[dom.id]:
            if s not in seen_routers:
                seen_routers.add(s)
                queue.append((s, addr))
    out: list[Route] = []
    while queue:
        s, via = queue.popleft()
        for dom, _ in by_router[s]:
            if dom.id in seen_doms:
                continue
            seen_doms.add(dom.id)
            out.append((dom.subnets[fam], via))
            for t, _ in by_domain[dom.id]:
                if t not in seen_routers:
                    seen_routers.add(t)
                    queue.append((t, via))
    return out


def _user_default(net: Net, r: str, fam: int) -> bool:
    g = net.groups[net.index[r][0]]
    return any(sub.family == fam and sub.plen == 0 for sub, _ in g.props.get("routes_static", []))


def static_routes(net: Net, aggregate_above: int | None = None) -> dict[str, list[Route]]:
    """{router: [(destination subnet, next hop)]} for the routers without OSPF
    or BGP that need any route; IPv4 routes before IPv6. A destination of
    prefix length 0 is a default route. `aggregate_above`: merge prefixes in
    components of more subnets than this (default AGGREGATE_ABOVE)."""
    from megafleet.netlang.routing import is_dynamic

    limit = AGGREGATE_ABOVE if aggregate_above is None else aggregate_above
    routes: dict[str, list[Route]] = {}
    for fam in (4, 6):
        by_router, by_domain = _family_graph(net, fam)
        for comp in _components(by_router, by_domain):
            static = [r for r in comp.routers if not is_dynamic(net, r)]
            if not static:
                continue
            aggregate = len(comp.domains) > limit
            tree: dict[str, list[Route]] = {}
            defaults: dict[str, bool] = {}
            if comp.is_tree():
                tree, defaults = tree_routes(comp, by_router, by_domain, fam, aggregate)
            for r in static:
                if r in tree and not (defaults[r] and _user_default(net, r, fam)):
                    mine = tree[r]
                else:
                    mine = shortest_path_routes(r, by_router, by_domain, fam)
                mine = _merged(mine, aggregate)
                if mine:
                    routes.setdefault(r, []).extend(mine)
    # Routers in declaration order, as before.
    order = {r: i for i, r in enumerate(net.routers())}
    return dict(sorted(routes.items(), key=lambda kv: order.get(kv[0], 0)))
