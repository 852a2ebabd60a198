"""netlab topologies (`topology.yml`) to `.fleet`: the core of netlab's format.

- `nodes` as a mapping or a list of names; `device: linux` -> a host, any other
  device (frr, eos, iosv, srlinux, ...) -> an FRR router (netlab generates the
  devices' configuration itself; the routing of the FRR router follows the
  same modules);
- `links` in the short form (`r1-r2`, `r1-r2-r3` a LAN, `r1` a stub), the dict
  form (node names as keys with interface attributes `ipv4`, `ifname`; link
  attributes `bandwidth` in kbit/s, `mtu`, `prefix`, `tc` with delay/jitter
  (ms), loss (%), rate (kbit/s)), and the `interfaces:` list form; two nodes ->
  a point-to-point link from netlab's p2p pool 10.1.0.0/16, more -> a LAN
  switch from its lan pool 172.16.0.0/16;
- `groups` (a list of members, or `members:` with `device`, `module`, `bgp.as`);
- `module: [ospf, bgp]` at the top, in a group or on a node, with `bgp.as` (or
  `bgp: {as: N}`) from the node, its group or the top level.
Dotted keys (`bgp.as: 65000`, `defaults.device: frr`) are read like nested ones.
"""

from __future__ import annotations

from typing import Any

from megafleet.netlang.errors import Loc
from megafleet.netlang.importers.common import (FleetWriter, ImportFailed, ImportOptions, Imported,
                                                 Namer, Note, YList, YMap, header, ifname_for, item_loc,
                                                 load_yaml, readable)

LINK_ATTRS = {"bandwidth", "mtu", "prefix", "tc", "type", "name", "role", "pool", "interfaces"}


def _get(d: Any, dotted: str, default: Any = None) -> Any:
    """`bgp.as` from {'bgp.as': 1} or {'bgp': {'as': 1}}."""
    if not isinstance(d, dict):
        return default
    if dotted in d:
        return d[dotted]
    head, _, rest = dotted.partition(".")
    if rest and isinstance(d.get(head), dict):
        return _get(d[head], rest, default)
    return default


def _at(d: Any, key: str, default: Loc) -> Loc:
    if isinstance(d, YMap):
        return d.at(key) if key in d else d.at(key.split(".")[0]) if key.split(".")[0] in d else d.loc
    return default


