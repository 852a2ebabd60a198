"""Per-host manifests: what one host must run for one testbed, as plain data.

The controller (`megafleet.up`) compiles the description once, lets netlang plan
every resource of the whole testbed (`netlang.live.plan`, a typed
`netlang.hostplan.Plan`), places the nodes on hosts (`megafleet.placement`) and
cuts the plan into one `HostManifest` per host; `megafleet.host` applies a
manifest on its host through netlang's one `live.apply`. A manifest is JSON all
the way down (the plan serialises itself), so it travels through gproc unchanged.

Cutting the plan:

- a node's namespace, ports, FRR configuration and guest spec go to its host;
- a switch (or one VLAN of it) becomes a bridge on every host that has a port on
  it; a bridge present on more than one host is a *spanning segment*: its copies
  are joined by VXLAN, one VNI per segment, each host sending to every other
  host's underlay address (head-end replication; the kernel learns the rest);
  a leaf of a bridge tree goes to every host with a port on it, with its root;
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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from megafleet.names import IfNames
from megafleet.netlang.hostplan import VXLAN_PORT, Bridge, Plan, PlanError, Vxlan  # noqa: F401 (VXLAN_PORT: re-exported)
from megafleet.placement import NodeDemand, Plan as Placement

VXLAN_OVERHEAD = 50
# Memory a namespace node costs on a host, in MB: almost nothing. A guest costs
# its driver's footprint (megafleet.vm.driver.DRIVER_KINDS), counted by placement.
NAMESPACE_MB = 4


class ManifestError(ValueError):
    pass


def plan_to_json(p: Plan) -> dict[str, Any]:
    """A plan as JSON-able data (`Plan.to_json`)."""
    return p.to_json()


def plan_from_json(d: dict[str, Any]) -> Plan:
    """The plan that `plan_to_json` wrote. Raises ManifestError when it is not one
    this host's netlang reads."""
    try:
        return Plan.from_json(d)
    except PlanError as exc:
        raise ManifestError(f"manifest network: {exc}") from None


# ---------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------

@dataclass
class HostManifest:
    testbed: str
    host: str
    net: dict[str, Any]                       # Plan.to_json of this host's share (with its VXLAN tunnels)
    ksm: bool = True                          # run the ksm daemon
    telemetry: str | None = None              # store URI; None: SQLite in the state dir
    collect_interval: float = 5.0
    vm_options: dict[str, Any] = field(default_factory=dict)   # timeout_s, retries, ...
    state_dir: str | None = None              # override $MEGAFLEET_STATE (test fleets)
    run_dir: str | None = None                # override $MEGAFLEET_RUN
    cache_dir: str | None = None              # override $MEGAFLEET_CACHE
    source: str = ""                          # the description file, for status
    # node -> file:line of each `exec` statement (netlang.nsexec.statement_locs):
    # a failed startup command names its line. Not in the digest (nor the plan):
    # moving a line changes nothing that runs.
    exec_locs: dict[str, list[str]] = field(default_factory=dict)
    # digest()'s memo: ((testbed, host), the `net` object, its digest). Not
    # data of the manifest: not in to_json, equality or repr.
    _digest_memo: tuple[tuple[str, str], dict[str, Any], str] | None = field(
        default=None, init=False, repr=False, compare=False)

    @property
    def vxlan(self) -> list[Vxlan]:
        """This host's tunnel ends of spanning segments."""
        return [Vxlan.from_json(x) for x in self.net.get("vxlan", [])]

    def bridges(self) -> list[Bridge]:
        """The bridges of this host's share (roots before leaves)."""
        return [Bridge.from_json(b) for b in self.net.get("bridges", [])]

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-able data. `net` is shared, not copied (it is
        already plain data): do not modify the result's `net`."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["vm_options"] = dict(self.vm_options)
        d["digest"] = self.digest()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HostManifest":
        d = {k: v for k, v in d.items() if k != "digest"}
        try:
            return cls(**d)
        except TypeError as exc:
            raise ManifestError(f"malformed host manifest: {exc}") from None

    def digest(self) -> str:
        """What decides whether a running testbed matches this manifest: its network
        and guests (daemon settings may change between two applies). Computed
        once per (testbed, host, net object): `net` is plain data nobody
        modifies (see to_json), and an apply asked for it three times, each a
        JSON text of every guest."""
        memo = self._digest_memo
        if memo is None or memo[0] != (self.testbed, self.host) or memo[1] is not self.net:
            body = {"testbed": self.testbed, "host": self.host, "net": self.net}
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            memo = self._digest_memo = ((self.testbed, self.host), self.net, digest)
        return memo[2]

    def counts(self) -> dict[str, int]:
        from megafleet.vm.driver import DRIVER_KINDS

        # Each driver says which column counts its guests.
        columns = {"vms": 0, "containers": 0}
        for v in self.net["vms"]:
            columns[DRIVER_KINDS[v["driver"]].summary_column] += 1
        return {"namespaces": len(self.net["netns"]), "routers": len(self.net["routers"]),
                **columns,
                "bridges": len(self.net["bridges"]), "vxlan": len(self.net.get("vxlan", []))}


