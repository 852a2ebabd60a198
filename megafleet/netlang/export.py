"""The compiled network as plain JSON data (`net export`)."""

from __future__ import annotations

from typing import Any

from megafleet.netlang.model import Net


def to_json(net: Net) -> dict[str, Any]:
    return {
        "files": net.files,
        "params": net.params,
        "counts": net.counts(),
        "images": {k: v[0] for k, v in net.images.items()},
        "pools": [{"name": p.name, "subnet": str(p.subnet), "per": p.per} for p in net.pools.values()],
        "switches": [{"name": s.name, "mtu": s.mtu, "vde": s.vde, "vlans": sorted(s.vlans)}
                     for s in net.switches.values()],
        "switch_links": [{"a": link.a, "b": link.b, "vlans": link.vlans, "link": link.props.to_json()}
                         for link in net.switch_links],
        "networks": [{"name": d.name, "switches": d.switches, "vlan": d.vlan, "mtu": d.mtu,
                      "subnets": [str(d.subnets[f]) for f in sorted(d.subnets)],
                      "routers": [r for r, _ in d.routers]} for d in net.domains],
        "nodes": [net.node(n).to_json() for _, _, n in net.iter_nodes()],
        "reachable": [{"a": a, "b": b} for a, b, _ in net.reachable],
    }