def convert(files: list[tuple[str, str]], opts: ImportOptions) -> Imported:
    (file, text), = files
    texts = {file: text}
    root = load_yaml(text, file)
    here = Loc(file, 1, 1)
    if not isinstance(root, YMap):
        raise ImportFailed([Note(here, "a netlab topology is a mapping with 'nodes' and 'links'")], texts)
    errors: list[Note] = []
    warnings: list[Note] = []
    nodes_raw = root.get("nodes")
    if nodes_raw is None:
        raise ImportFailed([Note(here, "the topology has no 'nodes'")], texts)
    nodes: dict[str, dict] = {}
    node_loc: dict[str, Loc] = {}
    if isinstance(nodes_raw, list):
        for i, n in enumerate(nodes_raw):
            if isinstance(n, dict) and "name" in n:
                nodes[str(n["name"])] = n
            else:
                nodes[str(n)] = {}
            node_loc[str(n if not isinstance(n, dict) else n["name"])] = item_loc(nodes_raw, i, here)
    elif isinstance(nodes_raw, YMap):     # load_yaml's mappings
        for n, spec in nodes_raw.items():
            if spec is not None and not isinstance(spec, dict):
                errors.append(Note(nodes_raw.vat(n), f"node {n}: expected a mapping of its attributes"))
                continue
            nodes[str(n)] = spec or {}
            node_loc[str(n)] = nodes_raw.at(n)
    else:
        raise ImportFailed([Note(root.vat("nodes"), "'nodes' must be a mapping or a list of names")], texts)
    # Groups: members inherit device, module and bgp.as unless they set them.
    member_of: dict[str, list[tuple[str, dict]]] = {}
    groups = root.get("groups") or {}
    if not isinstance(groups, dict):
        errors.append(Note(root.vat("groups"), "'groups' must be a mapping of group names"))
        groups = {}
    for gname, g in groups.items():
        gloc = groups.at(gname) if isinstance(groups, YMap) else here
        group_members = g if isinstance(g, list) else (g.get("members") if isinstance(g, dict) else None)
        attrs = g if isinstance(g, dict) else {}
        if not isinstance(group_members, list):
            errors.append(Note(gloc, f"group {gname}: expected a list of members or 'members:'"))
            continue
        for i, m in enumerate(group_members):
            if str(m) not in nodes:
                errors.append(Note(item_loc(group_members, i, gloc), f"group {gname} refers to node {m!r}, "
                                                               f"which is not in 'nodes'"))
                continue
            member_of.setdefault(str(m), []).append((str(gname), attrs))
        for k in attrs:
            if k not in ("members", "device", "module", "bgp", "bgp.as", "ospf", "ospf.area"):
                warnings.append(Note(_at(attrs, k, gloc), f"group {gname} {k}: not carried over"))

    def attr(n: str, key: str) -> Any:
        v = _get(nodes[n], key)
        for _, g in member_of.get(n, []):
            if v is None:
                v = _get(g, key)
        if v is None:
            v = _get(root, key)
        if v is None and key == "device":
            v = _get(root, "defaults.device")
        return v

    namer = Namer()
    names = {}
    for n in nodes:
        names[n] = namer.take(readable(n))
        if names[n] != n:
            warnings.append(Note(node_loc[n], f"node {n} is named {names[n]} (a valid, unique name)"))
    kinds: dict[str, str] = {}
    routing: dict[str, str] = {}
    for n, spec in nodes.items():
        device = str(attr(n, "device") or "frr")
        loc = node_loc[n]
        if device == "linux":
            kinds[n] = "host"
        else:
            kinds[n] = "router"
            if device != "frr":
                warnings.append(Note(loc, f"node {n}: device {device} runs as an FRR router "
                                          f"(with the same modules)"))
        modules = attr(n, "module") or []
        if isinstance(modules, str):
            modules = [modules]
        protocols: list[str] = []           # "ospf [area A]", "bgp AS"
        if opts.routing is not None and kinds[n] == "router":
            modules = [] if opts.routing == "static" else [opts.routing]
        for mod in modules:
            if kinds[n] != "router":
                continue
            if mod == "ospf":
                area = attr(n, "ospf.area")
                protocols.append("ospf" + (f" area {area}" if area is not None else ""))
            elif mod == "bgp":
                asn = attr(n, "bgp.as")
                if asn is None:
                    errors.append(Note(loc, f"node {n} runs the bgp module but has no bgp.as "
                                            f"(on the node, its group or the topology)"))
                    continue
                protocols.append(f"bgp {asn}")
            else:
                warnings.append(Note(_at(spec, "module", loc), f"node {n}: module {mod}: not carried over"))
        routing[n] = " ".join(protocols)
        for k in spec:
            if k not in ("device", "module", "bgp", "bgp.as", "ospf", "ospf.area", "name", "group"):
                warnings.append(Note(_at(spec, k, loc), f"node {n} {k}: not carried over"))
    # Links
    links_raw = root.get("links") or []
    if not isinstance(links_raw, list):
        errors.append(Note(root.vat("links"), "'links' must be a list"))
        links_raw = []
    # words: the link's properties, {"rate": "1000kbit", "prefix": ...}
    lans: list[tuple[str, list[tuple[str, dict]], dict[str, str], Loc]] = []     # (name, members, words, loc)
    p2p: list[tuple[tuple[str, dict], tuple[str, dict], dict[str, str], Loc]] = []
    stubs: list[tuple[str, dict, Loc]] = []
    for i, link in enumerate(links_raw):
        loc = item_loc(links_raw, i, here)
        members: list[tuple[str, dict]] = []
        lattrs: dict = {}
        if isinstance(link, str):
            members = [(m, {}) for m in link.split("-")]
        elif isinstance(link, list):
            members = [(str(m), {}) for m in link]
        elif isinstance(link, dict):
            lattrs = {k: v for k, v in link.items() if str(k) not in nodes}
            members = [(str(k), v if isinstance(v, dict) else {}) for k, v in link.items() if str(k) in nodes]
            for ifc in lattrs.get("interfaces") or []:
                if isinstance(ifc, dict) and "node" in ifc:
                    members.append((str(ifc["node"]), ifc))
            unknown = [k for k in lattrs if k not in LINK_ATTRS]
            if unknown:
                # A key that is no link attribute is meant as a node that does not exist.
                for k in unknown:
                    errors.append(Note(_at(link, str(k), loc), f"link refers to node {k!r}, which is "
                                                               f"not in 'nodes'"))
                continue
        else:
            errors.append(Note(loc, f"a link is a string (r1-r2), a list or a mapping, not {link!r}"))
            continue
        bad = [m for m, _ in members if m not in nodes]
        if bad:
            errors.append(Note(loc, f"link refers to node {bad[0]!r}, which is not in 'nodes'"))
            continue
        words = _link_words(lattrs, loc, warnings)
        if len(members) == 1:
            stubs.append((members[0][0], members[0][1], loc))
        elif len(members) == 2 and lattrs.get("type") != "lan":
            p2p.append((members[0], members[1], words, loc))
        elif members:
            lans.append((namer.take(readable(str(lattrs.get("name") or f"lan{len(lans) + 1}"))),
                         members, words, loc))
    if errors:
        raise ImportFailed(errors, texts)
    w = FleetWriter()
    header(w, "netlab", [file], warnings)
    w.section("addresses: netlab's lan and p2p pools")
    w.stmt("pool lan 172.16.0.0/16")
    w.stmt("pool p2p 10.1.0.0/16 per /30")
    w.section("nodes")
    for n in nodes:
        kind = kinds[n]
        w.stmt(f"{kind} {names[n]}" + (f" {routing[n]}" if routing[n] else ""),
               f"{node_loc[n]} (node {n}, device {attr(n, 'device') or 'frr'})")
    if lans or stubs:
        w.section("LANs and stub networks")
    for lan, members, words, loc in lans:
        prefix = words.pop("prefix", None)
        w.stmt(f"switch {lan}" + (f" subnet {prefix}" if prefix else ""), loc)
    stub_names = []
    for n, ifc, loc in stubs:
        stub_names.append(namer.take(f"{names[n]}_stub"))
        w.stmt(f"switch {stub_names[-1]}", f"{loc} (stub link of {n})")
    w.section("links")
    for (a, ia), (b, ib), words, loc in p2p:
        subnet = f" subnet {words.pop('prefix')}" if "prefix" in words else " subnet p2p"
        w.stmt(f"link {_end(names[a], ia)} -- {_end(names[b], ib)}{_props(words)}{subnet}", loc)
    for lan, members, words, loc in lans:
        for m, ifc in members:
            w.stmt(f"link {_end(names[m], ifc)} -- {lan}{_props(words)}", loc)
    for (n, ifc, loc), stub in zip(stubs, stub_names):
        w.stmt(f"link {_end(names[n], ifc)} -- {stub}", loc)
    return Imported("netlab", [file], w.render(), warnings)


