"""Routing derived from the topology: static routes for routers that run no routing
protocol, and the reachability check behind `reachable A B`."""

from __future__ import annotations

from collections import deque

from megafleet.netlang.ipam import Subnet
from megafleet.netlang.model import Domain, Net


def _router_domains(net: Net) -> dict[str, list[tuple[Domain, dict[int, int]]]]:
    out: dict[str, list[tuple[Domain, dict[int, int]]]] = {}
    for dom in net.domains:
        for name, addrs in dom.routers:
            out.setdefault(name, []).append((dom, addrs))
    return out


def is_dynamic(net: Net, router: str) -> bool:
    g = net.groups[net.index[router][0]]
    return "ospf" in g.props or "bgp" in g.props


def static_routes(net: Net) -> dict[str, list[tuple[Subnet, int]]]:
    """For each router without OSPF/BGP: a route to every subnet it is not attached
    to, via the first router on a shortest path (breadth-first over routers)."""
    rdoms = _router_domains(net)
    routes: dict[str, list[tuple[Subnet, int]]] = {}
    for r, mine in rdoms.items():
        if is_dynamic(net, r):
            continue
        out: list[tuple[Subnet, int]] = []
        for fam in (4, 6):
            seen_doms = {d.id for d, _ in mine}
            seen_routers = {r}
            queue: deque[tuple[str, int]] = deque()
            for dom, my_addrs in mine:
                if fam not in my_addrs:
                    continue
                for s, addrs in dom.routers:
                    if s not in seen_routers and fam in addrs:
                        seen_routers.add(s)
                        queue.append((s, addrs[fam]))
            while queue:
                s, via = queue.popleft()
                for dom, _ in rdoms.get(s, ()):
                    if dom.id in seen_doms:
                        continue
                    seen_doms.add(dom.id)
                    if fam in dom.subnets:
                        out.append((dom.subnets[fam], via))
                    for t, addrs in dom.routers:
                        if t not in seen_routers:
                            seen_routers.add(t)
                            queue.append((t, via))
        if out:
            routes[r] = out
    return routes


class Reach:
    """Which nodes can exchange packets: nodes sharing an addressed network, or
    nodes whose gateways (routers: their own networks) lie in one routed component
    (domains joined by routers)."""

    def __init__(self, net: Net):
        self.net = net
        parent = list(range(len(net.domains)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for r, doms in _router_domains(net).items():
            first = find(doms[0][0].id)
            for d, _ in doms[1:]:
                parent[find(d.id)] = first
        self.comp = [find(i) for i in range(len(net.domains))]
        self._by_group: dict[int, tuple[frozenset[int], int | None, str]] = {}

    def signature(self, name: str) -> tuple[frozenset[int], int | None, str]:
        """(addressed domains, routed component or None, why not routed). Members of
        a group without interfaces of their own share one answer, so a pattern
        over a million hosts costs one node view per group."""
        gi = self.net.index[name][0]
        shared = name not in self.net.extra_ifaces and self.net.groups[gi].kind != "router"
        if shared and gi in self._by_group:
            return self._by_group[gi]
        sig = self._signature(name)
        if shared:
            self._by_group[gi] = sig
        return sig

    def _signature(self, name: str) -> tuple[frozenset[int], int | None, str]:
        view = self.net.node(name)
        direct = frozenset(i.domain.id for _, i, a in view.ifaces if a)
        if view.kind == "router":
            routed = next((self.comp[d] for d in direct), None)
            return direct, routed, "it has no addressed interface"
        for _, iface, addrs in view.ifaces:
            if addrs and iface.domain.routers and any(
                    iface.domain.gateway(f, exclude=name) is not None for f in addrs):
                return direct, self.comp[iface.domain.id], ""
        if not direct:
            return direct, None, "it has no address"
        return direct, None, "no router is on its networks (no gateway)"

    def check(self, a: list[str], b: list[str]) -> str | None:
        sig_a: dict[tuple, str] = {}
        for n in a:
            sig_a.setdefault(self.signature(n), n)
        sig_b: dict[tuple, str] = {}
        for n in b:
            sig_b.setdefault(self.signature(n), n)
        for sa, x in sig_a.items():
            for sb, y in sig_b.items():
                if x == y or sa[0] & sb[0]:
                    continue
                if sa[1] is not None and sa[1] == sb[1]:
                    continue
                if sa[1] is None:
                    return f"{x} shares no network with {y} and {sa[2]}"
                if sb[1] is None:
                    return f"{y} shares no network with {x} and {sb[2]}"
                return f"no chain of routers joins the networks of {x} and {y}"
        return None
