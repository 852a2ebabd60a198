"""GraphML and GML maps (Internet Topology Zoo, networkx-written graphs) to
`.fleet`, and compiled testbeds back to GraphML.

- Nodes become routers (OSPF by default; `--routing bgp` gives each its own
  private AS, `static` computes routes from the graph), edges point-to-point
  links. A node with a `kind` attribute (host, router, switch: what `net export
  --format graphml` writes) keeps its kind.
- Zoo labels become valid, unique, readable names: `Zürich` -> `Zurich`,
  `New York` -> `New_York`, a second `Paris` -> `Paris_2`; a node without a
  label is named from its id (`n_17`).
- Hyperedges become switches: Zoo's pseudo-nodes (`hyperedge 1`) and GraphML
  `<hyperedge>` elements (networkx cannot read those: they are taken out first).
- Parallel edges stay parallel links (each its own /30).
- `--delays geo`: each link's delay is the great-circle distance between its
  ends' Latitude/Longitude at 2/3 of the speed of light (fibre); `--rates`:
  LinkSpeedRaw (bit/s), or LinkSpeed with LinkSpeedUnits, becomes `rate`.
- `--hosts-per-router N`: a LAN switch `R_lan` with hosts `R_h1..R_hN` behind
  every router R.

Parsing is networkx's (`parse_graphml`, `parse_gml`); positions for comments and
errors come from one scan of the text (networkx keeps none).
"""

from __future__ import annotations

import bisect
import html
import math
import re
from typing import Any
from xml.etree.ElementTree import ParseError

import networkx as nx

from megafleet.netlang.errors import Loc
from megafleet.netlang.importers.common import (FleetWriter, ImportFailed, ImportOptions, Imported,
                                                 Namer, Note, fmt_delay_us, header, private_as,
                                                 readable, router_routing)

C_FIBRE_KM_S = 299_792.458 * 2 / 3
EARTH_RADIUS_KM = 6371.0
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}

# A <node id=...> (groups 1, 3) or an <edge> with source and target in either
# order (groups 5, 7): one match per tag, no second look at its attributes.
_TAG_RE = re.compile(r"<(?:(node)\b[^>]*?\bid\s*=\s*([\"'])(.*?)\2"
                     r"|edge\b(?=[^>]*?\bsource\s*=\s*([\"'])(.*?)\4)(?=[^>]*?\btarget\s*=\s*([\"'])(.*?)\6))")
_HYPER_RE = re.compile(r"<hyperedge\b[^>]*?/>|<hyperedge\b[^>]*>.*?</hyperedge\s*>", re.S)
_ENDPOINT_RE = re.compile(r"<endpoint\b[^>]*?\bnode\s*=\s*([\"'])(.*?)\1")


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in km between two points given in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def geo_delay_us(a: dict, b: dict) -> int | None:
    """One-way propagation delay (µs) between two nodes with Latitude/Longitude."""
    try:
        km = great_circle_km(float(a["Latitude"]), float(a["Longitude"]),
                             float(b["Latitude"]), float(b["Longitude"]))
    except (KeyError, TypeError, ValueError):
        return None
    return round(km / C_FIBRE_KM_S * 1e6)


def link_rate_bit(d: dict) -> int | None:
    """An edge's speed in bit/s from Zoo attributes, or None."""
    raw = d.get("LinkSpeedRaw")
    try:
        if raw is not None and float(raw) > 0:
            return int(float(raw))
        if d.get("LinkSpeed") is not None:
            unit = str(d.get("LinkSpeedUnits") or "").upper()[:1]
            return int(float(d["LinkSpeed"]) * _UNITS.get(unit, 1))
    except (TypeError, ValueError):
        return None
    # SONET line types (Abilene's "OC-192"): OC-n carries n x 51.84 Mbit/s.
    oc = re.fullmatch(r"OC-?(\d+)c?", str(d.get("LinkType") or d.get("LinkLabel") or ""), re.I)
    return int(int(oc.group(1)) * 51.84e6) if oc else None


def _line_at(text: str, pos: int, lines: list[int]) -> int:
    """1-based line of offset `pos`; `lines` caches newline offsets."""
    if not lines:
        lines.extend(m.start() for m in re.finditer("\n", text))
        lines.append(len(text) + 1)
    return bisect.bisect_left(lines, pos) + 1


def _loc_at(file: str, text: str, pos: int, lines: list[int]) -> Loc:
    """file:line:col of offset `pos`."""
    line = _line_at(text, pos, lines)
    return Loc(file, line, pos - (lines[line - 2] if line > 1 else -1))


