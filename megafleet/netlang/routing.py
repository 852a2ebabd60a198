"""Routing derived from the topology: static routes for routers that run no routing
protocol, and the reachability check behind `reachable A B`."""

from __future__ import annotations

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
    """For each router without OSPF/BGP: its static routes, (destination, next
    hop); a tree of routers gets default routes toward its core and merged
    prefixes (megafleet.netlang.treeroutes), anything else a route to every
    subnet via the first router on a shortest path."""
    from megafleet.netlang.treeroutes import static_routes as routes

    return routes(net)


def routing_kind(net: Net, router: str) -> str:
    """How a router learns routes: "static" (computed here), "ospf", "bgp" or
    "bgp+ospf"."""
    props = net.groups[net.index[router][0]].props
    kinds = [k for k in ("bgp", "ospf") if k in props]
    return "+".join(kinds) or "static"


class Reach:
    """Which nodes can exchange packets, per address family: nodes sharing a
    network addressed in that family, or nodes whose gateways (routers: their
    own networks) lie in one routed component of that family (networks joined
    by routers with an address of that family on both), when megafleet can
    prove that the component's routing delivers:

    - all its routers learn routes one way (all static, all OSPF, all BGP):
      megafleet redistributes nothing between kinds;
    - with BGP, no two of more than two BGP routers share an AS (no iBGP full
      mesh or route reflector is generated, and eBGP drops paths through its
      own AS)."""

    def __init__(self, net: Net):
        self.net = net
        rdoms = _router_domains(net)
        self.comp: dict[int, list[int]] = {}
        self.unprovable: dict[int, dict[int, str]] = {}
        for fam in (4, 6):
            parent = list(range(len(net.domains)))

            def find(x: int) -> int:
                while parent[x] != x:
                    parent[x] = parent[parent[x]]
                    x = parent[x]
                return x

            for r, doms in rdoms.items():
                mine = [d for d, addrs in doms if fam in addrs]
                for d in mine[1:]:
                    parent[find(d.id)] = find(mine[0].id)
            comp = [find(i) for i in range(len(net.domains))]
            self.comp[fam] = comp
            # The routers of each component, to judge whether its routing is provable.
            members: dict[int, dict[str, None]] = {}
            for r, doms in rdoms.items():
                for d, addrs in doms:
                    if fam in addrs:
                        members.setdefault(comp[d.id], {})[r] = None
            self.unprovable[fam] = {c: why for c, rs in members.items()
                                    if (why := self._why_unprovable(list(rs))) is not None}
        self._by_group: dict[tuple[int, int], tuple[frozenset[int], int | None, str]] = {}

    def _why_unprovable(self, routers: list[str]) -> str | None:
        kinds: dict[str, str] = {}
        for r in routers:
            kinds.setdefault(routing_kind(self.net, r), r)
        if len(kinds) > 1:
            shown = ", ".join(f"{r} ({k})" for k, r in sorted(kinds.items()))
            return (f"its routers learn routes in different ways ({shown}) and megafleet "
                    f"redistributes nothing between them")
        bgp = [r for r in routers if "bgp" in self.net.groups[self.net.index[r][0]].props]
        if len(bgp) > 2:
            first: dict[int, str] = {}
            for r in bgp:
                asn = self.net.groups[self.net.index[r][0]].props["bgp"]["as"]
                if asn in first:
                    return (f"BGP routers {first[asn]} and {r} share AS {asn} among {len(bgp)} BGP routers "
                            f"(no iBGP full mesh or route reflector is generated)")
                first[asn] = r
        return None

    def signature(self, name: str, fam: int) -> tuple[frozenset[int], int | None, str]:
        """(domains addressed in `fam`, routed component or None, why not
        routed). Members of a group without interfaces of their own share one
        answer, so a pattern over a million hosts costs one node view per group."""
        gi = self.net.index[name][0]
        shared = name not in self.net.extra_ifaces and self.net.groups[gi].kind != "router"
        if shared and (gi, fam) in self._by_group:
            return self._by_group[(gi, fam)]
        sig = self._signature(name, fam)
        if shared:
            self._by_group[(gi, fam)] = sig
        return sig

    def _signature(self, name: str, fam: int) -> tuple[frozenset[int], int | None, str]:
        view = self.net.node(name)
        comp = self.comp[fam]
        direct = frozenset(i.domain.id for _, i, a in view.ifaces if fam in a)
        if view.kind == "router":
            routed = next((comp[d] for d in direct), None)
            return direct, routed, f"it has no IPv{fam} address"
        for _, iface, addrs in view.ifaces:
            if fam in addrs and iface.domain.gateway(fam, exclude=name) is not None:
                return direct, comp[iface.domain.id], ""
        if not direct:
            return direct, None, f"it has no IPv{fam} address"
        return direct, None, f"no router is on its IPv{fam} networks (no gateway)"

    def _pair(self, x: str, y: str, fam: int) -> str | None:
        """None when x reaches y over `fam`, else why not."""
        sa, sb = self.signature(x, fam), self.signature(y, fam)
        if sa[0] & sb[0]:
            return None
        if sa[1] is None:
            return f"{x} shares no IPv{fam} network with {y} and {sa[2]}"
        if sb[1] is None:
            return f"{y} shares no IPv{fam} network with {x} and {sb[2]}"
        if sa[1] != sb[1]:
            return f"no chain of IPv{fam} routers joins the networks of {x} and {y}"
        why = self.unprovable[fam].get(sa[1])
        if why is not None:
            return f"megafleet cannot prove IPv{fam} routing between {x} and {y}: {why}"
        return None

    def check(self, a: list[str], b: list[str]) -> str | None:
        """None when every node of a reaches every node of b (over IPv4 or
        IPv6), else the reason for the first pair that does not."""
        def key(n: str) -> tuple:
            return tuple(self.signature(n, f) for f in (4, 6))

        sig_a: dict[tuple, str] = {}
        for n in a:
            sig_a.setdefault(key(n), n)
        sig_b: dict[tuple, str] = {}
        for n in b:
            sig_b.setdefault(key(n), n)
        for x in sig_a.values():
            for y in sig_b.values():
                if x == y:
                    continue
                whys = [self._pair(x, y, fam) for fam in (4, 6)]
                if None in whys:
                    continue
                # The family the nodes have addresses in says most.
                both = [w for fam, w in zip((4, 6), whys)
                        if self.signature(x, fam)[0] or self.signature(x, fam)[1] is not None]
                return (both or whys)[0]
        return None
