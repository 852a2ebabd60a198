"""containerlab topologies (`*.clab.yml`) to `.fleet`, and compiled testbeds back.

What maps to what (containerlab's topology schema, `topology.nodes` / `links` /
`mgmt`):

- `kind: linux` -> a namespace host; a linux node whose image is FRR's
  (`frrouting/frr...`) and every router kind (`frr`, `nokia_srlinux`, `ceos`,
  `crpd`, `vr-*`, `cisco_*`, `juniper_*`, ...) -> a router, with a warning that
  its vendor configuration (startup-config, binds) is not carried over: it
  routes as `--routing` says (static routes from the graph by default);
- `kind: bridge` / `ovs-bridge` -> a switch;
- `links: - endpoints: ["a:eth1", "b:eth1"]` and the extended form
  (`type: veth`, `endpoints: [{node, interface}]`) -> point-to-point links
  `link a:eth1 -- b:eth1` that keep the interface names (names that are not
  Linux interface names, e.g. `ethernet-1/1`, become `ethernet-1-1`, with a
  warning); a link to a bridge -> an interface on that switch;
- `mgmt` (network, ipv4-subnet; containerlab's default 172.20.20.0/24 when
  absent) -> switch `mgmt`, every node's `eth0` on it at its `mgmt-ipv4`.
  Routers join it without an address so routing never leaks through it (the
  vendor NOSes keep it in a management VRF);
- `exec` -> the node's startup commands (`exec "CMD"`, run in its namespace
  after the testbed is up, in order, as containerlab runs them); commands
  that cannot be carried stay as comments and are reported: those of container
  guests (`--linux container`) and bridges, and command lines the language
  cannot quote (holding both `"` and `'`, or a `$NAME`, which would be read as
  a parameter);
- impairments: containerlab sets them at run time (`containerlab tools netem
  set --delay --jitter --loss --rate`); the same keys on a link (`delay: 10ms`,
  `jitter: 1ms`, `loss: 5` %, `rate: 1000` kbit/s) are kept;
- `type: vxlan` / `vxlan-stitch` links of the multi-host pair style: imported
  together (`megafleet import a.clab.yml b.clab.yml`), the two ends with the
  same `vni` become one point-to-point link of one testbed (megafleet places the
  nodes and spans hosts with VXLAN itself); an end whose partner is not among
  the files is reported;
- everything else (image, binds, env, ports, startup-config, `host`,
  `mgmt-net`, `macvlan` links, ...) is reported node by node with file:line.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from megafleet.netlang.errors import Loc
from megafleet.netlang.parser import _PARAM_RE
from megafleet.netlang.importers.common import (FleetWriter, ImportFailed, ImportOptions, Imported,
                                                 Namer, Note, YList, YMap, fmt_delay_us, header,
                                                 ifname_for, item_loc, load_yaml, private_as,
                                                 readable, router_routing)

DEFAULT_MGMT_V4 = "172.20.20.0/24"
SWITCH_KINDS = ("bridge", "ovs-bridge")
HOST_KINDS = ("linux",)
# Kinds of network operating systems (and FRR): routers whose configuration stays behind.
ROUTER_KIND_PREFIXES = ("frr", "nokia_", "srl", "vr-", "ceos", "arista_", "crpd", "juniper_",
                        "cisco_", "xrd", "c8000", "sonic", "vyos", "mikrotik_", "fortinet_",
                        "paloalto_", "ipinfusion_", "huawei_", "cumulus_", "cvx", "6wind_",
                        "dell_", "aruba_", "openbsd", "freebsd", "openwrt", "checkpoint_",
                        "rare", "bird", "c8000v", "cisco", "sros", "xrv", "vsrx", "vmx", "vqfx")
# Node keys the importer reads; the others are reported.
READ_KEYS = {"kind", "group", "mgmt-ipv4", "mgmt-ipv6", "exec"}
IMPAIRMENT_KEYS = ("delay", "jitter", "loss", "rate")


@dataclass
class _Node:
    name: str              # in the .fleet
    orig: str              # in the lab
    lab: str
    loc: Loc
    role: str              # host | router | switch
    kind: str
    mgmt4: str | None = None
    mgmt6: str | None = None
    exec_: list[tuple[str, Loc]] = field(default_factory=list)


@dataclass
class _End:
    node: str              # original name
    iface: str
    loc: Loc


@dataclass
class _Link:
    a: _End
    b: _End
    loc: Loc
    words: str = ""        # mtu and impairments, as .fleet words


@dataclass
class _Vxlan:
    end: _End
    remote: str
    vni: Any
    port: Any
    loc: Loc


def role_of(kind: str, image: str | None) -> str:
    """host | router | switch | "" (no equivalent) for a containerlab kind."""
    if kind in SWITCH_KINDS:
        return "switch"
    if kind in HOST_KINDS:
        return "router" if image and "frr" in image.split("/")[-1].lower() else "host"
    if kind.startswith(ROUTER_KIND_PREFIXES):
        return "router"
    return ""


class _Lab:
    """One topology file, read into nodes and links (errors collected)."""

    def __init__(self, file: str, text: str, errors: list[Note], warnings: list[Note]):
        self.file, self.text, self.errors, self.warnings = file, text, errors, warnings
        self.nodes: dict[str, _Node] = {}
        self.links: list[_Link] = []
        self.vxlans: list[_Vxlan] = []
        self.mgmt: tuple[str | None, str | None, str, Loc] | None = None
        root = load_yaml(text, file)
        here = Loc(file, 1, 1)
        if not isinstance(root, YMap):
            raise ImportFailed([Note(here, "a containerlab topology is a mapping with 'name' and "
                                           "'topology'")], {file: text})
        self.name = str(root.get("name") or "lab")
        topo = root.get("topology")
        if not isinstance(topo, YMap):
            raise ImportFailed([Note(root.at("topology") if "topology" in root else here,
                                     "'topology' must be a mapping with 'nodes' and 'links'")],
                               {file: text})
        self._mgmt(root)
        self._nodes(topo)
        self._links(topo)

    def err(self, loc: Loc, msg: str) -> None:
        self.errors.append(Note(loc, msg))

    def warn(self, loc: Loc, msg: str) -> None:
        self.warnings.append(Note(loc, msg))

    def _mgmt(self, root: YMap) -> None:
        m = root.get("mgmt")
        if m is None:
            self.mgmt = (DEFAULT_MGMT_V4, None, "clab", Loc(self.file, 1, 1))
            return
        if not isinstance(m, YMap):
            self.err(root.vat("mgmt"), "'mgmt' must be a mapping (network, ipv4-subnet, ...)")
            return
        v4 = m.get("ipv4-subnet") or DEFAULT_MGMT_V4
        v6 = m.get("ipv6-subnet")
        for k in m:
            if k not in ("network", "ipv4-subnet", "ipv6-subnet"):
                self.warn(m.at(k), f"mgmt {k}: not carried over (the management switch is a "
                                   f"plain bridge of the testbed)")
        self.mgmt = (str(v4), str(v6) if v6 else None, str(m.get("network") or "clab"), root.at("mgmt"))

    def _nodes(self, topo: YMap) -> None:
        defaults = topo.get("defaults") or {}
        kinds = topo.get("kinds") or {}
        groups = topo.get("groups") or {}
        nodes = topo.get("nodes")
        if nodes is None:
            self.err(topo.loc, "topology has no 'nodes'")
            return
        if not isinstance(nodes, YMap):
            self.err(topo.vat("nodes"), "'nodes' must be a mapping of node names")
            return
        for orig, spec in nodes.items():
            loc = nodes.at(orig)
            if spec is None:
                spec = YMap()
                spec.loc, spec.key_locs, spec.val_locs = loc, {}, {}
            if not isinstance(spec, YMap):        # load_yaml's mappings
                self.err(nodes.vat(orig), f"node {orig}: expected a mapping of its settings")
                continue
            group = groups.get(spec.get("group")) if isinstance(groups, dict) else None
            group = group if isinstance(group, dict) else {}
            kind = str(spec.get("kind") or group.get("kind") or defaults.get("kind") or "")
            kind_defaults = kinds.get(kind) if isinstance(kinds, dict) else None
            kind_defaults = kind_defaults if isinstance(kind_defaults, dict) else {}
            image = spec.get("image") or group.get("image") or kind_defaults.get("image") \
                or defaults.get("image")
            if not kind:
                self.err(loc, f"node {orig}: no 'kind' (nor in topology.defaults or its group)")
                continue
            role = role_of(kind, str(image) if image else None)
            if not role:
                self.warn(loc, f"node {orig}: kind {kind!r} has no equivalent; imported as a "
                               f"namespace host")
                role = "host"
            node = _Node("", str(orig), self.name, loc, role, kind)
            if role == "router":
                self.warn(loc, f"node {orig}: kind {kind}"
                               + (f" (image {image})" if image else "")
                               + " becomes an FRR router; its vendor configuration (startup-config, "
                                 "binds) is not carried over")
            node.mgmt4 = spec.get("mgmt-ipv4")
            node.mgmt6 = spec.get("mgmt-ipv6")
            ex = spec.get("exec", group.get("exec", kind_defaults.get("exec")))
            if ex is not None:
                cmds = ex if isinstance(ex, list) else [ex]
                node.exec_ = [(str(c), item_loc(ex, i, spec.at("exec"))) for i, c in enumerate(cmds)]
            other = sorted(str(k) for k in spec if k not in READ_KEYS)
            if role != "switch" and other:
                self.warn(spec.at(other[0]), f"node {orig}: not carried over: {', '.join(other)}")
            self.nodes[str(orig)] = node

    def _end(self, text: Any, loc: Loc) -> _End | None:
        if isinstance(text, dict):
            node, iface = text.get("node"), text.get("interface")
            if node is None or iface is None:
                self.err(loc, "an endpoint needs 'node' and 'interface'")
                return None
            extra = sorted(str(k) for k in text if k not in ("node", "interface"))
            if extra:
                self.warn(loc, f"endpoint {node}:{iface}: not carried over: {', '.join(extra)}")
            return _End(str(node), str(iface), loc)
        if not isinstance(text, str) or ":" not in text:
            self.err(loc, f"endpoint {text!r}: expected \"NODE:INTERFACE\"")
            return None
        node, _, iface = text.partition(":")
        return _End(node, iface, loc)

    def _links(self, topo: YMap) -> None:
        links = topo.get("links") or []
        if not isinstance(links, list):
            self.err(topo.vat("links"), "'links' must be a list")
            return
        for i, link in enumerate(links):
            loc = item_loc(links, i, topo.at("links"))
            if not isinstance(link, dict):
                self.err(loc, "a link must be a mapping with 'endpoints'")
                continue
            ltype = str(link.get("type") or "veth")
            if ltype in ("vxlan", "vxlan-stitch"):
                end = self._end(link.get("endpoint"), loc)
                if end is not None:
                    self.vxlans.append(_Vxlan(end, str(link.get("remote")), link.get("vni"),
                                              link.get("udp-port", 4789), loc))
                continue
            if ltype in ("host", "mgmt-net", "macvlan", "dummy"):
                end = link.get("endpoint")
                self.warn(loc, f"{ltype} link of {self._show(end)}: no equivalent (the testbed does "
                               f"not reach into this host's own interfaces); not carried over")
                continue
            if ltype != "veth":
                self.warn(loc, f"link type {ltype!r}: no equivalent; not carried over")
                continue
            eps = link.get("endpoints")
            if not isinstance(eps, list) or len(eps) != 2:
                self.err(loc, "a link's 'endpoints' must list two ends")
                continue
            a, b = (self._end(e, item_loc(eps, j, loc)) for j, e in enumerate(eps))   # both reported
            if a is None or b is None:
                continue
            special = [e for e in (a, b) if e.node in ("host", "mgmt-net", "macvlan")]
            if special:
                self.warn(loc, f"link {a.node}:{a.iface} -- {b.node}:{b.iface}: "
                               f"'{special[0].node}' endpoints have no equivalent; not carried over")
                continue
            self.links.append(_Link(a, b, loc, self._link_words(link, loc)))

    @staticmethod
    def _show(end: Any) -> str:
        if isinstance(end, dict):
            return f"{end.get('node')}:{end.get('interface')}"
        return str(end)

    def _link_words(self, link: dict, loc: Loc) -> str:
        words = []
        for k in link:
            v = link[k]
            if k in ("endpoints", "type"):
                continue
            if k == "mtu":
                words.append(f"mtu {v}")
            elif k in ("delay", "jitter"):
                words.append(f"{k} {v}ms" if isinstance(v, (int, float)) else f"{k} {v}")
            elif k == "loss":
                words.append(f"loss {str(v).rstrip('%')}%")
            elif k == "rate":
                # `tools netem --rate` is in kbit/s.
                words.append(f"rate {v}kbit" if isinstance(v, (int, float)) else f"rate {v}")
            else:
                self.warn(link.at(k) if isinstance(link, YMap) else loc,
                          f"link {k}: not carried over")
        return " ".join(words)


def convert(files: list[tuple[str, str]], opts: ImportOptions) -> Imported:
    """containerlab topology files (one lab, or the two halves of a multi-host
    pair) -> one `.fleet` text. Raises ImportFailed naming file:line:col."""
    errors: list[Note] = []
    warnings: list[Note] = []
    texts = dict(files)
    labs: list[_Lab] = []
    for file, text in files:
        labs.append(_Lab(file, text, errors, warnings))
    # Names: a lab's node names stay as they are when valid and unique; the
    # second lab of a pair prefixes its lab name on a clash.
    namer = Namer()
    for reserved in ("mgmt",):
        namer.take(reserved)
    by_lab: dict[tuple[str, str], _Node] = {}
    for lab in labs:
        for orig, node in lab.nodes.items():
            base = readable(orig)
            if base.lower() in namer.used and len(labs) > 1:
                base = readable(f"{lab.name}_{orig}")
            node.name = namer.take(base)
            if node.name != orig:
                warnings.append(Note(node.loc, f"node {orig} is named {node.name} (a valid, unique name)"))
            by_lab[(lab.file, orig)] = node
    links: list[tuple[_Node, str, _Node, str, str, str]] = []   # a, aif, b, bif, words, origin
    for lab in labs:
        for link in lab.links:
            na, nb = by_lab.get((lab.file, link.a.node)), by_lab.get((lab.file, link.b.node))
            for e, n in ((link.a, na), (link.b, nb)):
                if n is None:
                    errors.append(Note(e.loc, f"link endpoint {e.node}:{e.iface} refers to node "
                                              f"{e.node!r}, which is not in topology.nodes"))
            if na is None or nb is None:
                continue
            links.append((na, link.a.iface, nb, link.b.iface, link.words, str(link.loc)))
    # VXLAN ends of a multi-host pair, matched by VNI (and UDP port).
    by_vni: dict[tuple, list[tuple[_Lab, _Vxlan]]] = {}
    for lab in labs:
        for vx in lab.vxlans:
            if (lab.file, vx.end.node) not in by_lab:
                errors.append(Note(vx.end.loc, f"vxlan endpoint {vx.end.node}:{vx.end.iface} refers to "
                                               f"node {vx.end.node!r}, which is not in topology.nodes"))
                continue
            by_vni.setdefault((str(vx.vni), str(vx.port)), []).append((lab, vx))
    for (vni, _port), vx_ends in by_vni.items():
        if len(vx_ends) == 2 and vx_ends[0][0] is not vx_ends[1][0]:
            (la, va), (lb, vb) = vx_ends
            a, b = by_lab[(la.file, va.end.node)], by_lab[(lb.file, vb.end.node)]
            links.append((a, va.end.iface, b, vb.end.iface, "",
                          f"vxlan vni {vni}: {va.loc} and {vb.loc}"))
            warnings.append(Note(va.loc, f"vxlan vni {vni} ({va.end.node}:{va.end.iface} -- "
                                         f"{vb.end.node}:{vb.end.iface}, {vb.loc}) becomes one link; "
                                         f"megafleet places the nodes and tunnels between hosts itself"))
            continue
        for lab, vx in vx_ends:
            warnings.append(Note(vx.loc, f"vxlan link of {vx.end.node}:{vx.end.iface} to {vx.remote} "
                                         f"vni {vni}: its other end is not among the imported files "
                                         f"(import both files of a multi-host pair together); "
                                         f"not carried over"))
    if errors:
        raise ImportFailed(errors, texts)
    routing = opts.routing or "static"
    containers = opts.linux == "container"
    w = FleetWriter()       # the body; the header (with every warning) goes on top at the end
    w.section("addresses: containerlab leaves them to each node's configuration")
    w.stmt("pool lab 10.0.0.0/8")
    if containers:
        w.section("container guests (--linux container)")
        w.stmt(f'image linux from "{opts.image}"')
    mgmts = [lab.mgmt for lab in labs if lab.mgmt is not None]
    if opts.mgmt and mgmts:
        v4, v6, net_name, mloc = mgmts[0]
        w.section("management network")
        subnets = f" subnet {v4}" + (f" subnet {v6}" if v6 else "")
        w.stmt(f"switch mgmt{subnets}", f"{mloc} (mgmt network {net_name})")
    all_nodes = [n for lab in labs for n in lab.nodes.values()]
    w.section("nodes (eth0 on the management switch, as in containerlab)")
    asn = 0
    for n in all_nodes:
        origin = f"{n.loc} (node {n.orig}, kind {n.kind})"
        on = ""
        if opts.mgmt and mgmts and n.role != "switch":
            # Routers join without an address: routing never leaks through mgmt.
            on = " on mgmt " + ("none" if n.role == "router" else (
                " ".join(str(x) for x in (n.mgmt4, n.mgmt6) if x) or "auto"))
        if n.role == "switch":
            w.stmt(f"switch {n.name}", origin)
        elif n.role == "router":
            w.stmt(f"router {n.name}{on}{router_routing(routing, private_as(asn))}", origin)
            asn += 1
        elif containers:
            w.stmt(f"vm {n.name} image linux driver container mem {opts.mem}{on}", origin)
        else:
            w.stmt(f"host {n.name}{on}", origin)
        _exec_lines(w, n, containers, warnings)
    w.section("links")
    # A container guest names its NICs eth0, eth1, ... in order (eth0: mgmt).
    order = {id(n): (1 if opts.mgmt and mgmts else 0) for n in all_nodes}
    for a, aif, b, bif, words, origin in links:
        sides = (_side(a, aif, warnings, origin, order, containers),
                 _side(b, bif, warnings, origin, order, containers))
        guest = containers and "switch" not in (a.role, b.role) and "host" in (a.role, b.role)
        if not guest:
            w.stmt(f"link {sides[0]} -- {sides[1]}" + (f" {words}" if words else ""), origin)
            continue
        # A container guest joins through a switch of its own (no veth straight
        # into a guest); the link's properties go on one side only.
        sw = namer.take(readable(f"{a.name}_{b.name}"))
        w.stmt(f"switch {sw}", f"{origin} (the link {a.name} -- {b.name})")
        w.stmt(f"link {sides[0]} -- {sw}" + (f" {words}" if words else ""), origin)
        w.stmt(f"link {sides[1]} -- {sw}", origin)
    top = FleetWriter()
    header(top, "containerlab", [f for f, _ in files], warnings)
    top.blank()
    top.lines += w.lines
    return Imported("clab", [f for f, _ in files], top.render(), warnings)


def exec_word(cmd: str) -> str | None:
    """A containerlab exec command as the quoted word of `exec "CMD"`, or None
    when the language cannot carry it. containerlab splits the command line
    into argv like a shell's words and runs it without a shell, as megafleet
    does: the text is kept as it is when it has no '"', else re-quoted with
    single quotes."""
    if "\n" in cmd or _PARAM_RE.search(cmd):
        return None
    try:
        argv = shlex.split(cmd)
    except ValueError:
        return None
    if not argv:
        return None
    text = cmd.strip() if '"' not in cmd else shlex.join(argv)
    return None if '"' in text else f'"{text}"'


def _exec_lines(w: FleetWriter, n: _Node, containers: bool, warnings: list[Note]) -> None:
    """A node's exec commands: `exec` lines of its block (the statement just
    written gets the block), or comments and a warning for what cannot be
    carried."""
    if not n.exec_:
        return
    why = ""
    if n.role == "switch":
        why = "a bridge has no namespace to run commands in"
    elif containers and n.role == "host":
        why = "commands for container guests are not carried (they run their image's services)"
    words = [(exec_word(cmd), cmd, cloc) for cmd, cloc in n.exec_]
    if not why:
        carried = [(word, cloc) for word, _, cloc in words if word is not None]
        if carried:
            stmt, sep, origin = w.lines[-1].partition("  # ")
            w.lines[-1] = f"{stmt} {{" + (f"  # {origin}" if sep else "")
            for quoted, cloc in carried:
                w.stmt(f"  exec {quoted}", cloc)
            w.lines.append("}")
    for word, cmd, cloc in words:
        if why or word is None:
            reason = why or "the command line cannot be quoted in a .fleet file (both \" and ', or $NAME)"
            warnings.append(Note(cloc, f"node {n.orig}: exec {cmd!r} not carried over: {reason}"))
            w.comment(f"exec on {n.name} ({cloc}): {cmd}")


def _side(node: _Node, iface: str, warnings: list[Note], origin: str, order: dict[int, int],
          containers: bool) -> str:
    if node.role == "switch":
        return node.name        # a bridge's port names are host interfaces: not kept
    index = order[id(node)]
    order[id(node)] = index + 1
    if containers and node.role == "host":
        if iface != f"eth{index}":
            warnings.append(Note(None, f"{origin}: interface {node.orig}:{iface} is eth{index} in the "
                                       f"container guest (a guest names its NICs in order)"))
        return node.name
    name, changed = ifname_for(iface)
    if changed:
        warnings.append(Note(None, f"{origin}: interface {node.orig}:{iface} is named {name} "
                                   f"(a Linux interface name)"))
    return f"{node.name}:{name}"


# ---------------------------------------------------------------------------
# Export: a compiled Net as a containerlab topology
# ---------------------------------------------------------------------------

def export(net, name: str) -> str:
    """A compiled `Net` as containerlab YAML: hosts -> `kind: linux`, routers ->
    `kind: linux` with FRR's image, switches -> `kind: bridge`, point-to-point
    links and switch ports -> `endpoints` with the interface names; the switch
    `mgmt` -> the `mgmt` section with each node's `mgmt-ipv4`. vm nodes become
    linux nodes too (their image spec has no containerlab equivalent)."""
    import yaml

    nodes: dict[str, dict] = {}
    links: list[dict] = []
    mgmt_sw = net.switches.get("mgmt")
    mgmt: dict[str, Any] = {}
    if mgmt_sw is not None:
        dom = next(d for d in net.domains if "mgmt" in d.switches)
        mgmt = {"network": name}
        if 4 in dom.subnets:
            mgmt["ipv4-subnet"] = str(dom.subnets[4])
        if 6 in dom.subnets:
            mgmt["ipv6-subnet"] = str(dom.subnets[6])
    for sw in net.switches.values():
        if sw is not mgmt_sw:
            nodes[sw.name] = {"kind": "bridge"}
    port_no: dict[str, int] = {}
    seen_p2p: set[tuple[str, str]] = set()
    for g, _, n in net.iter_nodes():
        spec: dict[str, Any] = {"kind": "linux",
                                "image": "frrouting/frr:latest" if g.kind == "router" else "alpine:latest"}
        view = net.node(n)
        for eth, iface, addrs in view.ifaces:
            if iface.switch is not None and iface.switch == "mgmt" and mgmt_sw is not None:
                if 4 in addrs:
                    spec["mgmt-ipv4"] = addrs[4].split("/")[0]
                if 6 in addrs:
                    spec["mgmt-ipv6"] = addrs[6].split("/")[0]
                continue
            if iface.switch is not None:
                port_no[iface.switch] = port_no.get(iface.switch, 0) + 1
                links.append({"endpoints": [f"{n}:{eth}", f"{iface.switch}:{_port(iface.switch, port_no)}"]})
            elif iface.peer is not None:
                key = (iface.domain.name, n)
                if (iface.domain.name, iface.peer) in seen_p2p:
                    continue
                seen_p2p.add(key)
                peer_eth = next(e for e, i, _ in net.node(iface.peer).ifaces if i.domain is iface.domain)
                link: dict[str, Any] = {"endpoints": [f"{n}:{eth}", f"{iface.peer}:{peer_eth}"]}
                link.update(_impairments(iface.props))
                links.append(link)
        if g.props.get("exec"):
            spec["exec"] = [shlex.join(argv) for argv, _ in g.props["exec"]]
        nodes[n] = spec
    for sl in net.switch_links:
        for sw in (sl.a, sl.b):
            port_no[sw] = port_no.get(sw, 0) + 1
        links.append({"endpoints": [f"{sl.a}:{_port(sl.a, port_no)}", f"{sl.b}:{_port(sl.b, port_no)}"]})
    doc: dict[str, Any] = {"name": name}
    if mgmt:
        doc["mgmt"] = mgmt
    doc["topology"] = {"nodes": nodes, "links": links}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def _port(switch: str, port_no: dict[str, int]) -> str:
    name, _ = ifname_for(f"{switch[:9]}p{port_no[switch]}")
    return name


def _impairments(props) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if props.mtu:
        out["mtu"] = props.mtu
    if props.delay_us:
        out["delay"] = fmt_delay_us(props.delay_us)
    if props.jitter_us:
        out["jitter"] = fmt_delay_us(props.jitter_us)
    if props.loss_pct:
        out["loss"] = props.loss_pct
    if props.rate_bit:
        out["rate"] = props.rate_bit // 1000
    return out


__all__ = ["convert", "export", "role_of", "YList"]
