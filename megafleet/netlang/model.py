"""The compiled network: what `compile` returns and what `net up` instantiates.

Nodes stay grouped as declared: a `NodeGroup` holds the names of `web[1..1000]` and
each `Iface` holds the addresses of all its members as one `range` when they are
contiguous, so a 100,000-host description is a handful of objects plus a name list.
`Net.node(name)` materialises one node's view when a consumer needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from megafleet.netlang.errors import Loc
from megafleet.netlang.ipam import Subnet, fmt


@dataclass
class LinkProps:
    rate_bit: int | None = None
    delay_us: int | None = None
    jitter_us: int | None = None
    loss_pct: float | None = None
    mtu: int | None = None

    def shaped(self) -> bool:
        return any(v is not None for v in (self.rate_bit, self.delay_us, self.jitter_us, self.loss_pct))

    def merged(self, other: "LinkProps") -> "LinkProps":
        """self, with other's values where self has none."""
        mine = {k: getattr(self, k) for k in ("rate_bit", "delay_us", "jitter_us", "loss_pct", "mtu")}
        return LinkProps(**{k: v if v is not None else getattr(other, k) for k, v in mine.items()})

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Domain:
    """One layer-2 broadcast domain: a switch (or one VLAN of it, or switches linked
    together) or a point-to-point link. Subnets belong to domains."""

    id: int
    name: str
    loc: Loc
    switches: list[str] = field(default_factory=list)
    vlan: int | None = None
    subnets: dict[int, Subnet] = field(default_factory=dict)
    mtu: int = 1500
    ifaces: list["Iface"] = field(default_factory=list)
    # (router name, {family: address}) in declaration order; the first is the gateway.
    routers: list[tuple[str, dict[int, int]]] = field(default_factory=list)

    def gateway(self, family: int, exclude: str | None = None) -> int | None:
        for name, addrs in self.routers:
            if name != exclude and family in addrs:
                return addrs[family]
        return None


@dataclass
class Iface:
    """One interface on each member of `members` of a node group, all in one domain
    (or, for a point-to-point link, on one node)."""

    group: "NodeGroup"
    members: range
    index: int                      # ethN inside the node
    domain: Domain
    loc: Loc
    switch: str | None = None       # None for a point-to-point link
    peer: str | None = None         # the node at the other end of a p2p link
    vlan: int | None = None
    props: LinkProps = field(default_factory=LinkProps)
    addrs: dict[int, Sequence[int]] = field(default_factory=dict)   # family -> per member
    # What the description asked for: 4/6 -> ('explicit', first address, plen or
    # None); 0 -> ('auto'|'none', 0, None) for every family; -4/-6 -> ('loc', Loc
    # of the explicit address, None), for messages.
    want: dict[int, tuple] = field(default_factory=dict)
    # `link r1:eth3 -- ...` names the interface inside the node; None: eth{index}.
    name: str | None = None

    @property
    def ifname(self) -> str:
        return self.name or f"eth{self.index}"

    def address(self, family: int, member: int) -> int | None:
        seq = self.addrs.get(family)
        if seq is None:
            return None
        return seq[member - self.members.start]


@dataclass
class NodeGroup:
    kind: str                        # vm | host | router
    names: list[str]
    loc: Loc
    props: dict[str, Any] = field(default_factory=dict)
    ifaces: list[Iface] = field(default_factory=list)     # shared by all members
    group: str | None = None         # the `group NAME { }` it was declared in

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Switch:
    name: str
    loc: Loc
    mtu: int = 1500
    vde: bool = False
    subnet_spec: list[tuple[str, Any, Loc]] = field(default_factory=list)
    vlans: set[int] = field(default_factory=set)


@dataclass
class SwitchLink:
    a: str
    b: str
    loc: Loc
    vlans: list[int] = field(default_factory=list)
    props: LinkProps = field(default_factory=LinkProps)


