"""GNS3 projects (`*.gns3`, JSON) to `.fleet`: nodes and links.

Node types: `vpcs`, `traceng` and `docker` -> hosts (a docker node whose image
is FRR's -> a router); `qemu`, `dynamips`, `iou`, `virtualbox`, `vmware` ->
routers (a qemu/virtualbox/vmware appliance whose image or name says Linux ->
a host), with a warning that the appliance image and its configuration are not
carried over; `ethernet_switch`, `ethernet_hub` -> switches; `nat`, `cloud`,
`frame_relay_switch`, `atm_switch` and the links to them are reported. Links
keep their ports' names where they are Linux interface names (`Ethernet0`,
`eth1`; `FastEthernet0/0` -> `FastEthernet0-0`); link filters `delay`
(latency, jitter ms) and `packet_loss` (%) become link impairments, the other
filters are reported; a suspended link is reported and left out.
"""

from __future__ import annotations

import json
import re
from typing import Any

from megafleet.netlang.errors import Loc
from megafleet.netlang.importers.common import (FleetWriter, ImportFailed, ImportOptions, Imported,
                                                 Namer, Note, find_re, header, ifname_for, line_of,
                                                 private_as, readable, router_routing)

HOST_TYPES = ("vpcs", "traceng", "docker")
ROUTER_TYPES = ("qemu", "dynamips", "iou", "virtualbox", "vmware")
SWITCH_TYPES = ("ethernet_switch", "ethernet_hub")
_LINUXISH = re.compile(r"linux|ubuntu|debian|alpine|centos|fedora|kali|webterm|tiny|toolbox|host", re.I)


def _kind(node: dict) -> str:
    t = node.get("node_type")
    props = node.get("properties") or {}
    image = " ".join(str(props.get(k) or "") for k in ("image", "hda_disk_image", "vmname", "linked_clone"))
    if t in HOST_TYPES:
        return "router" if t == "docker" and "frr" in image.lower() else "host"
    if t in ROUTER_TYPES:
        return "host" if _LINUXISH.search(image + " " + str(node.get("name") or "")) else "router"
    if t in SWITCH_TYPES:
        return "switch"
    return ""


