"""The network plan of a testbed (or of one host's share of it), as typed data.

One small frozen dataclass per kind of thing a host creates, in the spirit of
Mininet's Node/Link/Switch split (and containerlab's one file per link type):

    Bridge        a switch (or one VLAN of it); a leaf of a bridge tree when
                  `root` is set (switches with more ports than one bridge takes)
    VdeSwitch     a switch run as a vde_switch process
    VethPort      a namespace node's interface on a bridge (a veth pair)
    TapPort       a QEMU/libvirt guest's NIC on a bridge (a tap)
    ContainerPort a container guest's NIC (a veth whose far end the vm engine
                  moves into the container)
    VdePort       a namespace node's interface on a VDE switch (vde_plug2tap)
    GuestVdePort  a QEMU guest's NIC on a VDE switch (QEMU connects itself)
    WiredPort     a namespace node's impaired interface (its Wire builds it)
    P2pLink       a veth pair between two namespaces
    Trunk         a veth pair between two bridges (one per VLAN of a trunk)
    Wire          an impaired link: two vde_switch processes and a wirefilter
    Vxlan         the tunnel end of a segment that spans hosts

Each item says what it creates: `links()` (host-side interfaces, recorded in the
ledger before they exist; teardown deletes what the ledger holds, so it also works
after a crash), `ip_lines()` (its lines of the host's one `ip -batch`), and
serialises itself (`to_json`, `item_from_json`). A `Plan` holds them in typed
lists, plus the namespaces' configuration, their startup commands (`NsExec`)
and the routers' daemon configs;
`diff(old, new)` compares two plans item by item (what a running testbed must
change). `live.plan` makes a Plan from a compiled description, `manifest.split`
cuts it per host, `live.apply` builds one and `live.adown` removes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal, Union

from megafleet.netlang import netlink
from megafleet.netlang.model import LinkProps

VXLAN_PORT = 4789


class PlanError(ValueError):
    pass


def _props_json(p: LinkProps) -> dict[str, Any]:
    return p.to_json()


# Every veth end made with one queue each way: by default the kernel makes one
# per CPU and then cuts it to one, which waits for an RCU grace period under
# the rtnl lock that every other link and namespace change needs.
ONE_QUEUE = "numtxqueues 1 numrxqueues 1"
# A bridge port needs no IPv6 address: without this each port coming up starts
# the kernel's duplicate address detection of a link-local address, work that
# takes the rtnl lock again (a kworker per port, under a boot storm).
NO_LL = "addrgenmode none"

@dataclass(frozen=True)
class _Item:
    kind: ClassVar[str] = ""

    ident: ClassVar[tuple[str, ...]] = ()

    def identity(self) -> tuple:
        """What identifies this item between two plans (for `diff`)."""
        return (self.kind,) + tuple(getattr(self, f) for f in self.ident)

    def links(self) -> list[str]:
        """Host-side interfaces this item creates (deleting each removes it)."""
        return []

    def names(self) -> list[str]:
        """Every host-side interface name this item uses up (both ends of a veth)."""
        return self.links()

    def ip_lines(self) -> list[str]:
        """Its lines of the host's `ip -batch` (creation)."""
        return []

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LinkProps):
                v = _props_json(v)
            elif isinstance(v, tuple):
                v = [x.to_json() if isinstance(x, WireEnd) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]):
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name == "props":
                v = LinkProps(**(v or {}))
            elif f.name == "ends":
                v = tuple(WireEnd(**e) for e in v)
            elif isinstance(v, list):
                v = tuple(v)
            kw[f.name] = v
        try:
            return cls(**kw)
        except TypeError as exc:
            raise PlanError(f"malformed {cls.kind} in a plan: {exc}") from None


