"""Instantiating a compiled network on this host, and tearing it down.

What gets created, for a testbed called NAME (a short prefix, e.g. `lab1`):

- one network namespace `NAME-NODE` per host and per namespace router;
- per switch a Linux bridge, and one more bridge per VLAN used on it (this
  host's kernel has neither bridge VLAN filtering nor 802.1Q, so a VLAN is its
  own bridge: access ports are isolated exactly as with tags, and a trunk between
  two switches is one veth pair per VLAN); with `vde`, a vde_switch process;
- per interface on a switch a veth pair: `ethN` inside the node's namespace, the
  host end enslaved to the bridge (a VLAN makes it an untagged access port); on a
  VDE switch a vde_plug2tap process inside the namespace makes `ethN` instead;
- per point-to-point link a veth pair between the two namespaces; per switch link a
  veth pair between the two bridges (per listed VLAN);
- links with delay, jitter or loss: this host's kernel has no netem, so such a
  link is VDE's wirefilter between two vde_switch processes that own a tap at
  each end (see `Wire`); rate is tc tbf on the kernel interfaces at both ends;
- routers: forwarding on, static routes from the compiler, or zebra + ospfd/bgpd
  with generated configuration, running inside the router's namespace;
- vm nodes: a tap per interface on the bridge, then the vm engine boots them.

Record before create: every namespace, link, process and directory is written to
the ledger (owner "net", keys "NAME/...") before it exists, and `down` walks the
ledger, so teardown is complete after a crash at any point. Processes are stopped
by recorded pid and start time; processes left inside a recorded namespace (a
shell someone started there) are found through /proc/PID/ns/net and stopped too.

Speed: the host-side work is one `ip -batch` (and one `tc -batch`); the inside
of the namespaces (links up, addresses, routes) is configured over rtnetlink from
this process (netlink.py), with no process per namespace. One `ip` process per
change would cost ~15 ms each.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import trio

from megafleet import paths, proc
from megafleet.ledger import Ledger
from megafleet.names import IfNames, InvalidName, check_ifnames, check_name, description_id
from megafleet.netlang import frr, limits, netlink
from megafleet.netlang.hostplan import (Bridge, ContainerPort, GuestVdePort, NsExec, P2pLink, Plan, Port,
                                        TapPort, Trunk, VdePort, VdeSwitch, VethPort, Wire,
                                        WiredPort, WireEnd)
from megafleet.netlang.model import LinkProps, Net
from megafleet.netlang.routing import is_dynamic
from megafleet.vm.driver import DEFAULT_DRIVER

OWNER = "net"
NETNS_DIR = Path("/run/netns")
FRR_BIN = Path("/usr/lib/frr")

Progress = Callable[[str], None]


class LiveError(RuntimeError):
    pass


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------
# The plan: every resource of one testbed, derived from the compiled net
# (the typed items live in hostplan.py)
# ---------------------------------------------------------------------------

def impaired(props: LinkProps) -> bool:
    return any(v is not None for v in (props.delay_us, props.jitter_us, props.loss_pct))


def mac_for(testbed: str, node: str, index: int) -> str:
    h = hashlib.blake2s(f"{testbed}\0{node}\0{index}".encode(), digest_size=4).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in h)


def _nic_kinds(driver: str) -> tuple[str, ...]:
    """The NIC kinds a vm driver attaches (the vm engine's registry)."""
    from megafleet.vm.spec import DRIVER_NIC_KINDS
    return tuple(DRIVER_NIC_KINDS[driver])


def plan(net: Net, name: str) -> Plan:
    """Every resource of testbed `name` for the compiled `net`, on one host (cut
    per host by `manifest.split`). Interface names come from one allocator
    (`names.IfNames`), so none is used twice; a switch with more ports than one
    Linux bridge takes becomes a tree of bridges. Raises LiveError naming the
    description's line for what cannot be built."""
    check_name(name, "testbed name")
    if len(name) > limits.TESTBED_NAME_MAX:
        raise LiveError(f"testbed name {name!r} is longer than {limits.TESTBED_NAME_MAX} characters: it "
                        f"prefixes interface names, which Linux limits to {limits.IFNAME_MAX} bytes")
    alloc = IfNames(name)
    p = Plan(name)
    roots: dict[tuple[str, int | None], Bridge] = {}
    vde_sock: dict[str, str] = {}
    for sw in net.switches.values():
        if sw.vde:
            vde_sock[sw.name] = str(run_base(name) / "vde" / sw.name)
            p.vde.append(VdeSwitch(sw.name, vde_sock[sw.name]))
            continue
        for v in [None, *sorted(sw.vlans)]:
            tag = () if v is None else (str(v),)
            roots[(sw.name, v)] = Bridge(sw.name, v, alloc("b", sw.name, *tag), sw.mtu)
    for link in net.switch_links:
        if link.a in vde_sock or link.b in vde_sock:
            raise LiveError(f"{link.loc}: links from a VDE switch ({link.a} -- {link.b}) are not supported; "
                            f"use Linux bridges for switches joined by links")
        mtu = link.props.mtu or net.switches[link.a].mtu
        vlans: list[int | None] = list(link.vlans) or [None]
        for v in vlans:
            tag = () if v is None else (str(v),)
            a_if, b_if = alloc("l", link.a, link.b, *tag), alloc("m", link.a, link.b, *tag)
            br_a, br_b = roots[(link.a, v)].ifname, roots[(link.b, v)].ifname
            if impaired(link.props):
                p.wires.append(Wire(alloc("w", link.a, link.b, *tag),
                                    (WireEnd("bridge", br_a, a_if, link.a), WireEnd("bridge", br_b, b_if, link.b)),
                                    mtu, link.props))
            else:
                p.trunks.append(Trunk(link.a, link.b, v, a_if, b_if, br_a, br_b, mtu, link.props))
    seen_p2p: set[int] = set()
    route_ops: dict[tuple[str, str], netlink.RouteAdd] = {}
    for g, k, node in net.iter_nodes():
        view = net.node(node)
        is_vm = g.kind == "vm" or (g.kind == "router" and "image" in g.props)
        ns = None if is_vm else f"{name}-{node}"
        if ns:
            p.netns[node] = ns
        kinds = _nic_kinds(g.props.get("driver", DEFAULT_DRIVER)) if is_vm else ()
        ops: list[netlink.Op] = [netlink.LinkUp("lo")] if ns else []
        nics: list[tuple[str, Any, dict[int, str], int, Port | None]] = []
        for eth, iface, addrs in view.ifaces:
            mtu = iface.props.mtu or iface.domain.mtu
            if iface.switch is not None:
                sock = vde_sock.get(iface.switch)
                root = roots.get((iface.switch, iface.vlan))
                host_if = alloc(node, str(iface.index))
                common: dict[str, Any] = dict(node=node, switch=iface.switch, vlan=iface.vlan,
                                              bridge=root.ifname if root else None, mtu=mtu, props=iface.props,
                                              host_if=host_if)
                port: Port | None
                if is_vm:
                    if sock is not None:
                        if "vde" not in kinds:
                            raise LiveError(f"{iface.loc}: the {g.props.get('driver', 'qemu')} driver cannot "
                                            f"attach to a VDE switch ({iface.switch}); use a bridge switch")
                        if impaired(iface.props) or iface.props.rate_bit is not None:
                            raise LiveError(f"{iface.loc}: rate, delay, jitter or loss on a vm's port of a VDE "
                                            "switch is not supported; put them on a host's port or use a bridge "
                                            "switch")
                        port = GuestVdePort(**common, socket=sock)
                    elif "tap" in kinds:
                        port = TapPort(**common)
                    else:
                        port = ContainerPort(**common)
                elif ns is None:
                    raise LiveError(f"{iface.loc}: node {node} has neither a namespace nor a guest")
                elif impaired(iface.props):
                    wkey = alloc("w", node, str(iface.index))
                    if sock is not None:
                        far = WireEnd("vde", sock, None, iface.switch)
                    else:
                        assert root is not None, (iface.switch, iface.vlan)
                        far = WireEnd("bridge", root.ifname, host_if, iface.switch)
                    p.wires.append(Wire(wkey, (WireEnd("ns", ns, eth, node), far), mtu, iface.props))
                    port = WiredPort(**common, ns=ns, eth=eth, wire=wkey)
                elif sock is not None:
                    port = VdePort(**common, ns=ns, eth=eth, socket=sock)
                else:
                    port = VethPort(**common, ns=ns, eth=eth)
                p.ports.append(port)
            elif ns is not None and iface.peer is not None:
                # Keyed by the link's own network: two links between the same two
                # nodes are two veths (or wires).
                if iface.domain.id not in seen_p2p:
                    seen_p2p.add(iface.domain.id)
                    peer_ns = p.netns.get(iface.peer) or f"{name}-{iface.peer}"
                    peer_eth = next(e for e, i, _ in net.node(iface.peer).ifaces if i.domain is iface.domain)
                    if impaired(iface.props):
                        p.wires.append(Wire(alloc("w", node, iface.peer, str(iface.domain.id)),
                                            (WireEnd("ns", ns, eth, node), WireEnd("ns", peer_ns, peer_eth, iface.peer)),
                                            mtu, iface.props))
                    else:
                        p.p2p.append(P2pLink(node, ns, eth, iface.peer, peer_ns, peer_eth, mtu, iface.props))
                port = None
            else:
                raise LiveError(f"{iface.loc}: point-to-point links to a vm ({node}) are not supported; "
                                f"put the vm on a switch")
            if ns:
                ops.append(netlink.LinkUp(eth, mtu if mtu != 1500 else None))
                for fam in sorted(addrs):
                    seq = iface.addrs[fam]
                    ops.append(netlink.AddrAdd(eth, fam, seq[k - iface.members.start],
                                               iface.domain.subnets[fam].plen))
            nics.append((eth, iface, addrs, mtu, port))
        if ns:
            for fam, gw in sorted(view.gateways.items()):
                ops.append(netlink.RouteAdd(fam, 0, 0, int(ipaddress.ip_address(gw))))
            for dest, via in view.routes:
                # One (immutable) op per distinct route, shared by the routers
                # that have it: the racks of a pod reach every other subnet via
                # the same next hop (21M routes at 1M guests, ~30x fewer ops).
                op = route_ops.get((dest, via))
                if op is None:
                    op = route_ops[(dest, via)] = netlink.RouteAdd(*_route_dest(dest), _route_via(via))
                ops.append(op)
            p.ns_ops[ns] = ops
            if g.props.get("exec"):
                p.ns_exec[ns] = [NsExec(node, argv) for argv, _ in g.props["exec"]]
            sysctls = {}
            if g.kind == "router":
                sysctls.update({"ipv4/ip_forward": "1", "ipv6/conf/all/forwarding": "1"})
            # No duplicate address detection: the kernel's link-local addresses
            # (used for IPv6 neighbour discovery) are usable at once, not ~1 s later.
            for item in ops:
                if isinstance(item, netlink.AddrAdd) and item.family == 6:
                    sysctls[f"ipv6/conf/{item.dev}/accept_dad"] = "0"
            if sysctls:
                p.ns_sysctls[ns] = sysctls
            if g.kind == "router":
                p.routers.append(node)
                if is_dynamic(net, node):
                    p.frr[node] = frr.configs(net, node)
        else:
            p.vms.append(_guest_spec(net, name, node, nics))
            if g.kind == "router" and is_dynamic(net, node):
                p.vm_frr[node] = frr.configs(net, node)
    p.bridges = _bridge_trees(net, p, roots, alloc)
    _guest_nics_on_leaves(p)
    # The allocator cannot hand out a name twice; this guards the plan itself
    # (names made outside it, a future item kind).
    try:
        check_ifnames(p.host_names(), f"interfaces of testbed {name}")
    except InvalidName as exc:
        raise LiveError(str(exc)) from None
    p.digest = p.compute_digest()
    return p


@functools.lru_cache(maxsize=1 << 16)
def _route_dest(dest: str) -> tuple[int, int, int]:
    """(family, network as int, prefix length) of a route's destination. Cached:
    every router has a route to every subnet (routers x subnets routes, 21
    million at a million guests in 4,480 racks), and parsing each was most of
    the plan's time; cached, the ints are shared too."""
    net_ = ipaddress.ip_network(dest)
    return net_.version, int(net_.network_address), net_.prefixlen


@functools.lru_cache(maxsize=1 << 16)
def _route_via(via: str) -> int:
    """A route's next hop as an int (cached, as `_route_dest`)."""
    return int(ipaddress.ip_address(via))


def _guest_nics_on_leaves(p: Plan) -> None:
    """Container guests' NICs name the bridge their launcher puts the host end
    on: after `_bridge_trees` moved ports of big switches to the leaves, the
    leaf, not the root (a root takes only its leaves)."""
    moved = {port.host_if: port.bridge for port in p.ports
             if isinstance(port, ContainerPort) and port.bridge is not None}
    if not moved:
        return
    for i, spec in enumerate(p.vms):
        nics = tuple(dataclasses.replace(n, bridge=moved[n.ifname])
                     if n.bridge is not None and moved.get(n.ifname, n.bridge) != n.bridge else n
                     for n in spec.nics)
        if any(a is not b for a, b in zip(nics, spec.nics)):
            p.vms[i] = dataclasses.replace(spec, nics=nics)


def _bridge_trees(net: Net, p: Plan, roots: dict[tuple[str, int | None], Bridge],
                  alloc: IfNames) -> list[Bridge]:
    """The bridges, roots first: a switch (or VLAN) whose ports, links and one
    VXLAN tunnel do not fit in one bridge (limits.BRIDGE_PORTS) gets leaf bridges
    (`limits.leaf_count`: of about limits.LEAF_PORTS_TARGET ports, at most
    limits.LEAF_PORTS), every leaf joined to the root by a veth; its ports move
    to the leaves in order, shared evenly. Raises LiveError (with the switch's
    line) when even the root cannot hold the leaves."""
    on_root: dict[str, list[int]] = {}
    for i, port in enumerate(p.ports):
        if port.bridge is not None and not isinstance(port, WiredPort):
            on_root.setdefault(port.bridge, []).append(i)
    others: dict[str, int] = {}
    for t in p.trunks:
        others[t.bridge_a] = others.get(t.bridge_a, 0) + 1
        others[t.bridge_b] = others.get(t.bridge_b, 0) + 1
    for w in p.wires:
        for e in w.ends:
            if e.kind == "bridge":
                others[e.where] = others.get(e.where, 0) + 1
    out = list(roots.values())
    leaves: list[Bridge] = []
    for root in roots.values():
        idx = on_root.get(root.ifname, [])
        extra = others.get(root.ifname, 0) + 1          # + one VXLAN tunnel
        if len(idx) + extra <= limits.BRIDGE_PORTS:
            continue
        n_leaves = limits.leaf_count(len(idx), limits.BRIDGE_PORTS - extra)
        if n_leaves is None:
            raise LiveError(f"{net.switches[root.switch].loc}: switch {root.switch} has {len(idx):,} ports; "
                            f"at most {limits.SWITCH_PORTS_MAX:,} fit in a tree of Linux bridges")
        tag = () if root.vlan is None else (str(root.vlan),)
        share = limits.leaf_share(len(idx), n_leaves)
        for j in range(n_leaves):
            leaf = Bridge(root.switch, root.vlan, alloc("b", root.switch, *tag, "t", str(j)), root.mtu,
                          root=root.ifname, uplink=alloc("u", root.switch, *tag, str(j)),
                          downlink=alloc("d", root.switch, *tag, str(j)))
            leaves.append(leaf)
            for i in idx[j * share:(j + 1) * share]:
                p.ports[i] = dataclasses.replace(p.ports[i], bridge=leaf.ifname)
    return out + leaves


def _guest_spec(net: Net, testbed: str, node: str, view_nics: list) -> Any:
    """The vm engine's GuestSpec of a vm node: one NIC per port, of the kind the
    port is (tap, the veth of a container, QEMU's own VDE connection)."""
    from megafleet.imagegen.contract import GuestConfig, NicConfig
    from megafleet.vm.spec import GuestSpec, NicSpec

    g = net.groups[net.index[node][0]]
    view = net.node(node)
    specs, configs = [], []
    for eth, iface, addrs, mtu, port in view_nics:
        mac = mac_for(testbed, node, iface.index)
        if isinstance(port, GuestVdePort):
            specs.append(NicSpec(mac=mac, kind="vde", vde_socket=port.socket))
        elif isinstance(port, ContainerPort):
            # The launcher creates the pair on the port's bridge (hostplan.ContainerPort).
            specs.append(NicSpec(mac=mac, kind="veth", ifname=port.host_if, bridge=port.bridge, mtu=port.mtu))
        else:
            specs.append(NicSpec(mac=mac, kind="tap", ifname=port.host_if))
        configs.append(NicConfig(mac, tuple(addrs[f] for f in sorted(addrs)), mtu if mtu != 1500 else None))
    config = GuestConfig(name=node, nics=tuple(configs), gateway=view.gateways.get(4),
                         gateway6=view.gateways.get(6), routes=tuple(view.routes),
                         forward=g.kind == "router")
    return GuestSpec(name=node, image=g.props["image"], driver=g.props.get("driver", DEFAULT_DRIVER),
                     mem_mb=g.props.get("mem_mib", 128), vcpus=g.props.get("vcpus", 1),
                     nics=tuple(specs), config=config)


# ---------------------------------------------------------------------------
# Helpers: batches, host state
# ---------------------------------------------------------------------------

def run_base(testbed: str) -> Path:
    """Runtime files of a testbed (FRR configs and sockets, VDE sockets). FRR drops
    to the frr user, so the directory must be reachable by it: the run directory
    is used when every parent lets others through, else /run/megafleet-net."""
    base = paths.run_dir()
    p = base
    while p != p.parent:
        if not os.stat(p).st_mode & 0o001:
            base = Path("/run/megafleet-net")
            break
        p = p.parent
    return base / "net" / testbed


_DIE_WITH_US = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def _batch(argv: list[str], lines: list[str], force: bool = False) -> None:
    if not lines:
        return
    if force:
        # Teardown: carry on past what is already gone (a veth whose peer went first).
        argv = argv[:1] + ["-force"] + argv[1:]
    # If we are killed, the batch must die with us: a batch that kept creating
    # namespaces after a crash would race the `down` that cleans up after it.
    try:
        proc.run(_DIE_WITH_US + argv + ["-batch", "-"], input="\n".join(lines) + "\n", check=not force)
    except proc.CommandFailed as exc:
        exc.args = (_batch_failure(argv, lines, exc.stderr),)
        raise


def _batch_failure(argv: list[str], lines: list[str], stderr: str) -> str:
    """A failed batch named by the line that failed ("Command failed -:N"), so
    that a raw "RTNETLINK answers: File exists" says which namespace, link or
    bridge it concerns."""
    import re

    errors = [l for l in stderr.strip().splitlines() if l and not l.startswith("Command failed")]
    m = re.search(r"Command failed -:(\d+)", stderr)
    what = f"{' '.join(argv)} -batch"
    if m and 0 < int(m.group(1)) <= len(lines):
        what = f"{argv[0]} {lines[int(m.group(1)) - 1]!r}"
    return f"{what}: {errors[0] if errors else stderr.strip()[-200:]}"


def existing_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def existing_netns() -> set[str]:
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def pids_in_netns(namespaces: list[str]) -> list[int]:
    """Processes whose network namespace is one of ours (by namespace inode)."""
    inodes = set()
    for ns in namespaces:
        try:
            inodes.add(os.stat(NETNS_DIR / ns).st_ino)
        except OSError:
            pass
    if not inodes:
        return []
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                out.append(int(entry))
        except OSError:
            pass
    return out


def _tbf_lines(dev: str, props: LinkProps) -> list[str]:
    """tc batch lines limiting `dev` to the link's rate (tbf). Delay, jitter and
    loss are not done by tc: this kernel has no netem (see `Wire`)."""
    if props.rate_bit is None:
        return []
    burst = max(1600, props.rate_bit // 8 // 250)      # ~4 ms worth of bytes
    return [f"qdisc replace dev {dev} root handle 1: tbf rate {props.rate_bit}bit burst {burst} latency 50ms"]


# ---------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------

def status(testbed: str, ledger: Ledger | None = None) -> dict | None:
    ledger = ledger or Ledger()
    for r in ledger.list(OWNER, "testbed"):
        if r.key == testbed:
            return r.data
    return None


def up(net: Net, testbed: str, progress: Progress = _quiet, ledger: Ledger | None = None,
       vm_options: dict | None = None) -> dict:
    """Bring the network up; returns a summary. Idempotent: if this testbed is up
    from the same description and everything recorded still exists, nothing is
    done. A partly-built testbed (a crash during `up`) is torn down and rebuilt."""
    return trio.run(aup, net, testbed, progress, ledger, vm_options)


async def aup(net: Net, testbed: str, progress: Progress = _quiet, ledger: Ledger | None = None,
              vm_options: dict | None = None) -> dict:
    """`net up`: plan the whole testbed on this host, `apply` it, then boot its
    vms through the vm engine and start FRR in VM routers."""
    if os.geteuid() != 0:
        raise LiveError("net up needs root (namespaces, bridges, veths)")
    ledger = ledger or Ledger()
    t0 = time.monotonic()
    p = plan(net, testbed)
    try:
        # Recorded as `up` records it (names.description_id): each refuses the
        # other's testbed from another file, and names the file that holds it.
        result = await apply(p, ledger, progress, source=description_id(net.files[0]))
    except LiveError as exc:
        from megafleet.netlang.nsexec import ExecFailed, statement_loc
        if isinstance(exc, ExecFailed):
            raise LiveError(f"{statement_loc(net, exc)}: {exc}; 'megafleet net down {testbed}' removes "
                            f"everything") from None
        raise
    if not result["changed"]:
        progress(f"testbed {testbed} is already up; nothing changed")
        return {"testbed": testbed, "changed": False, "seconds": time.monotonic() - t0}
    if p.vms:
        from megafleet.vm.api import apply as vm_apply

        names = await trio.to_thread.run_sync(_build_images, net, sorted({v.image for v in p.vms}), progress)
        specs = [dataclasses.replace(v, image=names[v.image]) for v in p.vms]
        ledger.record(OWNER, "vms", testbed, names=[v.name for v in specs])
        progress(f"booting {len(specs)} vms through the vm engine")
        # `net up` has no memory option: the budget error names what sets it.
        report = await vm_apply(specs, **{"budget_option": "the environment variable MEGAFLEET_VM_MEM_BUDGET",
                                          **(vm_options or {})})
        failed = [r for r in report.results if r.outcome not in ("ready", "already")]
        if failed:
            raise LiveError(f"{len(failed)} of {len(specs)} vms did not boot (first: {failed[0].name}: "
                            f"{failed[0].reason or failed[0].outcome}); 'megafleet net down {testbed}' removes everything")
        progress(f"{len(specs)} vms ready")
        await trio.to_thread.run_sync(shape_container_ports, p)
        if p.vm_frr:
            await start_vm_frr(p.vm_frr)
            progress(f"started FRR in {len(p.vm_frr)} VM routers")
    seconds = time.monotonic() - t0
    progress(f"testbed {testbed} is up ({seconds:.1f} s)")
    return {"testbed": testbed, "changed": True, "seconds": seconds,
            "namespaces": len(p.netns), "bridges": len(p.bridges), "ports": len(p.ports),
            "frr_routers": len(p.frr), "vms": len(p.vms)}


async def apply(p: Plan, ledger: Ledger | None = None, progress: Progress = _quiet, *,
                source: str = "") -> dict:
    """Build plan `p` (a whole testbed, or one host's share) on this host: the one
    network instantiation, for `net up` and for `up`'s hosts (host.py). The vms
    are not booted here (the caller asks the vm engine).

    Idempotent: if the testbed is up from the same plan (same digest) and all
    that is recorded still exists, nothing is done ({"changed": False}); a
    partly-built one (a crash during apply) is torn down and rebuilt. A testbed of
    that name built from another description (another digest) is refused:
    LiveError naming the description it came from. `source` (the description's
    file, as `names.description_id` gives it) is recorded for that message and
    for `net list`.

    Returns {"changed", "seconds", and the plan's counts}."""
    ledger = ledger or Ledger()
    t = p.name
    t0 = time.monotonic()
    current = status(t, ledger)
    if current is not None:
        if current.get("digest") != p.digest:
            was = current.get("file") or "?"
            same = ", an earlier version of it" if source and was == source else ""
            raise LiveError(f"testbed {t!r} is already up on this host from a different description "
                            f"({was}{same}); run "
                            f"'megafleet down {t}' (or 'megafleet net down {t}') first, or choose "
                            f"another name with -N")
        if current.get("complete") and await trio.to_thread.run_sync(_intact, t, ledger):
            progress("network already up; nothing changed")
            return {"changed": False, "seconds": time.monotonic() - t0}
        progress(f"testbed {t} is partly up; tearing it down and rebuilding")
        await adown(t, progress, ledger)
    ledger.record(OWNER, "testbed", t, digest=p.digest, file=source, complete=False)
    await trio.to_thread.run_sync(_fit_sysctls, p, ledger)
    limiter = trio.CapacityLimiter(4)
    await trio.to_thread.run_sync(_create_host_side, p, ledger, progress, limiter=limiter)
    progress(f"created {len(p.netns)} namespaces, {len(p.bridges)} bridges, {len(p.ports)} ports, "
             f"{len(p.vxlan)} VXLAN tunnels ({time.monotonic() - t0:.1f} s)")
    if p.vde or any(isinstance(port, VdePort) for port in p.ports):
        await trio.to_thread.run_sync(_start_vde, p, ledger)
    if p.wires:
        await trio.to_thread.run_sync(_start_wires, p, ledger)
        progress(f"started {len(p.wires)} impaired links (vde wirefilter)")
    t1 = time.monotonic()
    ns_items = sorted(p.ns_ops.items())
    failures: list[str] = []

    def configure_all() -> None:
        # Netlink from this process: microseconds per message, no process per
        # namespace (see netlink.py). One thread is plenty.
        for i, (ns, ops) in enumerate(ns_items, 1):
            try:
                netlink.apply(str(NETNS_DIR / ns), ops, p.ns_sysctls.get(ns))
            except OSError as err:
                failures.append(f"{ns}: {err}")
            if i % 500 == 0 or i == len(ns_items):
                progress(f"configured {i}/{len(ns_items)} namespaces ({time.monotonic() - t1:.1f} s)")

    await trio.to_thread.run_sync(configure_all, limiter=limiter)
    if failures:
        raise LiveError(f"configuring {len(failures)} namespaces failed (first: {failures[0]}); "
                        f"'megafleet net down {t}' removes what was created")
    await trio.to_thread.run_sync(_shape_and_route, p, limiter=limiter)
    if p.frr:
        await start_routers(p, ledger, progress)
    if p.ns_exec:
        # Startup commands last, as containerlab's exec: the node's network
        # (addresses, routes, daemons) is there when they run.
        from megafleet.netlang import nsexec
        await nsexec.run_all(p, ledger, progress)
    counts = p.counts()
    ledger.record(OWNER, "testbed", t, digest=p.digest, file=source, complete=True, counts=counts)
    return {"changed": True, "seconds": round(time.monotonic() - t0, 3), **counts}


# ---------------------------------------------------------------------------
# Parts of a plan, for changing a running testbed (experiment.reconcile): the
# steps `apply` takes, on a plan that holds only the items to add.
# ---------------------------------------------------------------------------

async def create_items(p: Plan, ledger: Ledger, progress: Progress = _quiet) -> None:
    """Create plan `p`'s namespaces and host-side items (interfaces, bridges,
    VXLAN tunnels, VDE switches and plugs, wires), each recorded in the ledger
    before it exists. `p` may be the part of a running testbed's plan that is
    not built yet; a name in it that exists already is refused (LiveError)."""
    await trio.to_thread.run_sync(_create_host_side, p, ledger, progress)
    if p.vde or any(isinstance(port, VdePort) for port in p.ports):
        await trio.to_thread.run_sync(_start_vde, p, ledger)
    if p.wires:
        await trio.to_thread.run_sync(_start_wires, p, ledger)


def shape_and_route(p: Plan) -> None:
    """The rates (tc tbf) of plan `p`'s ports and links, in one tc batch per
    namespace (blocking). Delay, jitter and loss are the wires'."""
    _shape_and_route(p)


def run_batch(argv: list[str], lines: list[str], *, force: bool = False) -> None:
    """`argv -batch -` ("ip", "tc", "bridge", with "-n NS" if any) over `lines`.
    With `force`, lines whose object is already gone are passed over (teardown);
    without, proc.CommandFailed names the line that failed."""
    _batch(argv, lines, force=force)


def tbf_lines(dev: str, props: LinkProps) -> list[str]:
    """tc batch lines that limit `dev` to `props.rate_bit` (none without a rate)."""
    return _tbf_lines(dev, props)


async def teardown(testbed: str, progress: Progress = _quiet, ledger: Ledger | None = None) -> dict:
    """Remove everything recorded for `testbed` on this host (see `adown`): the
    one network teardown, for `net down` and `down`."""
    return await adown(testbed, progress, ledger)


SYSCTL = Path("/proc/sys")


def _needed_sysctls(p: Plan) -> dict[str, int]:
    """Host-wide kernel limits a plan this large needs, by /proc/sys path.

    - net/core/netdev_max_backlog: a broadcast (ARP) on a switch is copied to
      each of its ports in one go, and every copy to a veth waits in the CPU's
      receive backlog: with the default (1,000) a switch of ~1,000 ports drops
      the copies beyond it and hosts never hear each other's ARP. Twice the
      largest switch.
    - net/ipv{4,6}/neigh/default/gc_thresh{2,3}: the kernel's neighbour (ARP,
      NDP) table is one for all namespaces, 1,024 entries at most by default;
      1,500 guests pinging one neighbour need ~3,000 (one at each end), and past
      the limit the kernel drops new entries ("neighbour table overflow").
      Four entries per port (hard limit) and two (before garbage collection)."""
    ports: dict[tuple[str, int | None], int] = {}
    for port in p.ports:
        ports[(port.switch, port.vlan)] = ports.get((port.switch, port.vlan), 0) + 1
    need = {"net/core/netdev_max_backlog": 2 * max(ports.values(), default=0) + 64}
    for family in ("ipv4", "ipv6"):
        need[f"net/{family}/neigh/default/gc_thresh2"] = 2 * len(p.ports) + 512
        need[f"net/{family}/neigh/default/gc_thresh3"] = 4 * len(p.ports) + 1024
    return need


def _fit_sysctls(p: Plan, ledger: Ledger) -> None:
    """Raise (never lower) the host-wide limits `_needed_sysctls` names; each
    old value is recorded first and put back when the last testbed that raised
    it goes down (`_restore_sysctls`)."""
    recorded = ledger.list(OWNER, "sysctl")
    for name, need in _needed_sysctls(p).items():
        path = SYSCTL / name
        try:
            current = int(path.read_text())
        except (OSError, ValueError):
            continue                     # not on this kernel: nothing to fit
        if need <= current:
            continue
        # Another testbed raised it first: keep its original.
        old = next((r.data["old"] for r in recorded if r.data.get("path") == str(path)), current)
        ledger.record(OWNER, "sysctl", f"{p.name}/{name}", path=str(path), old=old, value=need)
        path.write_text(str(need))


def _restore_sysctls(testbed: str, records: list, ledger: Ledger) -> None:
    """Put back what `_fit_sysctls` raised, to the highest value another testbed
    still needs, else to the original."""
    for r in records:
        others = [o for o in ledger.list(OWNER, "sysctl")
                  if o.data.get("path") == r.data["path"] and not o.key.startswith(testbed + "/")]
        value = max((o.data["value"] for o in others), default=r.data["old"])
        try:
            Path(r.data["path"]).write_text(str(value))
        except OSError:
            pass
    ledger.forget_many(OWNER, "sysctl", [r.key for r in records])


def _create_host_side(p: Plan, ledger: Ledger, progress: Progress) -> None:
    """Namespaces and every host-side interface of the plan, in one `ip -batch`
    (each item's `ip_lines`), recorded in the ledger first."""
    t = p.name
    links = p.host_links()
    # A name that exists already belongs to someone else (this apply starts from
    # nothing): refuse before recording it, so our `down` can never remove it.
    clash = sorted(set(p.host_names()) & existing_links()) + sorted(set(p.netns.values()) & existing_netns())
    if clash:
        raise LiveError(f"testbed {t}: {len(clash)} interface or namespace names already exist on this "
                        f"host and are not ours (first: {clash[0]}); choose another testbed name with -N")
    # Record before create.
    ledger.record_many(OWNER, "netns", [(f"{t}/{ns}", {"ns": ns}) for ns in p.netns.values()])
    ledger.record_many(OWNER, "link", _link_records(p, links))
    lines = [f"netns add {ns}" for ns in p.netns.values()]
    for item in p.items():
        lines += item.ip_lines()
    _batch(["ip"], lines)
    _batch(["bridge"], [line for x in p.vxlan for line in x.fdb_lines()])


def _start_vde(p: Plan, ledger: Ledger) -> None:
    t = p.name
    for sw in p.vde:
        sock = Path(sw.socket)
        ledger.record(OWNER, "dir", f"{t}/vde", path=str(sock.parent))
        sock.parent.mkdir(parents=True, exist_ok=True)
        pidfile = sock.parent / f"{sw.switch}.pid"
        key = f"{t}/vde/{sw.switch}"
        ledger.record(OWNER, "process", key, pidfile=str(pidfile))
        proc.run(["vde_switch", "-s", str(sock), "-d", "-p", str(pidfile), "--dirmode", "0700"])
        _record_pidfile(ledger, key, pidfile)
    plugs = [port for port in p.ports if isinstance(port, VdePort)]
    for port in plugs:
        sock = Path(port.socket)
        pidfile = sock.parent / f"{port.host_if}.pid"
        key = f"{t}/plug/{port.host_if}"
        ledger.record(OWNER, "process", key, pidfile=str(pidfile))
        proc.run(["ip", "netns", "exec", port.ns, "vde_plug2tap", "-s", str(sock), "-d",
                  "-P", str(pidfile), port.eth])
        _record_pidfile(ledger, key, pidfile)
    # The taps appear asynchronously inside the namespaces: wait for them before
    # the namespaces are configured.
    deadline = time.monotonic() + 10
    for port in plugs:
        while proc.run(["ip", "-n", port.ns, "link", "show", port.eth], check=False).returncode:
            if time.monotonic() > deadline:
                raise LiveError(f"vde_plug2tap did not create {port.eth} in {port.ns}")
            time.sleep(0.05)


def _start_wires(p: Plan, ledger: Ledger) -> None:
    base = run_base(p.name) / "wire"
    ledger.record(OWNER, "dir", f"{p.name}/wire", path=str(base))
    base.mkdir(parents=True, exist_ok=True)
    host_taps = [n for w in p.wires for n in w.links()]
    ledger.record_many(OWNER, "link", [(f"{p.name}/{t}", {"ifname": t}) for t in host_taps])

    def daemon(key: str, argv: list[str], pidfile: Path) -> None:
        ledger.record(OWNER, "process", key, pidfile=str(pidfile))
        proc.run(argv)
        _record_pidfile(ledger, key, pidfile)

    waits: list[tuple[str | None, str]] = []
    for wire in p.wires:
        socks = []
        for i, end in enumerate(wire.ends):
            if end.kind == "vde":
                socks.append(end.where)
                continue
            sock = base / f"{wire.key}.{i}"
            pidfile = base / f"{wire.key}.{i}.pid"
            tap = str(end.ifname)
            argv = ["vde_switch", "-s", str(sock), "-t", tap, "-d", "-p", str(pidfile), "--dirmode", "0700"]
            if end.kind == "ns":
                argv = ["ip", "netns", "exec", end.where] + argv
            daemon(f"{p.name}/wire/{wire.key}.{i}", argv, pidfile)
            socks.append(str(sock))
            waits.append((end.where if end.kind == "ns" else None, tap))
        props = wire.props
        argv = ["wirefilter", "-v", f"{socks[0]}:{socks[1]}", "--daemon",
                "--pidfile", str(base / f"{wire.key}.wf.pid")]
        if props.delay_us is not None or props.jitter_us is not None:
            delay = f"{(props.delay_us or 0) / 1000:g}"
            if props.jitter_us:
                delay += f"+{props.jitter_us / 1000:g}"
            argv += ["-d", delay]
        if props.loss_pct is not None:
            argv += ["-l", f"{props.loss_pct:g}"]
        daemon(f"{p.name}/wire/{wire.key}.wf", argv, base / f"{wire.key}.wf.pid")
    deadline = time.monotonic() + 10
    for ns, tap in waits:
        argv = (["ip", "-n", ns] if ns else ["ip"]) + ["link", "show", tap]
        while proc.run(argv, check=False).returncode:
            if time.monotonic() > deadline:
                raise LiveError(f"vde_switch did not create {tap}" + (f" in {ns}" if ns else ""))
            time.sleep(0.05)
    lines = []
    for wire in p.wires:
        for end in wire.ends:
            if end.kind == "bridge":
                lines += [f"link set {end.ifname} mtu {wire.mtu}", f"link set {end.ifname} master {end.where} up"]
    _batch(["ip"], lines)


def _build_images(net: Net, names: list[str], progress: Progress) -> dict[str, str]:
    """Build (or find in the content-addressed cache) each image the vms use, from
    the spec the description names; returns description name -> image name."""
    from megafleet.imagegen import store

    out = {}
    for name in names:
        image = store.build(net.images[name][0], progress=progress)
        out[name] = image.name
    return out


def _record_pidfile(ledger: Ledger, key: str, pidfile: Path) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pid = int(pidfile.read_text().strip())
            rp = proc.RecordedProcess.of(pid)
            ledger.record(OWNER, "process", key, pidfile=str(pidfile), pid=rp.pid, start=rp.start)
            return
        except (OSError, ValueError, ProcessLookupError):
            time.sleep(0.02)
    raise LiveError(f"no pid in {pidfile} after starting a daemon")


def shape_container_ports(p: Plan, nodes: set[str] | None = None) -> None:
    """The rate limits (tbf) of container guests' ports, on their host ends:
    after the guests started, since each container's launcher creates its veth
    pair (hostplan.ContainerPort). `nodes`: only these guests' ports."""
    lines = [line for port in p.ports
             if isinstance(port, ContainerPort) and port.props.rate_bit is not None
             and (nodes is None or port.node in nodes)
             for line in _tbf_lines(port.host_if, port.props)]
    _batch(["tc"], lines)


def _shape_and_route(p: Plan) -> None:
    host_tc: list[str] = []
    ns_tc: dict[str, list[str]] = {}
    for port in p.ports:
        if port.props.rate_bit is None or isinstance(port, (WiredPort, GuestVdePort, ContainerPort)):
            continue      # container ports: shape_container_ports, once their guests run
        if isinstance(port, (VethPort, TapPort)):
            host_tc += _tbf_lines(port.host_if, port.props)
        if isinstance(port, (VethPort, VdePort)):
            ns_tc.setdefault(port.ns, []).extend(_tbf_lines(port.eth, port.props))
    for link in p.p2p:
        ns_tc.setdefault(link.ns_a, []).extend(_tbf_lines(link.eth_a, link.props))
        ns_tc.setdefault(link.ns_b, []).extend(_tbf_lines(link.eth_b, link.props))
    for trunk in p.trunks:
        host_tc += _tbf_lines(trunk.if_a, trunk.props) + _tbf_lines(trunk.if_b, trunk.props)
    for wire in p.wires:
        for end in wire.ends:
            if end.kind == "ns" and end.ifname:
                ns_tc.setdefault(end.where, []).extend(_tbf_lines(end.ifname, wire.props))
            elif end.kind == "bridge" and end.ifname:
                host_tc += _tbf_lines(end.ifname, wire.props)
    _batch(["tc"], host_tc)
    for ns, lines in ns_tc.items():
        _batch(["tc", "-n", ns], lines)


async def start_routers(p: Plan, ledger: Ledger, progress: Progress = _quiet) -> None:
    """The routing daemons (FRR or BIRD) of the namespace routers, started with
    admission control and progress lines (netlang.routers)."""
    from megafleet.netlang import routers

    report = await routers.start(p, ledger, progress)
    progress(f"started {report.daemons} routing daemons on {report.routers} routers "
             f"({report.seconds:.1f} s)")


async def start_vm_frr(vm_frr: dict[str, dict[str, str]], timeout: float = 60.0) -> None:
    """FRR in the VM routers (router -> daemon -> configuration): each daemon's
    configuration is written into the guest and the daemon started there,
    through the guest's exec channel. The image's zebra is already running (it
    is an autostart service of the router image); the daemons live and die with
    the guest, so nothing is recorded on the host."""
    from megafleet.vm.guestexec import GuestExecError, exec_in_guest, exec_socket
    from megafleet.vm.state import VmState

    # The configuration is the second word: the exec channel carries any word intact.
    script = ('umask 027; printf %s "$2" > "/etc/frr/$1.conf" && chown frr:frr "/etc/frr/$1.conf" '
              '&& exec "/usr/lib/frr/$1" -d -f "/etc/frr/$1.conf"')
    if not vm_frr:
        return
    records = {r.name: r for r in await trio.to_thread.run_sync(lambda: VmState().list())}
    for router, daemons in sorted(vm_frr.items()):
        record = records.get(router)
        for daemon in sorted(d for d in daemons if d != "zebra"):
            try:
                sock = exec_socket(router, record.handle if record else None)
                r = await exec_in_guest(sock, ["sh", "-c", script, "sh", daemon, daemons[daemon]], timeout)
            except GuestExecError as exc:
                raise LiveError(f"router {router}: cannot start {daemon} in the guest: {exc}") from None
            if r.rc != 0:
                raise LiveError(f"router {router}: {daemon} did not start in the guest (exit {r.rc}): "
                                f"{(r.stderr or r.stdout).decode(errors='replace').strip()[-300:]} "
                                "(is it the router image, with FRR?)")


def _link_records(p: Plan, links: list[str]) -> list[tuple[str, dict]]:
    """The ledger records of `links` (host interface names of plan `p`): a
    container guest's veth names its guest, whose launcher makes it
    (hostplan.ContainerPort), so it is there exactly while the guest runs."""
    guest_of = {port.host_if: port.node for port in p.ports if isinstance(port, ContainerPort)}
    return [(f"{p.name}/{name}", {"ifname": name, **({"guest": guest_of[name]} if name in guest_of else {})})
            for name in links]


def _intact(testbed: str, ledger: Ledger) -> bool:
    links, nss = existing_links(), existing_netns()
    for r in ledger.list(OWNER):
        if not r.key.startswith(testbed + "/"):
            continue
        if r.kind == "netns" and r.data["ns"] not in nss:
            return False
        # A container guest's veth comes and goes with the guest (the vm engine's concern).
        if r.kind == "link" and r.data["ifname"] not in links and "guest" not in r.data:
            return False
        # A startup command's process (exec) may end on its own: not a sign of
        # a broken network.
        if r.kind == "process" and not r.key.startswith(f"{testbed}/exec/") and (
                "pid" not in r.data or not proc.RecordedProcess(r.data["pid"], r.data["start"]).alive()):
            return False
    return True


# ---------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------

def down(testbed: str, progress: Progress = _quiet, ledger: Ledger | None = None) -> dict:
    return trio.run(adown, testbed, progress, ledger)


async def adown(testbed: str, progress: Progress = _quiet, ledger: Ledger | None = None) -> dict:
    """Remove everything recorded for `testbed`, tolerating what is already gone."""
    if os.geteuid() != 0:
        raise LiveError("net down needs root")
    ledger = ledger or Ledger()
    t0 = time.monotonic()
    mine = [r for r in ledger.list(OWNER) if r.key.startswith(testbed + "/") or
            (r.kind in ("testbed", "vms") and r.key == testbed)]
    by_kind: dict[str, list] = {}
    for r in mine:
        by_kind.setdefault(r.kind, []).append(r)
    if "vms" in by_kind:
        from megafleet.vm.api import remove

        # All the testbed's guests in one engine pass: one by one, 1,100
        # containers took minutes.
        names = {name for r in by_kind["vms"] for name in r.data["names"]}
        t1 = time.monotonic()
        await remove(names, ledger)
        progress(f"removed {len(names)} guests ({time.monotonic() - t1:.1f} s)")
        ledger.forget_many(OWNER, "vms", [r.key for r in by_kind["vms"]])
    result = await trio.to_thread.run_sync(_down_sync, testbed, by_kind, ledger, progress)
    ledger.forget_many(OWNER, "testbed", [r.key for r in by_kind.get("testbed", [])])
    result["seconds"] = time.monotonic() - t0
    progress(f"testbed {testbed} is down ({result['seconds']:.1f} s)")
    return result


def _down_sync(testbed: str, by_kind: dict, ledger: Ledger, progress: Progress) -> dict:
    from megafleet.netlang import routers

    # Routing daemons first, all at once and without a graceful stop: one by
    # one, each would make every router still running recompute (a storm).
    stopped = routers.kill_all(by_kind.get("process", []))
    for r in by_kind.get("process", []):
        rp = None
        if "pid" in r.data:
            rp = proc.RecordedProcess(r.data["pid"], r.data["start"])
        elif r.data.get("pidfile"):
            # Crashed between start and record: the pidfile names it. Only trust a
            # pid that is not older than the record.
            try:
                pid = int(Path(r.data["pidfile"]).read_text().strip())
                rp = proc.RecordedProcess.of(pid)
            except (OSError, ValueError, ProcessLookupError):
                rp = None
        if rp is not None and rp.alive():
            rp.stop(grace=3)
            stopped += 1
        elif rp is not None:
            rp.reap()           # killed above (or by its cgroup): no zombie left to us
    ledger.forget_many(OWNER, "process", [r.key for r in by_kind.get("process", [])])
    namespaces = [r.data["ns"] for r in by_kind.get("netns", [])]
    for pid in pids_in_netns(namespaces):
        try:
            rp = proc.RecordedProcess.of(pid)
        except ProcessLookupError:
            continue
        rp.stop(grace=3)
        stopped += 1
    present = existing_netns()
    gone_ns = [ns for ns in namespaces if ns in present]
    _batch(["ip"], [f"netns del {ns}" for ns in gone_ns], force=True)
    ledger.forget_many(OWNER, "netns", [r.key for r in by_kind.get("netns", [])])
    links = existing_links()
    gone_links = [r.data["ifname"] for r in by_kind.get("link", []) if r.data["ifname"] in links]
    # Deleting one end of a veth removes the other; ignore "cannot find device".
    _batch(["ip"], [f"link del {name}" for name in gone_links], force=True)
    ledger.forget_many(OWNER, "link", [r.key for r in by_kind.get("link", [])])
    _restore_sysctls(testbed, by_kind.get("sysctl", []), ledger)
    for r in by_kind.get("dir", []):
        shutil.rmtree(r.data["path"], ignore_errors=True)
    ledger.forget_many(OWNER, "dir", [r.key for r in by_kind.get("dir", [])])
    base = run_base(testbed)
    shutil.rmtree(base, ignore_errors=True)
    # The shared parents go too once no other testbed uses them.
    for parent in (base.parent, base.parent.parent):
        if parent.name in ("net", "megafleet-net"):
            try:
                parent.rmdir()
            except OSError:
                pass
    return {"testbed": testbed, "namespaces": len(gone_ns), "links": len(gone_links),
            "processes": stopped}