# ---------------------------------------------------------------------------
# Placement demands
# ---------------------------------------------------------------------------

def segment_key(switch: str, vlan: int | None) -> str:
    return switch if vlan is None else f"{switch}/{vlan}"


def demands(net, p: Plan) -> list[NodeDemand]:
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

    for link in p.p2p:
        union(link.node_a, link.node_b)
    for wire in p.wires:
        nodes = [e.node for e in wire.ends if e.kind == "ns" and e.node]
        for other in nodes[1:]:
            union(nodes[0], other)
    first_port: dict[str, Any] = {}
    for port in p.ports:
        first_port.setdefault(port.node, port)
    vde_switches = {v.switch for v in p.vde}
    vde_members: dict[str, list[str]] = {}
    for port in p.ports:
        if port.switch in vde_switches:
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

def layout(p: Plan, placement: Placement) -> dict[str, Any]:
    """Which host carries each bridge, port, link and wire of the plan; the
    spanning segments (root bridges on more than one host) with their VNIs."""
    node_host = placement.node_host
    hosts = sorted(h for h, nodes in placement.hosts.items() if nodes)
    ns_host = {ns: node_host[node] for node, ns in p.netns.items()}
    # Every bridge (root or leaf) -> its switch/VLAN.
    by_bridge = {b.ifname: (b.switch, b.vlan) for b in p.bridges}
    bridge_hosts: dict[tuple, set[str]] = {(b.switch, b.vlan): set() for b in p.root_bridges()}
    leaf_hosts: dict[str, set[str]] = {b.ifname: set() for b in p.bridges if b.root}
    ports: dict[str, list] = {h: [] for h in hosts}
    vde_switches = {v.switch for v in p.vde}
    vde_hosts: dict[str, set[str]] = {}
    for port in p.ports:
        host = node_host[port.node]
        ports[host].append(port)
        if port.bridge is not None:
            bridge_hosts[by_bridge[port.bridge]].add(host)
            if port.bridge in leaf_hosts:
                leaf_hosts[port.bridge].add(host)
        if port.switch in vde_switches:
            vde_hosts.setdefault(port.switch, set()).add(host)
    for sw, hs in vde_hosts.items():
        if len(hs) > 1:
            raise ManifestError(f"VDE switch {sw} would span hosts {', '.join(sorted(hs))}; "
                                "VDE switches must stay on one host")

    p2p: dict[str, list] = {h: [] for h in hosts}
    for link in p.p2p:
        ha, hb = ns_host[link.ns_a], ns_host[link.ns_b]
        if ha != hb:
            raise ManifestError(f"point-to-point link {link.node_a} -- {link.node_b} would cross hosts "
                                f"{ha} and {hb}")
        p2p[ha].append(link)

    def owner_of(br_a: str, br_b: str) -> str:
        for key in (by_bridge[br_a], by_bridge[br_b]):
            if bridge_hosts[key]:
                return min(bridge_hosts[key])
        return hosts[0]

    trunks: dict[str, list] = {h: [] for h in hosts}
    for trunk in p.trunks:
        host = owner_of(trunk.bridge_a, trunk.bridge_b)
        trunks[host].append(trunk)
        bridge_hosts[by_bridge[trunk.bridge_a]].add(host)
        bridge_hosts[by_bridge[trunk.bridge_b]].add(host)
    wires: dict[str, list] = {h: [] for h in hosts}
    for wire in p.wires:
        ns_ends = [e for e in wire.ends if e.kind == "ns"]
        if ns_ends:
            hs = {ns_host[e.where] for e in ns_ends}
            if len(hs) > 1:
                raise ManifestError(f"impaired link {wire.key} would cross hosts {', '.join(sorted(hs))}")
            host = hs.pop()
        else:
            brs = [e.where for e in wire.ends if e.kind == "bridge"]
            host = owner_of(brs[0], brs[-1])
        wires[host].append(wire)
        for e in wire.ends:
            if e.kind == "bridge":
                bridge_hosts[by_bridge[e.where]].add(host)
    for key, hs in bridge_hosts.items():
        if not hs and hosts:
            hs.add(hosts[0])       # a switch nothing is attached to: keep it somewhere

    # Spanning segments, VNIs in a stable order.
    spanning = sorted((k for k, hs in bridge_hosts.items() if len(hs) > 1),
                      key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    from megafleet.placement import VXLAN_VNI_BASE
    return {"hosts": hosts, "bridge_hosts": bridge_hosts, "leaf_hosts": leaf_hosts, "ports": ports,
            "p2p": p2p, "trunks": trunks, "wires": wires, "vde_hosts": vde_hosts, "spanning": spanning,
            "vni": {key: VXLAN_VNI_BASE + i for i, key in enumerate(spanning)}}


def spanning_segments(p: Plan, placement: Placement) -> list[dict[str, Any]]:
    """The segments that will span hosts: [{segment, vni, hosts}]."""
    lay = layout(p, placement)
    return [{"segment": segment_key(*k), "vni": lay["vni"][k], "hosts": sorted(lay["bridge_hosts"][k])}
            for k in lay["spanning"]]


def split(p: Plan, placement: Placement, *, addresses: dict[str, str] | None = None,
          underlay_mtu: int = 1500, images: dict[str, str] | None = None,
          **common: Any) -> dict[str, HostManifest]:
    """One manifest per host of `placement` (hosts without nodes get none), as
    `iter_split` makes them, all at once."""
    return dict(iter_split(p, placement, addresses=addresses, underlay_mtu=underlay_mtu, images=images,
                           **common))


def iter_split(p: Plan, placement: Placement, *, addresses: dict[str, str] | None = None,
               underlay_mtu: int = 1500, images: dict[str, str] | None = None,
               **common: Any) -> Iterator[tuple[str, HostManifest]]:
    """(host, manifest) for each host of `placement` (hosts without nodes get
    none), in host order, one at a time: a caller that turns each into its JSON
    text at once never holds every host's manifest as objects (at a million
    guests, each router's route to every subnet made those the controller's
    largest memory).

    `addresses`: each host's underlay address for VXLAN (needed when a segment
    spans hosts); `underlay_mtu`: the smallest underlay MTU between the hosts;
    `images`: image name in the description -> image name in the store;
    `common`: further HostManifest fields (ksm, telemetry, ...)."""
    lay = layout(p, placement)
    hosts, bridge_hosts, leaf_hosts, ports = lay["hosts"], lay["bridge_hosts"], lay["leaf_hosts"], lay["ports"]
    p2p, trunks, wires, vde_hosts = lay["p2p"], lay["trunks"], lay["wires"], lay["vde_hosts"]
    spanning, vni = lay["spanning"], lay["vni"]
    vms = {v.name: v for v in p.vms}
    if spanning and not addresses:
        raise ManifestError("segments span hosts but no underlay addresses were given")
    # MTU lowered where VXLAN's 50 bytes do not fit in the underlay's MTU.
    mtu_of = {(b.switch, b.vlan): b.mtu for b in p.root_bridges()}
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
    ops_of: dict[str, dict] = {h: {} for h in hosts}
    for ns, ops in p.ns_ops.items():
        if ns in ns_host:
            ops_of[ns_host[ns]][ns] = ops
    sysctls_of: dict[str, dict] = {h: {} for h in hosts}
    for ns, v in p.ns_sysctls.items():
        if ns in ns_host:
            sysctls_of[ns_host[ns]][ns] = v
    exec_of: dict[str, dict] = {h: {} for h in hosts}
    for ns, cmds in p.ns_exec.items():
        if ns in ns_host:
            exec_of[ns_host[ns]][ns] = cmds
    bridges_of: dict[str, list[Bridge]] = {h: [] for h in hosts}
    for b in p.bridges:
        for h in sorted(bridge_hosts[(b.switch, b.vlan)] if b.root is None else leaf_hosts[b.ifname]):
            bridges_of[h].append(b)
    vde_of: dict[str, list] = {h: [] for h in hosts}
    for vs in p.vde:
        for h in vde_hosts.get(vs.switch, ()):
            vde_of[h].append(vs)
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
    tunnels_of: dict[str, list[Vxlan]] = {h: [] for h in hosts}
    if spanning:
        assert addresses is not None
        # Tunnel names from an allocator that knows every name of the plan.
        alloc = IfNames(p.name, taken=set(p.host_names()))
        roots = {(b.switch, b.vlan): b for b in p.root_bridges()}
        for key in spanning:
            members = sorted(bridge_hosts[key])
            name = alloc("x", str(vni[key]))
            for host in members:
                tunnels_of[host].append(Vxlan(
                    bridge=roots[key].ifname, segment=segment_key(*key), vni=vni[key], ifname=name,
                    local=addresses[host], remotes=tuple(addresses[h] for h in members if h != host),
                    mtu=mtu_of[key]))

    for host in hosts:
        host_ports = []
        for port in ports[host]:
            key = (port.switch, port.vlan)
            if key in mtu_of and port.mtu > mtu_of[key]:
                port = dataclasses.replace(port, mtu=mtu_of[key])
            host_ports.append(port)
        mtu_by_ns: dict[str, dict[str, int]] = {}
        ports_by_node: dict[str, list] = {}
        for port in host_ports:
            port_ns, eth = getattr(port, "ns", None), getattr(port, "eth", None)
            if port_ns and eth:
                mtu_by_ns.setdefault(port_ns, {})[eth] = port.mtu
            ports_by_node.setdefault(port.node, []).append(port)
        ns_ops = {ns: _fix_mtu_ops(ops, mtu_by_ns.get(ns, {})) for ns, ops in ops_of[host].items()}
        guests = [_guest_for_host(spec, ports_by_node.get(spec.name, []), images) for spec in vms_of[host]]
        sub = Plan(
            p.name, netns=netns_of[host],
            # Bridges keep the switch's MTU: a Linux bridge follows the smallest of
            # its ports (all lowered together), and `ip` reads `mtu` after
            # `type bridge` as a bridge option.
            bridges=bridges_of[host], vde=vde_of[host], ports=host_ports, p2p=p2p[host],
            trunks=trunks[host], wires=wires[host], vxlan=tunnels_of[host], ns_ops=ns_ops,
            ns_sysctls=sysctls_of[host], ns_exec=exec_of[host], routers=routers_of[host], frr=frr_of[host],
            vm_frr=vm_frr_of[host], vms=guests, digest="")
        yield host, HostManifest(testbed=p.name, host=host, net=sub.to_json(), **common)


def _fix_mtu_ops(ops: list, want: dict[str, int]) -> list:
    """The namespace's configuration with each port's (possibly lowered) MTU
    (`want`: the namespace's interface -> MTU)."""
    out = []
    for op in ops:
        if type(op).__name__ == "LinkUp" and op.dev in want:
            op = dataclasses.replace(op, mtu=want[op.dev] if want[op.dev] != 1500 else None)
        out.append(op)
    return out


def _guest_for_host(spec, node_ports: list, images: dict[str, str]):
    """The guest spec as this host runs it: NIC MTUs as the segment has them, the
    image as the store names it. `node_ports`: this guest's ports on the host."""
    from megafleet.imagegen.contract import NicConfig

    port_of = {port.host_if: port for port in node_ports}
    configs = []
    nics = []
    config = spec.guest_config()
    for i, nic in enumerate(spec.nics):
        port = port_of.get(nic.ifname)
        if i < len(config.nics):
            c = config.nics[i]
            if port is not None and port.mtu != (c.mtu or 1500):
                c = NicConfig(c.mac, c.addresses, port.mtu)
            configs.append(c)
        # A veth the container launcher makes: its ends get the segment's MTU
        # on this host, on the bridge the host's port is on.
        if nic.bridge is not None and port is not None and (nic.mtu, nic.bridge) != (port.mtu, port.bridge):
            nic = dataclasses.replace(nic, mtu=port.mtu, bridge=port.bridge)
        nics.append(nic)
    image = images.get(spec.image, spec.image)
    if (spec.config is not None and tuple(configs) == tuple(config.nics) and image == spec.image
            and all(a is b for a, b in zip(nics, spec.nics))):
        return spec          # nothing changes: share it (a million guests, a million fewer copies)
    config = dataclasses.replace(config, nics=tuple(configs))
    return dataclasses.replace(spec, image=image, config=config, nics=tuple(nics))
