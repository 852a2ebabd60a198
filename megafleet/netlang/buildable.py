"""What a host cannot build, refused when compiling (so by `net check`) with the
file and line of the statement, instead of failing (or building something else)
in `up`:

- delay, jitter or loss on a vm's port (this kernel has no netem: impairments
  run through VDE wirefilter between namespaces and bridges, which a guest's tap
  or container veth cannot join); put it on a host's port or a switch link;
- a vm on a VDE switch whose driver has no VDE NIC (libvirt, container), and
  rate or impairments on a vm's port of a VDE switch;
- point-to-point links to a vm, links from a VDE switch;
- switch links that close a loop (per VLAN): bridges run no spanning tree, so a
  loop is a broadcast storm;
- a switch (or one VLAN of it) with more ports than a tree of bridges holds
  (limits.SWITCH_PORTS_MAX).
"""

from __future__ import annotations

from megafleet.netlang import limits
from megafleet.netlang.errors import Diagnostics
from megafleet.netlang.model import LinkProps, Net


def _impaired(props: LinkProps) -> bool:
    return any(v is not None for v in (props.delay_us, props.jitter_us, props.loss_pct))


def check(net: Net, diags: Diagnostics) -> None:
    """Report every statement a host cannot build into `diags`."""
    from megafleet.vm.driver import DEFAULT_DRIVER
    from megafleet.vm.spec import DRIVER_NIC_KINDS

    vde = {s for s, sw in net.switches.items() if sw.vde}
    ports: dict[tuple[str, int | None], int] = {}
    reported: set[int] = set()
    for gi, g in enumerate(net.groups):
        is_vm = g.kind == "vm" or (g.kind == "router" and "image" in g.props)
        driver = g.props.get("driver", DEFAULT_DRIVER)
        ifaces = list(g.ifaces) + [i for n in g.names if n in net.extra_ifaces for i in net.extra_ifaces[n]]
        for iface in ifaces:
            if iface.switch is not None:
                key = (iface.switch, iface.vlan)
                ports[key] = ports.get(key, 0) + len(iface.members)
            if not is_vm or id(iface) in reported:
                continue
            reported.add(id(iface))
            if iface.switch is None:
                diags.error(iface.loc, f"point-to-point links to a vm ({g.names[iface.members[0]]}) are not "
                                       f"supported; put the vm on a switch")
            elif iface.switch in vde:
                if "vde" not in DRIVER_NIC_KINDS.get(driver, ()):
                    diags.error(iface.loc, f"the {driver} driver cannot attach to a VDE switch ({iface.switch}); "
                                           f"use a bridge switch or driver qemu")
                elif _impaired(iface.props) or iface.props.rate_bit is not None:
                    diags.error(iface.loc, "rate, delay, jitter or loss on a vm's port of a VDE switch is not "
                                           "supported; put them on a host's port or use a bridge switch")
            elif _impaired(iface.props):
                diags.error(iface.loc, "delay, jitter or loss on a vm's port is not supported (this kernel has "
                                       "no netem; impairments run through VDE wirefilter, which a guest's NIC "
                                       "cannot join); put it on a link between switches or a host's port")
    for (sw, vlan), n in ports.items():
        if n > limits.SWITCH_PORTS_MAX:
            where = sw if vlan is None else f"{sw} (VLAN {vlan})"
            diags.error(net.switches[sw].loc, f"switch {where} has {n:,} ports; a tree of Linux bridges holds "
                                              f"at most {limits.SWITCH_PORTS_MAX:,}")
    parent: dict[tuple[str, int | None], tuple[str, int | None]] = {}

    def find(x: tuple[str, int | None]) -> tuple[str, int | None]:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for link in net.switch_links:
        if link.a in vde or link.b in vde:
            diags.error(link.loc, f"links from a VDE switch ({link.a} -- {link.b}) are not supported; use "
                                  f"Linux bridges for switches joined by links")
            continue
        vlans: list[int | None] = list(link.vlans) or [None]
        for v in vlans:
            ra, rb = find((link.a, v)), find((link.b, v))
            if ra == rb:
                what = "" if v is None else f" in VLAN {v}"
                diags.error(link.loc, f"link {link.a} -- {link.b} closes a loop of switches{what}: bridges run "
                                      f"no spanning tree, so frames would circle forever; remove a link")
                break
            parent[rb] = ra
