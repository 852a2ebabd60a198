"""FRR configuration for routers that run OSPF or BGP, generated from the graph.

One file per daemon (zebra, ospfd, ospf6d, bgpd), as FRR 8 reads them with `-f`.
OSPF runs on every addressed interface of the router in its area (ospfd for
IPv4, ospf6d for IPv6), with short hello/dead timers (1 s / 4 s) in small
testbeds so that an emulated network converges and notices a cut link in
seconds, longer ones and a throttled SPF in large ones (`ospftimers`; explicit
values in the description win); passive on a network no other router is on
(a host LAN: advertised, no hellos); connected networks are redistributed. A router
whose OSPF runs in BIRD (`bird.runs_bird`) gets one file, "bird", instead. BGP peers
with every other BGP router that shares a network with it (eBGP when the AS
numbers differ, iBGP otherwise) and announces its connected networks.
"""

from __future__ import annotations

import ipaddress

from megafleet.netlang import bird, ospftimers
from megafleet.netlang.ipam import fmt
from megafleet.netlang.model import Net


def router_id(net: Net, router: str) -> str:
    view = net.node(router)
    for _, _, addrs in view.ifaces:
        if 4 in addrs:
            return addrs[4].split("/")[0]
    # No IPv4 address: a stable id from the name (router ids are 32-bit numbers).
    import hashlib
    return str(ipaddress.IPv4Address(int.from_bytes(
        hashlib.blake2s(router.encode(), digest_size=4).digest(), "big") | 1))


def _ospf_interface(eth: str, ospf: dict, p2p: bool, prefix: str,
                    timers: ospftimers.OspfTimers = ospftimers.OspfTimers(), passive: bool = False) -> list[str]:
    """One interface stanza; prefix is "ip ospf" (ospfd) or "ipv6 ospf6" (ospf6d),
    whose interface commands are otherwise the same."""
    lines = [f"interface {eth}", f" {prefix} area {ospf['area']}"]
    if p2p:
        # A point-to-point link: no designated-router election to wait for.
        lines.append(f" {prefix} network point-to-point")
    if passive:
        # A network with no other router (a host LAN): advertised, no hellos.
        lines.append(f" {prefix} passive")
    lines += [f" {prefix} hello-interval {timers.hello_s}", f" {prefix} dead-interval {timers.dead_s}"]
    if "cost" in ospf:
        lines.append(f" {prefix} cost {ospf['cost']}")
    return lines + ["!"]


def lonely(iface, router: str) -> bool:
    """Whether `iface` is on a switch where no other router is (a host LAN):
    OSPF advertises its subnet but sends no hellos there (passive / stub)."""
    return iface.switch is not None and all(name == router for name, _ in iface.domain.routers)


def _throttle(timers: ospftimers.OspfTimers, v6: bool) -> list[str]:
    """SPF throttling and LSA pacing lines of `router ospf` / `router ospf6`."""
    lines = []
    if timers.spf_delay_ms is not None:
        lines.append(f" timers throttle spf {timers.spf_delay_ms} {timers.spf_hold_ms} {timers.spf_max_ms}")
    if timers.lsa_ms is not None:
        if not v6:
            lines.append(f" timers throttle lsa all {timers.lsa_ms}")
        lines.append(f" timers lsa min-arrival {timers.lsa_ms}")
    return lines


def configs(net: Net, router: str) -> dict[str, str]:
    """daemon -> configuration text for one router: FRR's zebra, ospfd, ospf6d,
    bgpd as the router needs them, or {"bird": ...} when its OSPF runs in BIRD."""
    if bird.runs_bird(net, router):
        return {"bird": bird.config(net, router)}
    view = net.node(router)
    props = view.props
    rid = router_id(net, router)
    out = {"zebra": f"hostname {router}\n!\n"}
    if "ospf" in props:
        ospf = props["ospf"]
        timers = ospftimers.effective(ospf, ospftimers.ospf_router_count(net))
        lines = [f"hostname {router}", "!"]
        lines6 = [f"hostname {router}", "!"]
        for eth, iface, addrs in view.ifaces:
            p2p = iface.switch is None
            alone = lonely(iface, router)
            if 4 in addrs:
                lines += _ospf_interface(eth, ospf, p2p, "ip ospf", timers, alone)
            if 6 in addrs:
                lines6 += _ospf_interface(eth, ospf, p2p, "ipv6 ospf6", timers, alone)
        lines += ["router ospf", f" ospf router-id {rid}", " redistribute connected",
                  " redistribute static"] + _throttle(timers, False) + ["!"]
        if len(lines6) > 2:
            lines6 += ["router ospf6", f" ospf6 router-id {rid}", " redistribute connected",
                       " redistribute static"] + _throttle(timers, True) + ["!"]
            out["ospf6d"] = "\n".join(lines6) + "\n"
        out["ospfd"] = "\n".join(lines) + "\n"
    if "bgp" in props:
        my_as = props["bgp"]["as"]
        # Sessions per family: over IPv4 on networks where both ends have an IPv4
        # address, over IPv6 where both have an IPv6 one; each session carries its
        # own family only (an IPv6-only link still peers and announces).
        lines = [f"hostname {router}", "!", f"router bgp {my_as}", f" bgp router-id {rid}",
                 " no bgp ebgp-requires-policy", " no bgp network import-check",
                 " no bgp default ipv4-unicast"]
        neighbors: dict[int, list[tuple[str, int]]] = {4: [], 6: []}
        for _, iface, mine in view.ifaces:
            for other, raddrs in iface.domain.routers:
                if other == router:
                    continue
                og = net.groups[net.index[other][0]]
                if "bgp" not in og.props:
                    continue
                for fam in (4, 6):
                    if fam in raddrs and fam in mine:
                        neighbors[fam].append((fmt(fam, raddrs[fam]), og.props["bgp"]["as"]))
        for addr, asn in neighbors[4] + neighbors[6]:
            lines.append(f" neighbor {addr} remote-as {asn}")
            lines.append(f" neighbor {addr} timers 1 3")
            lines.append(f" neighbor {addr} timers connect 1")
        for fam in (4, 6):
            if fam == 4 or neighbors[6]:
                lines += [f" address-family ipv{fam} unicast", "  redistribute connected"]
                lines += [f"  neighbor {addr} activate" for addr, _ in neighbors[fam]]
                lines += [" exit-address-family"]
        lines += ["!"]
        out["bgpd"] = "\n".join(lines) + "\n"
    return out