@dataclass(frozen=True)
class Bridge(_Item):
    """A switch, or one VLAN of it (this kernel has no VLAN filtering: each VLAN is
    its own bridge). A leaf of a bridge tree has `root` (the root bridge) and the
    veth `uplink` (on the leaf) / `downlink` (on the root) joining them."""

    kind: ClassVar[str] = "bridge"
    ident: ClassVar[tuple[str, ...]] = ("switch", "vlan", "ifname")
    switch: str
    vlan: int | None
    ifname: str
    mtu: int
    root: str | None = None
    uplink: str | None = None
    downlink: str | None = None

    def links(self) -> list[str]:
        return [self.ifname] + ([self.uplink] if self.uplink else [])

    def names(self) -> list[str]:
        return [n for n in (self.ifname, self.uplink, self.downlink) if n]

    def ip_lines(self) -> list[str]:
        # iproute2 reads everything after "type bridge" as bridge options, so the
        # generic "mtu" must come before the type.
        lines = [f"link add {self.ifname}" + (f" mtu {self.mtu}" if self.mtu != 1500 else "") + " type bridge",
                 f"link set {self.ifname} up"]
        if self.root:
            lines += [f"link add {self.uplink} mtu {self.mtu} {ONE_QUEUE} type veth peer name {self.downlink} "
                      f"mtu {self.mtu} {ONE_QUEUE}",
                      f"link set {self.uplink} {NO_LL}", f"link set {self.downlink} {NO_LL}",
                      f"link set {self.uplink} master {self.ifname} up",
                      f"link set {self.downlink} master {self.root} up"]
        return lines


@dataclass(frozen=True)
class VdeSwitch(_Item):
    kind: ClassVar[str] = "vde-switch"
    ident: ClassVar[tuple[str, ...]] = ("switch",)
    switch: str
    socket: str          # the socket directory


@dataclass(frozen=True)
class _Port(_Item):
    """What every port has: its node, switch (and VLAN), the bridge it is on
    (None on a VDE switch), MTU and link properties."""

    ident: ClassVar[tuple[str, ...]] = ("node", "host_if")
    node: str
    switch: str
    vlan: int | None
    bridge: str | None
    mtu: int
    props: LinkProps
    host_if: str         # host end (veth/tap), or a unique key where nothing is on the host


@dataclass(frozen=True)
class VethPort(_Port):
    kind: ClassVar[str] = "veth"
    ns: str = ""
    eth: str = ""

    def links(self) -> list[str]:
        return [self.host_if]

    def ip_lines(self) -> list[str]:
        return [f"link add {self.host_if} mtu {self.mtu} {ONE_QUEUE} type veth peer name {self.eth} "
                f"mtu {self.mtu} {ONE_QUEUE} netns {self.ns}", f"link set {self.host_if} {NO_LL}",
                f"link set {self.host_if} master {self.bridge} up"]


@dataclass(frozen=True)
class TapPort(_Port):
    kind: ClassVar[str] = "tap"

    def links(self) -> list[str]:
        return [self.host_if]

    def ip_lines(self) -> list[str]:
        return [f"tuntap add dev {self.host_if} mode tap", f"link set {self.host_if} mtu {self.mtu} {NO_LL}",
                f"link set {self.host_if} master {self.bridge} up"]


@dataclass(frozen=True)
class ContainerPort(_Port):
    """A container guest's NIC: a veth whose host end `host_if` is on the
    bridge. The container launcher creates the pair when the guest starts, its
    far end born inside the guest's network namespace (vm.cnet: moving a link
    between namespaces costs an RCU grace period under rtnl), and the pair goes
    with that namespace. So the host's `ip -batch` has nothing to create here;
    the name is recorded, and removed on teardown if still there."""

    kind: ClassVar[str] = "cveth"

    def links(self) -> list[str]:
        return [self.host_if]

    def ip_lines(self) -> list[str]:
        return []


@dataclass(frozen=True)
class VdePort(_Port):
    """A namespace node on a VDE switch: vde_plug2tap inside the namespace makes
    `eth` (a process, started by live; `host_if` is only its key)."""

    kind: ClassVar[str] = "vde"
    ns: str = ""
    eth: str = ""
    socket: str = ""


@dataclass(frozen=True)
class GuestVdePort(_Port):
    """A QEMU guest's NIC on a VDE switch: QEMU connects to the switch itself."""

    kind: ClassVar[str] = "guest-vde"
    socket: str = ""