class _Lines:
    """file:line:col of offsets visited in increasing order: counts the newlines
    since the previous offset instead of searching a table of all of them (a
    10,000-node map has 30,000 tags to locate)."""

    def __init__(self, file: str, text: str):
        self.file, self.text = file, text
        self.pos, self.line, self.start = 0, 1, 0      # last offset, its line, that line's start

    def at(self, pos: int) -> Loc:
        if pos < self.pos:                               # out of order: start again
            self.pos, self.line, self.start = 0, 1, 0
        n = self.text.count("\n", self.pos, pos)
        if n:
            self.line += n
            self.start = self.text.rfind("\n", self.pos, pos) + 1
        self.pos = pos
        return Loc(self.file, self.line, pos - self.start + 1)


def _unescape(s: str) -> str:
    return html.unescape(s) if "&" in s else s


def _xml_positions(file: str, text: str) -> tuple[dict[str, Loc], dict[tuple[str, str], list[Loc]]]:
    """Where each <node id> and each <edge> (by its sorted (source, target)) is
    written; one pass over the text, nodes and edges in the order they come."""
    lines = _Lines(file, text)
    nodes: dict[str, Loc] = {}
    edges: dict[tuple[str, str], list[Loc]] = {}
    for m in _TAG_RE.finditer(text):
        if m.group(1):
            nodes[_unescape(m.group(3))] = lines.at(m.start())
        else:
            a, b = _unescape(m.group(5)), _unescape(m.group(7))
            edges.setdefault((a, b) if a <= b else (b, a), []).append(lines.at(m.start()))
    return nodes, edges


def convert(files: list[tuple[str, str]], opts: ImportOptions) -> Imported:
    """One GraphML file -> `.fleet` text. Raises ImportFailed."""
    (file, text), = files
    hyper: list[tuple[str, list[str], Loc]] = []
    nl: list[int] = []

    def cut(m: re.Match) -> str:
        loc = _loc_at(file, text, m.start(), nl)
        hid = re.search(r"\bid\s*=\s*([\"'])(.*?)\1", m.group(0))
        hyper.append((hid.group(2) if hid else f"hyperedge{len(hyper) + 1}",
                      [html.unescape(e.group(2)) for e in _ENDPOINT_RE.finditer(m.group(0))], loc))
        return "\n" * m.group(0).count("\n")       # keep every other line where it was

    stripped = _HYPER_RE.sub(cut, text) if "<hyperedge" in text else text
    try:
        # A MultiGraph always (parallel edges stay parallel): networkx would
        # otherwise copy the MultiGraph it builds into a Graph when the file
        # has none, a second pass over every edge (a third of its parse time).
        g = nx.parse_graphml(stripped, force_multigraph=True)
    except ParseError as err:
        line, col = err.position
        raise ImportFailed([Note(Loc(file, line, col + 1), f"invalid GraphML (XML): "
                                                           f"{str(err).split(':')[0]}")], {file: text}) from None
    except (nx.NetworkXError, ValueError, KeyError, TypeError) as err:
        raise ImportFailed([Note(Loc(file, 1, 1), f"invalid GraphML: {err}")], {file: text}) from None
    node_locs, edge_locs = _xml_positions(file, stripped)
    errors = []
    for n in g.nodes:
        if n not in node_locs:
            key_locs = [v for k, v in edge_locs.items() if n in k]
            errors.append(Note(key_locs[0][0] if key_locs else None,
                               f"an edge refers to node {n!r}, which is not declared (no <node id=\"{n}\">)"))
    for hid, ends, loc in hyper:
        for e in ends:
            if e not in node_locs:
                errors.append(Note(loc, f"hyperedge {hid} refers to node {e!r}, which is not declared"))
    if errors:
        raise ImportFailed(errors, {file: text})
    return _emit(g, "GraphML", file, node_locs, edge_locs, hyper, opts)


_GML_TOKEN = re.compile(r"\b(node|edge)\s*\[|\b(id|source|target)\s+(-?\d+)")


def _gml_positions(file: str, text: str) -> tuple[dict[Any, Loc], dict[tuple, list[Loc]], list[Loc]]:
    nl: list[int] = []
    nodes: dict[Any, Loc] = {}
    edges: dict[tuple, list[Loc]] = {}
    edge_list: list[Loc] = []
    current: str | None = None            # "node" or "edge": the block being read
    cur_loc: Loc | None = None            # where it starts
    ends: dict[str, int] = {}             # the edge's source and target ids so far
    for m in _GML_TOKEN.finditer(text):
        if m.group(1):
            if current == "edge" and cur_loc is not None and len(ends) == 2:
                edges.setdefault(tuple(sorted((ends["source"], ends["target"]))), []).append(cur_loc)
            current, ends = m.group(1), {}
            cur_loc = _loc_at(file, text, m.start(), nl)
            if current == "edge":
                edge_list.append(cur_loc)
        elif current == "node" and cur_loc is not None and m.group(2) == "id" and cur_loc not in nodes.values():
            nodes[int(m.group(3))] = cur_loc
        elif current == "edge" and m.group(2) in ("source", "target"):
            ends[m.group(2)] = int(m.group(3))
    if current == "edge" and cur_loc is not None and len(ends) == 2:
        edges.setdefault(tuple(sorted((ends["source"], ends["target"]))), []).append(cur_loc)
    return nodes, edges, edge_list