def convert(files: list[tuple[str, str]], opts: ImportOptions) -> Imported:
    (file, text), = files
    texts = {file: text}
    try:
        root = json.loads(text)
    except json.JSONDecodeError as err:
        raise ImportFailed([Note(Loc(file, err.lineno, err.colno), f"invalid JSON: {err.msg}")], texts) from None
    here = Loc(file, 1, 1)
    topo = root.get("topology") if isinstance(root, dict) else None
    if not isinstance(topo, dict) or not isinstance(topo.get("nodes", []), list):
        raise ImportFailed([Note(here, "a GNS3 project has 'topology' with 'nodes' and 'links'")], texts)
    errors: list[Note] = []
    warnings: list[Note] = []

    def where(needle: str) -> Loc:
        return line_of(text, needle, file) or here

    namer = Namer()
    by_id: dict[str, tuple[str, str, dict, Loc]] = {}     # node_id -> (name, kind, node, loc)
    for node in topo.get("nodes") or []:
        if not isinstance(node, dict) or "node_id" not in node:
            errors.append(Note(here, f"a node without 'node_id': {str(node)[:60]}"))
            continue
        nid = str(node["node_id"])
        # The node's own entry: its name appears only there (links name ids).
        loc = find_re(text, r'"name"\s*:\s*' + re.escape(json.dumps(str(node.get("name")))), file) \
            or where(f'"{nid}"')
        label = str(node.get("name") or nid)
        kind = _kind(node)
        t = node.get("node_type")
        if not kind:
            warnings.append(Note(loc, f"node {label}: type {t} has no equivalent; it and its links "
                                      f"are not carried over"))
            by_id[nid] = ("", "", node, loc)
            continue
        name = namer.take(readable(label))
        if name != label:
            warnings.append(Note(loc, f"node {label} is named {name} (a valid, unique name)"))
        if t in ROUTER_TYPES or (t == "docker"):
            what = "appliance image and its configuration" if t != "docker" else "container image"
            warnings.append(Note(loc, f"node {label}: {t} {kind}; its {what} are not carried over"))
        if t == "ethernet_switch":
            ports = (node.get("properties") or {}).get("ports_mapping") or []
            if any(p.get("type") == "dot1q" or p.get("vlan", 1) != 1 for p in ports if isinstance(p, dict)):
                warnings.append(Note(loc, f"switch {label}: port VLANs are not carried over (one VLAN)"))
        by_id[nid] = (name, kind, node, loc)
    links: list[tuple[str, str]] = []
    for link in topo.get("links") or []:
        lid = str(link.get("link_id") if isinstance(link, dict) else "?")
        lloc = where(f'"{lid}"')
        ends = link.get("nodes") if isinstance(link, dict) else None
        if not isinstance(ends, list) or len(ends) != 2:
            errors.append(Note(lloc, f"link {lid}: expected two 'nodes'"))
            continue
        sides = []
        for e in ends:
            nid = str(e.get("node_id")) if isinstance(e, dict) else "?"
            if nid not in by_id:
                errors.append(Note(lloc, f"link {lid} refers to node_id {nid}, which is not a node"))
                break
            sides.append((by_id[nid], e))
        if len(sides) != 2:
            continue
        (na, ka, node_a, _), ea = sides[0]
        (nb, kb, node_b, _), eb = sides[1]
        if not ka or not kb:
            warnings.append(Note(lloc, f"link {lid} to {node_a.get('name') if not ka else node_b.get('name')}"
                                       f": not carried over"))
            continue
        if link.get("suspend"):
            warnings.append(Note(lloc, f"link {lid} ({na} -- {nb}) is suspended: left out"))
            continue
        words = _filters(link.get("filters") or {}, lid, lloc, warnings)
        a = _end(na, ka, node_a, ea, warnings, lloc)
        b = _end(nb, kb, node_b, eb, warnings, lloc)
        links.append((f"link {a} -- {b}{words}", f"{lloc} (link {lid[:8]})"))
    if errors:
        raise ImportFailed(errors, texts)
    routing = opts.routing or "static"
    w = FleetWriter()
    header(w, "GNS3", [file], warnings)
    w.comment(f"project {root.get('name', '')!s}, GNS3 {root.get('version', '?')}")
    w.section("addresses: GNS3 leaves them to each node")
    w.stmt("pool lab 10.0.0.0/8")
    w.section("nodes")
    asn = 0
    for nid, (name, kind, node, loc) in by_id.items():
        if not kind:
            continue
        origin = f"{loc} (node {node.get('name')}, {node.get('node_type')})"
        if kind == "router":
            w.stmt(f"router {name}{router_routing(routing, private_as(asn))}", origin)
            asn += 1
        else:
            w.stmt(f"{kind} {name}", origin)
    w.section("links")
    for text_, origin in links:
        w.stmt(text_, origin)
    return Imported("gns3", [file], w.render(), warnings)


def _end(name: str, kind: str, node: dict, end: dict, warnings: list[Note], loc: Loc) -> str:
    if kind == "switch":
        return name
    port = next((p for p in node.get("ports") or [] if isinstance(p, dict)
                 and p.get("adapter_number") == end.get("adapter_number")
                 and p.get("port_number") == end.get("port_number")), None)
    label = (port or {}).get("name") or (end.get("label") or {}).get("text")
    if not label:
        return name
    ifn, changed = ifname_for(str(label))
    if changed:
        warnings.append(Note(loc, f"port {node.get('name')}:{label} is named {ifn} (a Linux interface name)"))
    return f"{name}:{ifn}"


def _filters(filters: dict[str, Any], lid: str, loc: Loc, warnings: list[Note]) -> str:
    words = ""
    for k, v in filters.items():
        vals = v if isinstance(v, list) else [v]
        if k == "delay" and vals:
            words += f" delay {vals[0]}ms"
            if len(vals) > 1 and vals[1]:
                words += f" jitter {vals[1]}ms"
        elif k == "packet_loss" and vals:
            words += f" loss {vals[0]}%"
        else:
            warnings.append(Note(loc, f"link {lid[:8]}: filter {k} {v}: not carried over"))
    return words