@dataclass(frozen=True)
class WiredPort(_Port):
    """A namespace node's interface with delay, jitter or loss: the `Wire` of the
    same key builds it; the port says where the node is attached."""

    kind: ClassVar[str] = "wired"
    ns: str = ""
    eth: str = ""
    wire: str = ""


Port = Union[VethPort, TapPort, ContainerPort, VdePort, GuestVdePort, WiredPort]


@dataclass(frozen=True)
class P2pLink(_Item):
    kind: ClassVar[str] = "p2p"
    ident: ClassVar[tuple[str, ...]] = ("ns_a", "eth_a", "ns_b", "eth_b")
    node_a: str
    ns_a: str
    eth_a: str
    node_b: str
    ns_b: str
    eth_b: str
    mtu: int
    props: LinkProps

    def ip_lines(self) -> list[str]:
        return [f"link add {self.eth_a} mtu {self.mtu} {ONE_QUEUE} netns {self.ns_a} type veth peer name "
                f"{self.eth_b} mtu {self.mtu} {ONE_QUEUE} netns {self.ns_b}"]


@dataclass(frozen=True)
class Trunk(_Item):
    """A switch-to-switch link (one per VLAN of a trunk): a veth between bridges."""

    kind: ClassVar[str] = "trunk"
    ident: ClassVar[tuple[str, ...]] = ("if_a",)
    switch_a: str
    switch_b: str
    vlan: int | None
    if_a: str
    if_b: str
    bridge_a: str
    bridge_b: str
    mtu: int
    props: LinkProps

    def links(self) -> list[str]:
        return [self.if_a, self.if_b]

    def ip_lines(self) -> list[str]:
        return [f"link add {self.if_a} mtu {self.mtu} {ONE_QUEUE} type veth peer name {self.if_b} "
                f"mtu {self.mtu} {ONE_QUEUE}",
                f"link set {self.if_a} {NO_LL}", f"link set {self.if_b} {NO_LL}",
                f"link set {self.if_a} master {self.bridge_a} up",
                f"link set {self.if_b} master {self.bridge_b} up"]


@dataclass(frozen=True)
class WireEnd:
    """One end of a Wire: a tap inside a namespace (`ns`, where=namespace), a tap
    on the host enslaved to a bridge (`bridge`, where=bridge), or a VDE switch of
    the description (`vde`, where=socket directory, no ifname)."""

    kind: Literal["ns", "bridge", "vde"]
    where: str
    ifname: str | None = None
    node: str | None = None       # the node of an `ns` end, the switch of the others

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Wire(_Item):
    """An impaired link (delay, jitter, loss): this kernel has no netem, so the
    impairment is VDE's wirefilter between two small vde_switch processes, each
    owning a tap at one end."""

    kind: ClassVar[str] = "wire"
    ident: ClassVar[tuple[str, ...]] = ("key",)
    key: str
    ends: tuple[WireEnd, WireEnd]
    mtu: int
    props: LinkProps

    def links(self) -> list[str]:
        return [e.ifname for e in self.ends if e.kind == "bridge" and e.ifname]


@dataclass(frozen=True)
class Vxlan(_Item):
    """One spanning segment's tunnel end on one host: flooding to every other
    host of the segment (head-end replication; the kernel learns MACs)."""

    kind: ClassVar[str] = "vxlan"
    ident: ClassVar[tuple[str, ...]] = ("ifname",)
    bridge: str          # the local (root) bridge of the segment
    segment: str         # "switch" or "switch/vlan"
    vni: int
    ifname: str
    local: str           # this host's underlay address
    remotes: tuple[str, ...]
    mtu: int

    def links(self) -> list[str]:
        return [self.ifname]

    def ip_lines(self) -> list[str]:
        return [f"link add {self.ifname} mtu {self.mtu} type vxlan id {self.vni} local {self.local} "
                f"dstport {VXLAN_PORT}", f"link set {self.ifname} {NO_LL}",
                f"link set {self.ifname} master {self.bridge} up"]

    def fdb_lines(self) -> list[str]:
        return [f"fdb append 00:00:00:00:00:00 dev {self.ifname} dst {r}" for r in self.remotes]