def convert_gml(files: list[tuple[str, str]], opts: ImportOptions) -> Imported:
    """One GML file -> `.fleet` text. Raises ImportFailed."""
    (file, text), = files
    node_locs, edge_locs, edge_list = _gml_positions(file, text)

    def parse(t: str):
        return nx.parse_gml(t, label="id")

    try:
        try:
            g = parse(text)
        except nx.NetworkXError as err:
            if "duplicated" not in str(err):
                raise
            # Parallel edges in a file that does not say `multigraph 1`: keep them.
            g = parse(re.sub(r"\bgraph\s*\[", "graph [ multigraph 1 ", text, count=1))
    except nx.NetworkXError as err:
        msg = str(err)
        m = re.search(r"at \((\d+), (\d+)\)", msg)
        loc = Loc(file, int(m.group(1)), int(m.group(2))) if m else Loc(file, 1, 1)
        e = re.match(r"edge #(\d+) has undefined (source|target) (\S+)", msg)
        if e:
            i = int(e.group(1))
            loc = edge_list[i] if i < len(edge_list) else loc
            msg = f"edge #{i} refers to node {e.group(3)} as its {e.group(2)}, which is not declared"
        else:
            msg = "invalid GML: " + re.sub(r" at [(]\d+, \d+[)]", "", msg)
        raise ImportFailed([Note(loc, msg)], {file: text}) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ImportFailed([Note(Loc(file, 1, 1), f"invalid GML: {err}")], {file: text}) from None
    if not g.is_multigraph():
        g = nx.MultiDiGraph(g) if g.is_directed() else nx.MultiGraph(g)
    return _emit(g, "GML", file, node_locs, edge_locs, [], opts)


