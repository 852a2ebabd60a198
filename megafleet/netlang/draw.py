"""Drawing a compiled network with Graphviz, readable at 10,000 nodes and beyond.

Each declared group (`web[1..1000]`) is one box labelled with its range and count,
never 1,000 boxes; switches are ellipses labelled with their subnets; routers are
octagons. Edges between a group and a switch carry the member count. Layout and
rendering (SVG or PNG) are Graphviz's `dot`, run from an argv list.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

from megafleet import proc
from megafleet.netlang.model import Net

SHAPES = {"vm": "box", "host": "box", "router": "octagon"}
COLORS = {"vm": "#dbe9ff", "host": "#e3f5dc", "router": "#ffe3c2"}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def group_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return f"{names[0]} .. {names[-1]}"


def to_dot(net: Net) -> str:
    lines = ["graph megafleet {", '  graph [rankdir=TB, overlap=false, splines=true, fontname="Helvetica"];',
             '  node [fontname="Helvetica", fontsize=10, style=filled];', '  edge [fontsize=9];']
    for sw in net.switches.values():
        subnets = sorted({str(s) for d in net.domains if sw.name in d.switches for s in d.subnets.values()})
        label = "\n".join([sw.name + (" (vde)" if sw.vde else "")] + subnets)
        lines.append(f'  {_q("s:" + sw.name)} [label={_q(label)}, shape=ellipse, fillcolor="#eeeeee"];')
    for gi, g in enumerate(net.groups):
        label = group_label(g.names)
        if len(g) > 1:
            label += f"\n{len(g)} {g.kind}s"
        elif g.kind != "router":
            label += f"\n{g.kind}"
        extra = []
        if "ospf" in g.props:
            extra.append("ospf")
        if "bgp" in g.props:
            extra.append(f"bgp {g.props['bgp']['as']}")
        if extra:
            label += "\n" + ", ".join(extra)
        lines.append(f'  {_q(f"g:{gi}")} [label={_q(label)}, shape={SHAPES[g.kind]}, '
                     f'fillcolor="{COLORS[g.kind]}"];')
    edges: Counter = Counter()
    for gi, g in enumerate(net.groups):
        for iface in g.ifaces:
            edges[(f"g:{gi}", f"s:{iface.switch}", iface.vlan)] += len(iface.members)
    for name, ifaces in net.extra_ifaces.items():
        gi = net.index[name][0]
        for iface in ifaces:
            if iface.switch is not None:
                edges[(f"g:{gi}", f"s:{iface.switch}", iface.vlan)] += 1
            elif iface.peer is not None and name < iface.peer:      # each point-to-point link once
                other = f"g:{net.index[iface.peer][0]}"
                key = tuple(sorted((f"g:{gi}", other)))
                edges[(key[0], key[1], None)] += 1
    for (a, b, vlan), n in edges.items():
        words: list[str] = []
        if n > 1:
            words.append(f"×{n}")
        if vlan is not None:
            words.append(f"vlan {vlan}")
        attrs = f" [label={_q(' '.join(words))}]" if words else ""
        lines.append(f"  {_q(a)} -- {_q(b)}{attrs};")
    for link in net.switch_links:
        label = f"vlan {','.join(map(str, link.vlans))}" if link.vlans else ""
        lines.append(f'  {_q("s:" + link.a)} -- {_q("s:" + link.b)} [style=dashed, label={_q(label)}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(net: Net, out: Path) -> None:
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png", "dot"):
        raise ValueError(f"{out}: unknown format {fmt!r} (use .svg, .png or .dot)")
    dot = to_dot(net)
    if fmt == "dot":
        out.write_text(dot)
        return
    if shutil.which("dot") is None:
        raise RuntimeError("Graphviz 'dot' is not installed (apt-get install graphviz, or scripts/setup); "
                           "'-o FILE.dot' writes the graph description without it")
    proc.run(["dot", f"-T{fmt}", "-o", str(out)], input=dot)
