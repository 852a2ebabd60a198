"""The compiled network as a networkx graph: one vertex per node and switch, one
edge per interface (node-switch), point-to-point link (node-node) and switch link."""

from __future__ import annotations

from itertools import repeat
from typing import TYPE_CHECKING

import networkx as nx

if TYPE_CHECKING:      # model.Net.graph imports this module: no import back at run time
    from megafleet.netlang.model import Net


def build_graph(net: Net) -> nx.Graph:
    g = nx.Graph()
    g.add_nodes_from(net.switches, kind="switch")
    for gi, grp in enumerate(net.groups):
        g.add_nodes_from(grp.names, kind=grp.kind, group=gi)
    for grp in net.groups:
        for iface in grp.ifaces:
            names = grp.names if len(iface.members) == len(grp.names) else \
                grp.names[iface.members.start:iface.members.stop]
            g.add_edges_from(zip(names, repeat(iface.switch)), iface=iface.index, domain=iface.domain.id)
    for name, ifaces in net.extra_ifaces.items():
        for iface in ifaces:
            g.add_edge(name, iface.switch or iface.peer, iface=iface.index, domain=iface.domain.id)
    for link in net.switch_links:
        g.add_edge(link.a, link.b, kind="switch-link")
    return g