def _emit(g, fmt: str, file: str, node_locs: dict, edge_locs: dict, hyper: list, opts: ImportOptions) -> Imported:
    warnings: list[Note] = []
    routing = opts.routing or "ospf"
    if g.is_directed():
        # One link per pair of nodes joined in either direction (a networkx
        # DiGraph of a network usually holds both directions of each link).
        und = nx.MultiGraph()
        und.add_nodes_from(g.nodes(data=True))
        for a, b, d in g.edges(data=True):
            if a != b and g.has_edge(b, a) and str(a) > str(b):
                continue                      # its reverse stands for both
            und.add_edge(a, b, **d)
        warnings.append(Note(Loc(file, 1, 1), "a directed graph: each pair of opposite edges "
                                              "becomes one (bidirectional) link"))
        g = und
    namer = Namer()
    names: dict[Any, str] = {}
    kinds: dict[Any, str] = {}
    for n, d in g.nodes(data=True):
        label = d.get("label")
        base = readable(label if label not in (None, "") else n, fallback="n")
        names[n] = namer.take(base)
        kind = str(d.get("kind") or "")
        if d.get("hyperedge") in (1, "1", True, "true"):
            kind = "switch"
        kinds[n] = kind if kind in ("host", "router", "switch", "vm") else "router"
        if kinds[n] == "vm":
            warnings.append(Note(node_locs.get(n), f"node {n}: a vm needs an image spec; imported as a host"))
            kinds[n] = "host"
    hyper_names = []
    for hid, ends, loc in hyper:
        hyper_names.append((namer.take(readable(hid, fallback="hyper")), ends, loc))
    lans: dict[Any, tuple[str, str]] = {}
    if opts.hosts_per_router > 0:
        for n in g.nodes:
            if kinds[n] == "router":
                lans[n] = (namer.take(f"{names[n]}_lan"), namer.take(f"{names[n]}_h"))
    w = FleetWriter()
    edges = list(g.edges(keys=True, data=True)) if g.is_multigraph() else \
        [(a, b, 0, d) for a, b, d in g.edges(data=True)]
    link_lines: list[tuple[str, str]] = []
    used: dict[tuple, int] = {}
    node_data = dict(g.nodes(data=True))         # plain dict lookups in the loop below
    for a, b, _k, d in edges:
        sa, sb = str(a), str(b)
        pair = (sa, sb) if sa <= sb else (sb, sa)
        locs = edge_locs.get(pair) or edge_locs.get(tuple(sorted((a, b), key=str))) or []
        j = used.get(pair, 0)
        used[pair] = j + 1
        loc = locs[j] if j < len(locs) else None
        if a == b:
            warnings.append(Note(loc, f"edge from {names[a]} to itself: not carried over"))
            continue
        words = []
        delay = d.get("delay")
        if delay:
            words.append(f"delay {delay}")
        elif opts.delays == "geo":
            us = geo_delay_us(node_data[a], node_data[b])
            if us is None:
                warnings.append(Note(loc, f"link {names[a]} -- {names[b]}: no coordinates on both "
                                          f"ends: no delay"))
            elif us > 0:
                words.append(f"delay {fmt_delay_us(us)}")
        if d.get("rate"):
            words.append(f"rate {d['rate']}")
        elif opts.rates:
            bits = link_rate_bit(d)
            if bits:
                words.append(f"rate {bits}bit")
        label = d.get("LinkLabel")
        origin = f"{loc or file}" + (f" ({label})" if label else "")
        ifs = (d.get("a_ifname"), d.get("b_ifname")) if d.get("a") == str(a) else \
            (d.get("b_ifname"), d.get("a_ifname"))
        ends_ = [names[x] + (f":{i}" if i and kinds[x] != "switch" else "") for x, i in zip((a, b), ifs)]
        link_lines.append((f"link {ends_[0]} -- {ends_[1]}" + "".join(" " + x for x in words), origin))
    counts = {k: sum(1 for v in kinds.values() if v == k) for k in ("router", "switch", "host")}
    header(w, fmt, [file], warnings)
    w.comment(f"{counts['router']} routers, {counts['switch'] + len(hyper)} switches, "
              f"{counts['host']} hosts, {len(link_lines)} links in the map; routing: {routing}"
              + (f"; {opts.hosts_per_router} hosts per router" if lans else ""))
    w.section("addresses: a /30 per link, a /24 per LAN")
    w.stmt("pool core 10.0.0.0/8")
    w.section("nodes")
    asn = 0
    for n, d in g.nodes(data=True):
        loc = node_locs.get(n)
        about = ", ".join(f"{k} {d[k]}" for k in ("label", "Country") if d.get(k) not in (None, ""))
        origin = f"{loc or file} (node {n}" + (f", {about}" if about else "") + ")"
        kind = kinds[n]
        if kind == "switch":
            w.stmt(f"switch {names[n]}", origin[:-1] + ", a hyperedge)" if d.get("hyperedge") else origin)
        elif kind == "host":
            w.stmt(f"host {names[n]}", origin)
        else:
            on = f" on {lans[n][0]}" if n in lans else ""
            w.stmt(f"router {names[n]}{on}{router_routing(routing, private_as(asn))}", origin)
            asn += 1
    for name, ends, loc in hyper_names:
        w.stmt(f"switch {name}", f"{loc} (hyperedge)")
    if lans:
        w.section(f"host LANs (--hosts-per-router {opts.hosts_per_router})")
        for n, (lan, h) in lans.items():
            w.stmt(f"switch {lan}")
            w.stmt(f"host {h}[1..{opts.hosts_per_router}] on {lan}")
    w.section("links")
    for text, origin in link_lines:
        w.stmt(text, origin)
    for name, ends, loc in hyper_names:
        for e in ends:
            w.stmt(f"link {names[e]} -- {name}", f"{loc} (hyperedge endpoint {e})")
    return Imported(fmt.lower(), [file], w.render(), warnings)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

def export(net) -> str:
    """A compiled `Net` as GraphML (networkx's writer): one node per host,
    router, vm and switch with its `kind`; one edge per point-to-point link
    (interface names `a_ifname`/`b_ifname`, `delay`, `rate`), per switch port and
    per switch link. Parallel links stay parallel (a MultiGraph)."""
    from io import BytesIO

    from megafleet.netlang.importers.common import fmt_delay_us as fd
    g = nx.MultiGraph()
    for sw in net.switches:
        g.add_node(sw, kind="switch", label=sw)
    for grp, _, n in net.iter_nodes():
        g.add_node(n, kind=grp.kind, label=n)
    done: set[int] = set()
    for _, _, n in net.iter_nodes():
        for eth, iface, _ in net.node(n).ifaces:
            attrs: dict[str, Any] = {"a": n}
            if iface.props.delay_us:
                attrs["delay"] = fd(iface.props.delay_us)
            if iface.props.rate_bit:
                attrs["rate"] = f"{iface.props.rate_bit}bit"
            if iface.switch is not None:
                g.add_edge(n, iface.switch, a_ifname=eth, **attrs)
            elif iface.peer is not None and iface.domain.id not in done:
                done.add(iface.domain.id)
                peer_eth = next(e for e, i, _ in net.node(iface.peer).ifaces if i.domain is iface.domain)
                g.add_edge(n, iface.peer, a_ifname=eth, b_ifname=peer_eth, **attrs)
    for sl in net.switch_links:
        g.add_edge(sl.a, sl.b, a=sl.a)
    out = BytesIO()
    nx.write_graphml(g, out)
    return out.getvalue().decode()