@dataclass
class NodeView:
    """One node, materialised."""

    name: str
    kind: str
    props: dict[str, Any]
    ifaces: list[tuple[str, Iface, dict[int, str]]]     # (ethN, iface, {family: "addr/plen"})
    gateways: dict[int, str]
    routes: list[tuple[str, str]]                        # (subnet, via)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind,
            "props": {k: ([{"argv": list(argv), "at": str(loc)} for argv, loc in v] if k == "exec" else v)
                      for k, v in self.props.items() if k != "routes_static"},
            "ifaces": [{"name": n, "switch": i.switch, "peer": i.peer, "vlan": i.vlan,
                        "domain": i.domain.name, "mtu": i.props.mtu or i.domain.mtu,
                        "link": i.props.to_json(),
                        "addresses": [a[f] for f in sorted(a)]} for n, i, a in self.ifaces],
            "gateways": {f"ipv{f}": g for f, g in self.gateways.items()},
            "routes": [{"to": s, "via": v} for s, v in self.routes],
        }


@dataclass
class Net:
    files: list[str]
    images: dict[str, tuple[str, Loc]] = field(default_factory=dict)
    pools: dict[str, Any] = field(default_factory=dict)
    switches: dict[str, Switch] = field(default_factory=dict)
    switch_links: list[SwitchLink] = field(default_factory=list)
    groups: list[NodeGroup] = field(default_factory=list)
    domains: list[Domain] = field(default_factory=list)
    # name -> (group index, member index), for nodes (not switches)
    index: dict[str, tuple[int, int]] = field(default_factory=dict)
    extra_ifaces: dict[str, list[Iface]] = field(default_factory=dict)
    static_routes: dict[str, list[tuple[Subnet, int]]] = field(default_factory=dict)
    reachable: list[tuple[str, str, Loc]] = field(default_factory=list)
    faults: list = field(default_factory=list)     # netlang.faults.Fault: the fault schedule
    params: dict[str, str] = field(default_factory=dict)
    # A foreign file read directly (netlang.importers): what it had that was not
    # carried over, "FILE:line:col: warning: ..." each; the commands print them.
    import_warnings: list[str] = field(default_factory=list)
    _graph: Any = None

    # -- queries -------------------------------------------------------------
    def node_count(self) -> int:
        return len(self.index)

    def counts(self) -> dict[str, int]:
        out = {"switch": len(self.switches), "vm": 0, "host": 0, "router": 0}
        for g in self.groups:
            out[g.kind] += len(g)
        return out

    def routers(self) -> list[str]:
        return [n for g in self.groups if g.kind == "router" for n in g.names]

    def iter_nodes(self) -> Iterator[tuple[NodeGroup, int, str]]:
        for g in self.groups:
            for k, n in enumerate(g.names):
                yield g, k, n

    def node(self, name: str) -> NodeView:
        gi, k = self.index[name]
        g = self.groups[gi]
        ifaces: list[tuple[str, Iface, dict[int, str]]] = []
        for iface in list(g.ifaces) + self.extra_ifaces.get(name, []):
            addrs = {}
            for fam, seq in iface.addrs.items():
                sub = iface.domain.subnets[fam]
                addrs[fam] = f"{fmt(fam, seq[k - iface.members.start])}/{sub.plen}"
            ifaces.append((iface.ifname, iface, addrs))
        ifaces.sort(key=lambda t: t[1].index)
        gateways: dict[int, str] = {}
        if g.kind != "router":
            for _, iface, _ in ifaces:
                for fam in (4, 6):
                    if fam not in gateways and fam in iface.addrs:
                        gw = iface.domain.gateway(fam, exclude=name)
                        if gw is not None:
                            gateways[fam] = fmt(fam, gw)
        routes = [(str(s), fmt(s.family, via)) for s, via in self.static_routes.get(name, [])]
        for sub, via in g.props.get("routes_static", []):
            routes.append((str(sub), via))
        return NodeView(name, g.kind, g.props, ifaces, gateways, routes)

    @property
    def graph(self):
        if self._graph is None:
            from megafleet.netlang.graph import build_graph
            self._graph = build_graph(self)
        return self._graph