@dataclass(frozen=True)
class NsExec:
    """A startup command of a namespace node (`exec "CMD"` in the description):
    `argv` run in the node's namespace after its routing starts (netlang.nsexec).
    Kept per namespace, in order, in `Plan.ns_exec`; the statement's file:line is
    not part of it (moving a line must not change the plan's digest)."""

    node: str
    argv: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "argv": list(self.argv)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "NsExec":
        try:
            argv = d["argv"]
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise TypeError(f"argv must be a non-empty list of strings, got {argv!r}")
            return cls(str(d["node"]), tuple(argv))
        except (KeyError, TypeError) as exc:
            raise PlanError(f"malformed startup command in a plan: {exc}") from None


# Every kind, by its JSON name (each name once: checked below).
ITEM_KINDS: dict[str, Any] = {c.kind: c for c in (Bridge, VdeSwitch, VethPort, TapPort, ContainerPort, VdePort,
                                                     GuestVdePort, WiredPort, P2pLink, Trunk, Wire, Vxlan)}
assert len(ITEM_KINDS) == 12, "two item kinds share a JSON name"


def item_from_json(d: dict[str, Any]):
    cls = ITEM_KINDS.get(d.get("kind", ""))
    if cls is None:
        raise PlanError(f"unknown kind {d.get('kind')!r} of a plan item (different megafleet versions?)")
    return cls.from_json(d)


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------

# The Plan fields that hold items (what a partial plan of new items fills).
ITEM_LISTS = ("bridges", "vde", "ports", "p2p", "trunks", "wires", "vxlan")
_DIGEST_CHUNK = 1024        # items per json.dumps in Plan.compute_digest


