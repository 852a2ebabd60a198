"""Per-host manifests: what one host must run for one testbed, as plain data.

The controller (`megafleet.up`) compiles the description once, lets netlang plan
every resource of the whole testbed (`netlang.live.plan`), places the nodes on
hosts (`megafleet.placement`) and cuts the plan into one `HostManifest` per
host; `megafleet.host` applies a manifest on its host. A manifest is JSON all the
way down, so it travels through gproc unchanged.

Cutting the plan:

- a node's namespace, ports, FRR configuration and guest spec go to its host;
- a switch (or one VLAN of it) becomes a bridge on every host that has a port on
  it; a bridge present on more than one host is a *spanning segment*: its copies
  are joined by VXLAN, one VNI per segment, each host sending to every other
  host's underlay address (head-end replication; the kernel learns the rest);
- a switch-to-switch link goes to one host (the first that has its first
  switch), which then carries both bridges: exactly one copy of the link exists,
  so joining the copies by VXLAN cannot make a loop;
- point-to-point links and VDE switches cannot span hosts: placement keeps their
  nodes together (`demands` gives them one segment), and cutting checks it.

MTU: VXLAN costs 50 bytes of the underlay's MTU. When a spanning segment's MTU
does not fit (`underlay_mtu - 50 < segment MTU`), the segment's MTU is lowered on
every host to what fits: bridges, veths, the namespaces' interfaces and the
guests' NICs all agree, so nothing is dropped for size and OSPF neighbours (which
compare MTUs) still form.

Container guests: netlang plans a tap per vm NIC; a container needs a veth whose
far end the vm engine moves into the container. Cutting turns those ports into
`cveth` ports (host end on the bridge, far end `peer` left on the host for the
engine) and their NICs into `veth` NICs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megafleet.names import ifname
from megafleet.placement import NodeDemand, Plan as Placement

VXLAN_OVERHEAD = 50
VXLAN_PORT = 4789
# Memory a namespace node costs on a host, in MB: almost nothing. A guest costs
# its driver's footprint (megafleet.vm.driver.DRIVER_KINDS), counted by placement.
NAMESPACE_MB = 4


class ManifestError(ValueError):
    pass


# ---------------------------------------------------------------------------
# netlang's live plan <-> JSON
# ---------------------------------------------------------------------------

def _props(d: dict | None):
    from megafleet.netlang.model import LinkProps
    return LinkProps(**(d or {}))


# Fields of netlang's Plan that need converting; every other field is plain JSON
# (str, int, dicts and lists of them) and travels as it is, so a field netlang
# adds later (like `ns_sysctls`) needs no change here.
_FIELDS: dict[type, tuple[str, ...]] = {}


def _plain(obj: Any) -> Any:
    """`dataclasses.asdict` without its deep copies of every leaf (which made it
    most of the cost of cutting a million-guest plan): dataclasses become dicts,
    lists and tuples keep their type, everything else is shared as it is."""
    cls = type(obj)
    if cls in (str, int, float, bool) or obj is None:
        return obj
    names = _FIELDS.get(cls)
    if names is None and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(obj))
    if names is not None:
        return {name: _plain(getattr(obj, name)) for name in names}
    if cls in (list, tuple):
        return cls(_plain(x) for x in obj)
    if cls is dict:
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _guest_json(g) -> dict[str, Any]:
    """`GuestSpec.to_dict`, the fast way."""
    d = _plain(g)
    d["nics"] = list(d["nics"])
    return d


_TO_JSON = {
    "bridges": lambda v: [[sw, vlan, br, mtu] for (sw, vlan), (br, mtu) in v.items()],
    "vde": lambda v: {sw: str(path) for sw, path in v.items()},
    "ports": lambda v: [{**_plain(port), "props": port.props.to_json()} for port in v],
    "p2p": lambda v: [[*x[:-1], x[-1].to_json()] for x in v],
    "swlinks": lambda v: [[*x[:-1], x[-1].to_json()] for x in v],
    "wires": lambda v: [{"key": w.key, "ends": [list(e) for e in w.ends], "mtu": w.mtu,
                         "props": w.props.to_json()} for w in v],
    "ns_ops": lambda v: {ns: [_op_to_json(op) for op in ops] for ns, ops in v.items()},
    "vms": lambda v: [_guest_json(g) for g in v],
}


def plan_to_json(p) -> dict[str, Any]:
    """A `netlang.live.Plan` as JSON-able data."""
    out = {}
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        out[f.name] = _TO_JSON[f.name](value) if f.name in _TO_JSON else value
    return out


def plan_from_json(d: dict[str, Any]):
    """The `netlang.live.Plan` that `plan_to_json` wrote."""
    from megafleet.netlang import live
    from megafleet.vm.manifest import GuestSpec

    convert = {
        "bridges": lambda v: {(sw, vlan): (br, mtu) for sw, vlan, br, mtu in v},
        "vde": lambda v: {sw: Path(path) for sw, path in v.items()},
        "ports": lambda v: [live.Port(**{**port, "props": _props(port["props"])}) for port in v],
        "p2p": lambda v: [(*x[:-1], _props(x[-1])) for x in v],
        "swlinks": lambda v: [(*x[:-1], _props(x[-1])) for x in v],
        "wires": lambda v: [live.Wire(w["key"], [tuple(e) for e in w["ends"]], w["mtu"], _props(w["props"]))
                            for w in v],
        "ns_ops": lambda v: {ns: [_op_from_json(op) for op in ops] for ns, ops in v.items()},
        "vms": lambda v: [GuestSpec.from_dict(g) for g in v],
    }
    known = {f.name for f in dataclasses.fields(live.Plan)}
    unknown = set(d) - known
    if unknown:
        raise ManifestError(f"manifest network has fields this host's netlang does not know: "
                            f"{', '.join(sorted(unknown))} (different megafleet versions?)")
    return live.Plan(**{k: convert[k](v) if k in convert else v for k, v in d.items()})


def _op_to_json(op) -> list:
    """A netlink operation (netlang.netlink: LinkUp, AddrAdd, RouteAdd) as [kind, fields]."""
    return [type(op).__name__, dataclasses.asdict(op)]


def _op_from_json(item: list):
    from megafleet.netlang import netlink

    kind, fields = item
    if kind not in NETLINK_OPS:
        raise ManifestError(f"unknown namespace operation {kind!r} in a manifest")
    return getattr(netlink, kind)(**fields)


NETLINK_OPS = ("LinkUp", "AddrAdd", "RouteAdd")


# ---------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------

@dataclass
class Vxlan:
    """One spanning segment's tunnel end on one host."""

    bridge: str          # the local bridge of the segment
    segment: str         # "switch" or "switch/vlan"
    vni: int
    ifname: str          # the vxlan device
    local: str           # this host's underlay address
    remotes: list[str]   # the other hosts' underlay addresses
    mtu: int