def _end(name: str, ifc: dict) -> str:
    out = name
    if ifc.get("ifname"):
        out += ":" + ifname_for(str(ifc["ifname"]))[0]
    addr = ifc.get("ipv4")
    if isinstance(addr, str) and "/" in addr:
        out += f" {addr}"
    return out


def _props(words: dict[str, str]) -> str:
    return "".join(f" {k} {v}" for k, v in words.items())


def _link_words(attrs: dict, loc: Loc, warnings: list[Note]) -> dict[str, str]:
    out: dict[str, str] = {}
    if attrs.get("bandwidth"):
        out["rate"] = f"{attrs['bandwidth']}kbit"        # netlab: kbit/s
    if attrs.get("mtu"):
        out["mtu"] = str(attrs["mtu"])
    tc = _get(attrs, "tc") or {}
    for k, unit in (("delay", "ms"), ("jitter", "ms"), ("loss", "%"), ("rate", "kbit")):
        v = tc.get(k) if isinstance(tc, dict) else None
        if v is not None:
            out[k] = f"{v}{unit}"
    prefix = attrs.get("prefix")
    if isinstance(prefix, dict):
        prefix = prefix.get("ipv4")
    if isinstance(prefix, str):
        out["prefix"] = prefix
    for k in ("role", "pool", "vlan"):
        if k in attrs:
            warnings.append(Note(_at(attrs, k, loc), f"link {k}: not carried over"))
    return out


__all__ = ["convert", "YList"]