@dataclass
class Plan:
    """Everything one testbed's network needs on a host (or on all hosts, before
    `manifest.split` cuts it). Namespaces are node -> namespace; `ns_ops` and
    `ns_sysctls` configure each namespace (netlink), `ns_exec` are its startup
    commands in order; `frr`/`vm_frr` are
    router -> daemon -> configuration text; `vms` are the vm engine's GuestSpecs."""

    name: str
    netns: dict[str, str] = field(default_factory=dict)
    bridges: list[Bridge] = field(default_factory=list)       # roots before leaves
    vde: list[VdeSwitch] = field(default_factory=list)
    ports: list[Port] = field(default_factory=list)
    p2p: list[P2pLink] = field(default_factory=list)
    trunks: list[Trunk] = field(default_factory=list)
    wires: list[Wire] = field(default_factory=list)
    vxlan: list[Vxlan] = field(default_factory=list)
    ns_ops: dict[str, list[netlink.Op]] = field(default_factory=dict)
    ns_sysctls: dict[str, dict[str, str]] = field(default_factory=dict)
    ns_exec: dict[str, list[NsExec]] = field(default_factory=dict)  # namespace -> startup commands
    routers: list[str] = field(default_factory=list)            # namespace routers
    frr: dict[str, dict[str, str]] = field(default_factory=dict)
    vm_frr: dict[str, dict[str, str]] = field(default_factory=dict)
    vms: list = field(default_factory=list)                     # vm.spec.GuestSpec
    digest: str = ""

    # -- queries ---------------------------------------------------------------
    def bridge(self, switch: str, vlan: int | None) -> Bridge:
        """The root bridge of a switch (or VLAN). KeyError when there is none."""
        for b in self.bridges:
            if b.switch == switch and b.vlan == vlan and b.root is None:
                return b
        raise KeyError((switch, vlan))

    def root_bridges(self) -> list[Bridge]:
        return [b for b in self.bridges if b.root is None]

    def vde_socket(self, switch: str) -> str | None:
        return next((v.socket for v in self.vde if v.switch == switch), None)

    def items(self) -> Iterator[Any]:
        """Every item of the typed lists, in creation order."""
        for name in ITEM_LISTS:
            yield from getattr(self, name)

    def host_links(self) -> list[str]:
        """Host-side interfaces the plan creates (recorded, then created)."""
        return [n for item in self.items() for n in item.links()]

    def host_names(self) -> list[str]:
        """Every host-side interface name the plan uses (both ends of veths)."""
        return [n for item in self.items() for n in item.names()]

    def configured_ifaces(self) -> set[tuple[str, str]]:
        """(namespace, ifname) of every interface the namespaces' configuration
        names (links set up, addresses)."""
        return {(ns, op.dev) for ns, ops in self.ns_ops.items() for op in ops
                if isinstance(op, (netlink.LinkUp, netlink.AddrAdd))}

    def created_ifaces(self) -> set[tuple[str, str]]:
        """(namespace, ifname) of every interface the plan creates inside a
        namespace: loopbacks, veth ends, VDE taps, wire taps."""
        out = {(ns, "lo") for ns in self.netns.values()}
        for port in self.ports:
            if isinstance(port, (VethPort, VdePort)):
                out.add((port.ns, port.eth))
        for link in self.p2p:
            out |= {(link.ns_a, link.eth_a), (link.ns_b, link.eth_b)}
        for wire in self.wires:
            out |= {(e.where, e.ifname) for e in wire.ends if e.kind == "ns" and e.ifname}
        return out

    def counts(self) -> dict[str, int]:
        return {"namespaces": len(self.netns), "bridges": len(self.bridges), "ports": len(self.ports),
                "p2p": len(self.p2p), "trunks": len(self.trunks), "wires": len(self.wires),
                "vxlan": len(self.vxlan), "frr": len(self.frr), "vms": len(self.vms)}

    # -- JSON --------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {f.name: self._field_json(f.name, getattr(self, f.name)) for f in self._fields()}

    def _fields(self) -> list[dataclasses.Field]:
        """The fields that make the plan: `ns_exec` only when there are startup
        commands, so that a plan without any has the JSON and digest it had
        before they existed (a testbed up across an upgrade stays "the same
        description", and a host of the previous version reads the plan)."""
        return [f for f in dataclasses.fields(self) if f.name != "ns_exec" or self.ns_exec]

    @staticmethod
    def _field_json(name: str, v: Any) -> Any:
        if name in ITEM_LISTS:
            return [item.to_json() for item in v]
        if name == "ns_ops":
            return {ns: [[type(op).__name__, _op_fields(op)] for op in ops] for ns, ops in v.items()}
        if name == "ns_exec":
            return {ns: [c.to_json() for c in cmds] for ns, cmds in v.items()}
        if name == "vms":
            return [g.to_dict() for g in v]
        return v

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"a plan has fields this host's netlang does not know: {', '.join(sorted(unknown))} "
                            f"(different megafleet versions?)")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in ITEM_LISTS:
                v = [item_from_json(x) for x in v]
            elif k == "ns_ops":
                v = {ns: [op_from_json(op) for op in ops] for ns, ops in v.items()}
            elif k == "ns_exec":
                v = {ns: [NsExec.from_json(c) for c in cmds] for ns, cmds in v.items()}
            elif k == "vms":
                from megafleet.vm.spec import GuestSpec
                v = [GuestSpec.from_dict(g) for g in v]
            kw[k] = v
        return cls(**kw)

    def compute_digest(self) -> str:
        """A hash of everything the plan builds (not of its own digest): the
        SHA-256 of `json.dumps(to_json() without digest, sort_keys=True)`,
        computed item by item so that the JSON of the whole plan never exists
        at once (at a million guests it was the controller's peak memory)."""
        h = hashlib.sha256()
        names = sorted(f.name for f in self._fields() if f.name != "digest")
        h.update(b"{")
        for i, name in enumerate(names):
            h.update((", " if i else "").encode() + json.dumps(name).encode() + b": ")
            value = getattr(self, name)
            if name in ITEM_LISTS or name == "vms":
                # A thousand items per json.dumps: the text of a list is its
                # items' texts joined by ", ", so the digest is the same, and
                # one call per item was a third of a 1,000-guest plan's time.
                h.update(b"[")
                for j in range(0, len(value), _DIGEST_CHUNK):
                    chunk = [item.to_json() if name in ITEM_LISTS else item.to_dict()
                             for item in value[j:j + _DIGEST_CHUNK]]
                    h.update((b", " if j else b"") + json.dumps(chunk, sort_keys=True, default=str)[1:-1].encode())
                h.update(b"]")
            elif name == "ns_ops":
                # Namespace by namespace, as json.dumps(sort_keys=True) orders
                # them: every router's route to every subnet made the whole
                # field's JSON (dicts and text) gigabytes at a million guests.
                h.update(b"{")
                for j, ns in enumerate(sorted(value)):
                    data = self._field_json(name, {ns: value[ns]})[ns]
                    h.update((", " if j else "").encode() + json.dumps(ns).encode() + b": "
                             + json.dumps(data, sort_keys=True, default=str).encode())
                h.update(b"}")
            else:
                data = self._field_json(name, value)
                h.update(json.dumps(data, sort_keys=True, default=str).encode())
        h.update(b"}")
        return h.hexdigest()