@dataclass
class HostManifest:
    testbed: str
    host: str
    net: dict[str, Any]                       # plan_to_json of this host's share
    vxlan: list[Vxlan] = field(default_factory=list)
    ksm: bool = True                          # run the ksm daemon
    telemetry: str | None = None              # store URI; None: SQLite in the state dir
    collect_interval: float = 5.0
    vm_options: dict[str, Any] = field(default_factory=dict)   # timeout_s, retries, ...
    state_dir: str | None = None              # override $MEGAFLEET_STATE (test fleets)
    run_dir: str | None = None                # override $MEGAFLEET_RUN
    cache_dir: str | None = None              # override $MEGAFLEET_CACHE
    source: str = ""                          # the description file, for status

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-able data. `net` is shared, not copied (it is
        already plain data): do not modify the result's `net`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vxlan"] = [dataclasses.asdict(x) for x in self.vxlan]
        d["vm_options"] = dict(self.vm_options)
        d["digest"] = self.digest()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HostManifest":
        d = {k: v for k, v in d.items() if k != "digest"}
        try:
            d["vxlan"] = [Vxlan(**x) for x in d.get("vxlan", [])]
            return cls(**d)
        except TypeError as exc:
            raise ManifestError(f"malformed host manifest: {exc}") from None

    def digest(self) -> str:
        """What decides whether a running testbed matches this manifest: its network
        and guests (daemon settings may change between two applies)."""
        body = {"testbed": self.testbed, "host": self.host, "net": self.net,
                "vxlan": [dataclasses.asdict(x) for x in self.vxlan]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def counts(self) -> dict[str, int]:
        vms = self.net["vms"]
        return {"namespaces": len(self.net["netns"]), "routers": len(self.net["routers"]),
                "vms": sum(1 for v in vms if v["driver"] != "container"),
                "containers": sum(1 for v in vms if v["driver"] == "container"),
                "bridges": len(self.net["bridges"]), "vxlan": len(self.vxlan)}


# ---------------------------------------------------------------------------
# Placement demands
# ---------------------------------------------------------------------------

def segment_key(switch: str, vlan: int | None) -> str:
    return switch if vlan is None else f"{switch}/{vlan}"


def demands(net, p) -> list[NodeDemand]:
    """What each node asks of a host. A node's segment is its first switch (with
    VLAN), except that nodes joined by point-to-point links, or on a VDE switch,
    share one segment: those links cannot cross hosts."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    ns_node = {ns: node for node, ns in p.netns.items()}
    for ns_a, _, ns_b, *_ in p.p2p:
        union(ns_node[ns_a], ns_node[ns_b])
    for wire in p.wires:
        nodes = [ns_node[e[1]] for e in wire.ends if e[0] == "ns"]
        for other in nodes[1:]:
            union(nodes[0], other)
    first_port: dict[str, Any] = {}
    for port in p.ports:
        first_port.setdefault(port.node, port)
    vde_members: dict[str, list[str]] = {}
    for port in p.ports:
        if port.switch in p.vde:
            vde_members.setdefault(port.switch, []).append(port.node)
    for members in vde_members.values():
        for other in members[1:]:
            union(members[0], other)
    involved = set(parent) | {n for ms in vde_members.values() for n in ms}
    groups: dict[str, list[str]] = {}
    for n in involved:
        groups.setdefault(find(n), []).append(n)
    tied = {n: root for root, ms in groups.items() if len(ms) > 1 for n in ms}
    vm_spec = {v.name: v for v in p.vms}

    out = []
    for _, _, node in net.iter_nodes():
        if node in tied:
            segment = "tied:" + tied[node]
        elif node in first_port:
            port = first_port[node]
            segment = segment_key(port.switch, port.vlan)
        else:
            segment = "node:" + node
        spec = vm_spec.get(node)
        if spec is None:
            out.append(NodeDemand(node, segment, NAMESPACE_MB, ""))
        else:  # placement charges the driver's footprint (megafleet.vm.driver registry)
            out.append(NodeDemand(node, segment, spec.mem_mb, spec.image, driver=spec.driver))
    return out


# ---------------------------------------------------------------------------
# Cutting the plan into host manifests
# ---------------------------------------------------------------------------

def layout(p, placement: Placement) -> dict[str, Any]:
    """Which host carries each bridge, port, link and wire of the plan; the
    spanning segments (bridges on more than one host) with their VNIs."""
    node_host = placement.node_host
    hosts = sorted(h for h, nodes in placement.hosts.items() if nodes)
    ns_host = {ns: node_host[node] for node, ns in p.netns.items()}
    by_bridge = {br: key for key, (br, _) in p.bridges.items()}
    vms = {v.name: v for v in p.vms}
    container_nodes = {n for n, v in vms.items() if v.driver == "container"}
    # Which hosts carry which bridge (switch/VLAN) and which ports.
    bridge_hosts: dict[tuple, set[str]] = {key: set() for key in p.bridges}
    ports: dict[str, list] = {h: [] for h in hosts}
    for port in p.ports:
        host = node_host[port.node]
        if port.node in container_nodes and port.kind == "tap":
            port = dataclasses.replace(port, kind="cveth")
        ports[host].append(port)
        if (port.switch, port.vlan) in p.bridges:
            bridge_hosts[(port.switch, port.vlan)].add(host)
    vde_hosts: dict[str, set[str]] = {}
    for host, host_ports in ports.items():
        for port in host_ports:
            if port.switch in p.vde:
                vde_hosts.setdefault(port.switch, set()).add(host)
    for sw, hs in vde_hosts.items():
        if len(hs) > 1:
            raise ManifestError(f"VDE switch {sw} would span hosts {', '.join(sorted(hs))}; "
                                "VDE switches must stay on one host")

    p2p: dict[str, list] = {h: [] for h in hosts}
    for link in p.p2p:
        ha, hb = ns_host[link[0]], ns_host[link[2]]
        if ha != hb:
            raise ManifestError(f"point-to-point link {link[0]} -- {link[2]} would cross hosts "
                                f"{ha} and {hb}")
        p2p[ha].append(link)

    def owner_of(br_a: str, br_b: str) -> str:
        for key in (by_bridge[br_a], by_bridge[br_b]):
            if bridge_hosts[key]:
                return min(bridge_hosts[key])
        return hosts[0]

    swlinks: dict[str, list] = {h: [] for h in hosts}
    for link in p.swlinks:
        host = owner_of(link[2], link[3])
        swlinks[host].append(link)
        bridge_hosts[by_bridge[link[2]]].add(host)
        bridge_hosts[by_bridge[link[3]]].add(host)
    wires: dict[str, list] = {h: [] for h in hosts}
    for wire in p.wires:
        ns_ends = [e for e in wire.ends if e[0] == "ns"]
        if ns_ends:
            hs = {ns_host[e[1]] for e in ns_ends}
            if len(hs) > 1:
                raise ManifestError(f"impaired link {wire.key} would cross hosts {', '.join(sorted(hs))}")
            host = hs.pop()
        else:
            brs = [e[1] for e in wire.ends if e[0] == "bridge"]
            host = owner_of(brs[0], brs[-1])
        wires[host].append(wire)
        for e in wire.ends:
            if e[0] == "bridge":
                bridge_hosts[by_bridge[e[1]]].add(host)
    for key, hs in bridge_hosts.items():
        if not hs and hosts:
            hs.add(hosts[0])       # a switch nothing is attached to: keep it somewhere

    # Spanning segments, VNIs in a stable order.
    spanning = sorted((k for k, hs in bridge_hosts.items() if len(hs) > 1),
                      key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    from megafleet.placement import VXLAN_VNI_BASE
    return {"hosts": hosts, "bridge_hosts": bridge_hosts, "ports": ports, "p2p": p2p,
            "swlinks": swlinks, "wires": wires, "vde_hosts": vde_hosts, "spanning": spanning,
            "vni": {key: VXLAN_VNI_BASE + i for i, key in enumerate(spanning)}}


def spanning_segments(p, placement: Placement) -> list[dict[str, Any]]:
    """The segments that will span hosts: [{segment, vni, hosts}]."""
    lay = layout(p, placement)
    return [{"segment": segment_key(*k), "vni": lay["vni"][k], "hosts": sorted(lay["bridge_hosts"][k])}
            for k in lay["spanning"]]


def split(p, placement: Placement, *, addresses: dict[str, str] | None = None,
          underlay_mtu: int = 1500, images: dict[str, str] | None = None,
          **common: Any) -> dict[str, HostManifest]:
    """One manifest per host of `placement` (hosts without nodes get none).

    `addresses`: each host's underlay address for VXLAN (needed when a segment
    spans hosts); `underlay_mtu`: the smallest underlay MTU between the hosts;
    `images`: image name in the description -> image name in the store;
    `common`: further HostManifest fields (ksm, telemetry, ...)."""
    from megafleet.vm.manifest import GuestSpec, NicSpec

    lay = layout(p, placement)
    hosts, bridge_hosts, ports = lay["hosts"], lay["bridge_hosts"], lay["ports"]
    p2p, swlinks, wires, vde_hosts = lay["p2p"], lay["swlinks"], lay["wires"], lay["vde_hosts"]
    spanning, vni = lay["spanning"], lay["vni"]
    vms = {v.name: v for v in p.vms}
    if spanning and not addresses:
        raise ManifestError("segments span hosts but no underlay addresses were given")
    # MTU lowered where VXLAN's 50 bytes do not fit in the underlay's MTU.
    mtu_of = {key: mtu for key, (_, mtu) in p.bridges.items()}
    for key in spanning:
        mtu_of[key] = min(mtu_of[key], underlay_mtu - VXLAN_OVERHEAD)

    images = images or {}
    # Everything grouped by host once: selecting each host's share from the
    # whole plan for every host was hosts x nodes steps (4,480 x 1,000,000).
    node_host = placement.node_host
    netns_of: dict[str, dict[str, str]] = {h: {} for h in hosts}
    ns_host: dict[str, str] = {}
    for n, ns in p.netns.items():
        netns_of[node_host[n]][n] = ns
        ns_host[ns] = node_host[n]
    per_ns_of: dict[str, dict[str, dict]] = {h: {} for h in hosts}
    for f in dataclasses.fields(p):
        if f.name.startswith("ns_"):
            for h in hosts:
                per_ns_of[h][f.name] = {}
            for ns, v in getattr(p, f.name).items():
                h = ns_host.get(ns)
                if h is not None:
                    per_ns_of[h][f.name][ns] = v
    bridges_of: dict[str, dict] = {h: {} for h in hosts}
    for k, v in p.bridges.items():
        for h in bridge_hosts[k]:
            bridges_of[h][k] = v
    vde_of: dict[str, dict] = {h: {} for h in hosts}
    for sw, path in p.vde.items():
        for h in vde_hosts.get(sw, ()):
            vde_of[h][sw] = path
    routers_of: dict[str, list] = {h: [] for h in hosts}
    for r in p.routers:
        routers_of[node_host[r]].append(r)
    frr_of: dict[str, dict] = {h: {} for h in hosts}
    for r, c in p.frr.items():
        frr_of[node_host[r]][r] = c
    vm_frr_of: dict[str, dict] = {h: {} for h in hosts}
    for r, c in p.vm_frr.items():
        vm_frr_of[node_host[r]][r] = c
    vms_of: dict[str, list] = {h: [] for h in hosts}
    for name in sorted(vms):
        vms_of[node_host[name]].append(vms[name])
    tunnels_of: dict[str, list] = {h: [] for h in hosts}
    for key in spanning:
        members = sorted(bridge_hosts[key])
        for host in members:
            tunnels_of[host].append(Vxlan(
                bridge=p.bridges[key][0], segment=segment_key(*key), vni=vni[key],
                ifname=ifname(p.name, "x", str(vni[key])), local=addresses[host],
                remotes=[addresses[h] for h in members if h != host],
                mtu=mtu_of[key]))

    manifests: dict[str, HostManifest] = {}
    for host in hosts:
        netns = netns_of[host]
        host_ports = []
        for port in ports[host]:
            key = (port.switch, port.vlan)
            if key in mtu_of and port.mtu > mtu_of[key]:
                port = dataclasses.replace(port, mtu=mtu_of[key])
            host_ports.append(port)
        mtu_by_ns: dict[str, dict[str, int]] = {}
        ports_by_node: dict[str, list] = {}
        for port in host_ports:
            mtu_by_ns.setdefault(port.ns, {})[port.eth] = port.mtu
            ports_by_node.setdefault(port.node, []).append(port)
        per_ns = per_ns_of[host]
        per_ns["ns_ops"] = {ns: _fix_mtu_ops(ops, mtu_by_ns.get(ns, {})) for ns, ops in per_ns["ns_ops"].items()}
        guests = [_guest_for_host(spec, ports_by_node.get(spec.name, []), p.name, images, GuestSpec, NicSpec)
                  for spec in vms_of[host]]
        sub = dataclasses.replace(
            p, netns=netns,
            # Bridges keep the switch's MTU: a Linux bridge follows the smallest of
            # its ports (all lowered together), and `ip` reads `mtu` after
            # `type bridge` as a bridge option.
            bridges=bridges_of[host], vde=vde_of[host],
            ports=host_ports, p2p=p2p[host], swlinks=swlinks[host], wires=wires[host],
            **per_ns, routers=routers_of[host], frr=frr_of[host], vm_frr=vm_frr_of[host],
            vms=guests, digest="")
        manifests[host] = HostManifest(testbed=p.name, host=host, net=plan_to_json(sub),
                                       vxlan=tunnels_of[host], **common)
    return manifests


def _fix_mtu_ops(ops: list, want: dict[str, int]) -> list:
    """The namespace's configuration with each port's (possibly lowered) MTU
    (`want`: the namespace's interface -> MTU)."""
    out = []
    for op in ops:
        if type(op).__name__ == "LinkUp" and op.dev in want:
            op = dataclasses.replace(op, mtu=want[op.dev] if want[op.dev] != 1500 else None)
        out.append(op)
    return out


def _guest_for_host(spec, node_ports: list, testbed: str, images: dict[str, str], GuestSpec, NicSpec):
    """The guest spec as this host runs it: container NICs as veths, NIC MTUs as
    the segment has them, the image as the store names it. `node_ports`: this
    guest's ports on the host."""
    from megafleet.imagegen.contract import NicConfig

    port_of = {port.host_if: port for port in node_ports}
    nics, configs = [], []
    config = spec.guest_config()
    for i, nic in enumerate(spec.nics):
        port = port_of.get(nic.ifname)
        if port is not None and port.kind == "cveth":
            nic = NicSpec(mac=nic.mac, kind="veth", ifname=nic.ifname,
                          peer=container_peer(testbed, nic.ifname))
        nics.append(nic)
        if i < len(config.nics):
            c = config.nics[i]
            if port is not None and port.mtu != (c.mtu or 1500):
                c = NicConfig(c.mac, c.addresses, port.mtu)
            configs.append(c)
    config = dataclasses.replace(config, nics=tuple(configs))
    return dataclasses.replace(spec, image=images.get(spec.image, spec.image), nics=tuple(nics),
                               config=config)


def container_peer(testbed: str, host_if: str) -> str:
    """The host-side name of a container NIC's far end until the engine moves it."""
    return ifname(testbed + "c", host_if)