NETLINK_OPS = ("LinkUp", "AddrAdd", "RouteAdd")


_OP_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _op_fields(op: netlink.Op) -> dict[str, Any]:
    """`dataclasses.asdict(op)` for a netlink op, whose fields are all ints,
    strings or None: asdict's deep copy of each field was most of the plan's
    time at 100,000 guests (a router has a route to every subnet: routers x
    subnets ops)."""
    names = _OP_FIELD_NAMES.get(type(op))
    if names is None:
        names = _OP_FIELD_NAMES[type(op)] = tuple(f.name for f in dataclasses.fields(op))
    return {n: getattr(op, n) for n in names}


def op_from_json(item: list) -> netlink.Op:
    """A namespace operation from its JSON form ([kind, fields], as a plan's
    ns_ops hold them); PlanError for a kind netlink does not know."""
    kind, fields = item
    if kind not in NETLINK_OPS:
        raise PlanError(f"unknown namespace operation {kind!r} in a plan")
    return getattr(netlink, kind)(**fields)


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------

@dataclass
class PlanDiff:
    """What differs between two plans, item by item: `removed` (only in the old),
    `added` (only in the new), `changed` ((old, new) with the same identity but
    other content). Namespaces, their configuration, their startup commands,
    routers' daemon configs and guests are compared as items too (kinds "netns",
    "ns-config", "ns-exec" (value: the namespace's NsExec tuple, in order),
    "router", "guest")."""

    removed: list[Any] = field(default_factory=list)
    added: list[Any] = field(default_factory=list)
    changed: list[tuple[Any, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.removed or self.added or self.changed)


@dataclass(frozen=True)
class Named:
    """A non-list part of a plan as a comparable item: (kind, name, value)."""

    kind: str
    name: str
    value: Any

    def identity(self) -> tuple:
        return (self.kind, self.name)


def _keyed(p: Plan) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for item in p.items():
        out[item.identity()] = item
    for node, ns in p.netns.items():
        out[("netns", node)] = Named("netns", node, ns)
    for ns in set(p.ns_ops) | set(p.ns_sysctls):
        out[("ns-config", ns)] = Named("ns-config", ns, (repr(p.ns_ops.get(ns, [])),
                                                        sorted(p.ns_sysctls.get(ns, {}).items())))
    for ns, cmds in p.ns_exec.items():
        if cmds:
            out[("ns-exec", ns)] = Named("ns-exec", ns, tuple(cmds))
    for r, daemons in {**p.frr, **p.vm_frr}.items():
        out[("router", r)] = Named("router", r, sorted(daemons.items()))
    for g in p.vms:
        out[("guest", g.name)] = Named("guest", g.name, json.dumps(g.to_dict(), sort_keys=True, default=str))
    return out


def diff(old: Plan, new: Plan) -> PlanDiff:
    """Compare two plans item by item (see PlanDiff). Items are frozen dataclasses:
    equal content is an unchanged item."""
    a, b = _keyed(old), _keyed(new)
    d = PlanDiff()
    d.removed = [a[k] for k in a if k not in b]
    d.added = [b[k] for k in b if k not in a]
    d.changed = [(a[k], b[k]) for k in a if k in b and a[k] != b[k]]
    return d


def item_identity(d: dict[str, Any]) -> tuple:
    """`identity()` of a plan item given as its JSON (no item is built)."""
    cls = ITEM_KINDS.get(d.get("kind", ""))
    if cls is None:
        raise PlanError(f"unknown kind {d.get('kind')!r} of a plan item (different megafleet versions?)")
    return (cls.kind,) + tuple(d.get(f) for f in cls.ident)


def _json_sections(p: dict[str, Any]) -> list[tuple[dict, Callable[[Any, Any], Any]]]:
    """A plan's JSON as `_keyed` sees it, section by section: (identity -> the
    item's JSON, a function building the typed item from identity and JSON)."""
    lists = {item_identity(x): x for name in ITEM_LISTS for x in p.get(name, [])}
    ops, sysctls = p.get("ns_ops", {}), p.get("ns_sysctls", {})
    configs = {("ns-config", ns): (ops.get(ns, []), sysctls.get(ns, {})) for ns in sorted(set(ops) | set(sysctls))}

    def guest(k: tuple, g: dict) -> Named:
        from megafleet.vm.spec import GuestSpec
        return Named("guest", k[1], json.dumps(GuestSpec.from_dict(g).to_dict(), sort_keys=True, default=str))

    return [
        (lists, lambda k, x: item_from_json(x)),
        ({("netns", node): ns for node, ns in p.get("netns", {}).items()},
         lambda k, ns: Named("netns", k[1], ns)),
        (configs, lambda k, c: Named("ns-config", k[1], (repr([op_from_json(op) for op in c[0]]),
                                                          sorted(c[1].items())))),
        ({("ns-exec", ns): cmds for ns, cmds in p.get("ns_exec", {}).items() if cmds},
         lambda k, cmds: Named("ns-exec", k[1], tuple(NsExec.from_json(c) for c in cmds))),
        ({("router", r): daemons for r, daemons in {**p.get("frr", {}), **p.get("vm_frr", {})}.items()},
         lambda k, daemons: Named("router", k[1], sorted(daemons.items()))),
        ({("guest", g["name"]): g for g in p.get("vms", [])}, guest),
    ]


def diff_json(old: dict[str, Any], new: dict[str, Any]) -> PlanDiff:
    """`diff` of two plans given as their JSON (`Plan.to_json`, as manifests
    hold them), with the same items, building typed items only where the JSON
    differs: a small change to a big running testbed costs comparing its
    dicts, not parsing both plans (two thousand guest specs at lan1000 size).
    Items whose JSON differs are built and compared typed, so the answer is
    `diff`'s even for JSON written by another version."""
    d = PlanDiff()
    for (a, build), (b, _) in zip(_json_sections(old), _json_sections(new)):
        for k, x in a.items():
            if k not in b:
                d.removed.append(build(k, x))
            elif x != b[k]:
                ia, ib = build(k, x), build(k, b[k])
                if ia != ib:
                    d.changed.append((ia, ib))
        d.added += [build(k, y) for k, y in b.items() if k not in a]
    return d


def counts_json(p: dict[str, Any]) -> dict[str, int]:
    """`Plan.counts()` of a plan given as its JSON."""
    return {"namespaces": len(p.get("netns", {})), "bridges": len(p.get("bridges", [])),
            "ports": len(p.get("ports", [])), "p2p": len(p.get("p2p", [])), "trunks": len(p.get("trunks", [])),
            "wires": len(p.get("wires", [])), "vxlan": len(p.get("vxlan", [])), "frr": len(p.get("frr", {})),
            "vms": len(p.get("vms", []))}
