"""A container's network, configured from the host over rtnetlink: no process per
guest, no `ip` fork inside the guest.

The container launcher (`nsspawn`) uses this around the creation of a new
container's network namespace, before it forks the container's init there:
`prepare_inside` (the namespace's defaults, from inside), `move_in` and
`host_ends_ipv6_off` (from the host's namespace: veth pairs with their host
ends up on their bridges, IPv6 off, and their far ends born inside, renamed
ethN, with the guest's MAC and MTU), then `configure_inside` (lo up,
addresses, static routes and gateways, on a socket opened inside); `setup`
runs the four. The guest's init then only prints its ready line.

Stdlib only: `nsspawn` runs as ``python -I -S`` and imports this file, and
the rtnetlink encoding it shares with the rest of megafleet (megafleet.rtnl),
by path. Plain data in, `CnetError` (an OSError naming the operation the
kernel refused) out.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass, field

try:
    from megafleet import rtnl
except ImportError:     # in the launcher (python -I -S): megafleet's directory is on sys.path
    import rtnl  # type: ignore[no-redef]

VETH_INFO_PEER = 1                                          # linux/veth.h
IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE = 8, 1     # linux/if_link.h


class CnetError(OSError):
    pass


@dataclass(frozen=True)
class Nic:
    """One NIC, `name` (eth0, ...) with `mac` inside; `addresses` are CIDRs
    (IPv4 or IPv6), `mtu` optional. With `bridge`: a veth pair to create, host
    end `dev` on that bridge, far end born inside. Without: `dev` is an existing
    veth end on the host, moved in and renamed."""

    dev: str
    name: str
    mac: str
    addresses: tuple[str, ...] = ()
    mtu: int | None = None
    bridge: str | None = None


@dataclass(frozen=True)
class NetConfig:
    """Everything of a container's network the host sets up before its init runs.
    `routes` are (destination CIDR, via) pairs; `forward` makes it a router."""

    nics: tuple[Nic, ...] = ()
    gateway: str | None = None
    gateway6: str | None = None
    routes: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    forward: bool = False

    @classmethod
    def from_json(cls, data: dict) -> "NetConfig":
        return cls(nics=tuple(Nic(n["dev"], n["name"], n["mac"], tuple(n.get("addresses", ())),
                                  n.get("mtu"), n.get("bridge")) for n in data.get("nics", ())),
                   gateway=data.get("gateway"), gateway6=data.get("gateway6"),
                   routes=tuple((d, v) for d, v in data.get("routes", ())),
                   forward=bool(data.get("forward")))


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def move_message(index: int, netns_fd: int, name: str, mac: str, seq: int, *,
                 up: bool = False, mtu: int | None = None) -> bytes:
    """RTM_NEWLINK: link `index` into the namespace of `netns_fd`, renamed, new MAC
    (what `ip link set DEV netns NS name NAME address MAC [mtu N] [up]` sends;
    the kernel moves the link first, then applies the rest there)."""
    flag = rtnl.IFF_UP if up else 0
    body = (rtnl.ifinfo(index, flag, flag) + rtnl.u32(rtnl.IFLA_NET_NS_FD, netns_fd)
            + rtnl.attr(rtnl.IFLA_IFNAME, name.encode() + b"\0") + rtnl.attr(rtnl.IFLA_ADDRESS, _mac(mac)))
    if mtu is not None:
        body += rtnl.u32(rtnl.IFLA_MTU, int(mtu))
    return rtnl.request(rtnl.RTM_NEWLINK, 0, seq, body)


def veth_message(host: str, bridge_index: int, peer: str, mac: str, netns_fd: int, seq: int, *,
                 mtu: int | None = None, up: bool = False) -> bytes:
    """RTM_NEWLINK creating a veth pair: `host` on the bridge of `bridge_index`
    (up at once with `up`); its peer `peer` with `mac`, down, created directly
    in the namespace of `netns_fd` (what `ip link add HOST mtu N master BR up
    type veth peer name PEER address MAC mtu N netns NS numtxqueues 1
    numrxqueues 1` sends). A host end up before its peer has no carrier: the
    kernel configures nothing of IPv6 on it until the peer comes up.

    No RCU grace period is waited for under rtnl: no link changes namespace,
    and both ends are made with one queue each way. Without the queue counts
    the kernel makes a veth end with one queue per CPU, then cuts it to one
    (veth_init_queues), which waits for a grace period; with thousands of
    guests starting, every other namespace and link change queues behind it."""
    mtu_attr = rtnl.u32(rtnl.IFLA_MTU, int(mtu)) if mtu is not None else b""
    one_queue = rtnl.u32(rtnl.IFLA_NUM_TX_QUEUES, 1) + rtnl.u32(rtnl.IFLA_NUM_RX_QUEUES, 1)
    peer_body = (rtnl.ifinfo(0) + rtnl.attr(rtnl.IFLA_IFNAME, peer.encode() + b"\0")
                 + rtnl.attr(rtnl.IFLA_ADDRESS, _mac(mac)) + mtu_attr + one_queue
                 + rtnl.u32(rtnl.IFLA_NET_NS_FD, netns_fd))
    info = (rtnl.attr(rtnl.IFLA_INFO_KIND, b"veth\0")
            + rtnl.attr(rtnl.IFLA_INFO_DATA | rtnl.NLA_F_NESTED, rtnl.attr(VETH_INFO_PEER, peer_body)))
    flag = rtnl.IFF_UP if up else 0
    body = (rtnl.ifinfo(0, flag, flag) + rtnl.attr(rtnl.IFLA_IFNAME, host.encode() + b"\0") + mtu_attr
            + one_queue + rtnl.u32(rtnl.IFLA_MASTER, bridge_index)
            + rtnl.attr(rtnl.IFLA_LINKINFO | rtnl.NLA_F_NESTED, info))
    return rtnl.request(rtnl.RTM_NEWLINK, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL, seq, body)


def no_ipv6_ll_message(index: int, seq: int) -> bytes:
    """RTM_NEWLINK: no IPv6 link-local address on link `index` when it comes up
    (`ip link set DEV addrgenmode none`)."""
    inet6 = rtnl.attr(IFLA_INET6_ADDR_GEN_MODE, struct.pack("=B", IN6_ADDR_GEN_MODE_NONE))
    body = rtnl.ifinfo(index) + rtnl.attr(rtnl.IFLA_AF_SPEC | rtnl.NLA_F_NESTED,
                                          rtnl.attr(socket.AF_INET6 | rtnl.NLA_F_NESTED, inet6))
    return rtnl.request(rtnl.RTM_NEWLINK, 0, seq, body)


def addr_message(index: int, cidr: str, seq: int) -> bytes:
    """RTM_NEWADDR: `cidr` (an IPv4 or IPv6 interface address) on link `index`."""
    iface = ipaddress.ip_interface(cidr)
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    return rtnl.addr_add(index, family, iface.ip.packed, iface.network.prefixlen, seq)


def route_message(dest: str | None, via: str, seq: int) -> bytes:
    """A route to `dest` (None: the default route) via a gateway."""
    gw = ipaddress.ip_address(via)
    family = socket.AF_INET if gw.version == 4 else socket.AF_INET6
    net = ipaddress.ip_network(dest) if dest else None
    return rtnl.route_add(family, net.network_address.packed if net is not None else None,
                          net.prefixlen if net is not None else 0, gw.packed, seq)


def route_socket() -> socket.socket:
    """An rtnetlink socket of the calling process's network namespace; it
    keeps speaking to that namespace after the process enters another (the
    launcher keeps one of the host's for every container)."""
    return rtnl.route_socket()


def _send_on(sock: socket.socket, messages: list[tuple[bytes, str]]) -> None:
    """Send a batch of (message, what it does) and wait for every
    acknowledgement (rtnl.exchange); CnetError names the first refused."""
    rtnl.exchange(sock, [m for m, _ in messages], lambda i: messages[i][1], CnetError)


def del_message(name: str, seq: int) -> bytes:
    """RTM_DELLINK of the link called `name` in the socket's namespace."""
    body = rtnl.ifinfo(0) + rtnl.attr(rtnl.IFLA_IFNAME, name.encode() + b"\0")
    return rtnl.request(rtnl.RTM_DELLINK, 0, seq, body)


def host_indexes(nics: tuple[Nic, ...]) -> dict[str, int]:
    """The host's interface index of every bridge and existing veth end that
    `nics` name, looked up in the caller's network namespace (the host's: call
    this before entering the container's). CnetError names what is missing."""
    indexes = {}
    for nic in nics:
        name = nic.bridge if nic.bridge is not None else nic.dev
        try:
            indexes[name] = socket.if_nametoindex(name)
        except OSError:
            if nic.bridge is not None:
                raise CnetError(f"no bridge {nic.bridge!r} on this host for {nic.dev} (the network "
                                "layer creates the bridges before the guests boot)") from None
            raise CnetError(f"no interface {nic.dev!r} on this host to move into the container "
                            "(the network layer creates the veth before the guest boots)") from None
    return indexes


def _host_messages(nics: tuple[Nic, ...], netns_fd: int, indexes: dict[str, int]) -> list[tuple[bytes, str]]:
    """The host-side messages of `nics` (`indexes` from `host_indexes`): a
    veth pair created for each NIC with a bridge (its host end up), the
    existing far end moved in for the others."""
    messages = []
    for seq, nic in enumerate(nics, 1):
        if nic.bridge is not None:
            messages.append((veth_message(nic.dev, indexes[nic.bridge], nic.name, nic.mac, netns_fd, seq,
                                          mtu=nic.mtu, up=True),
                             f"creating veth {nic.dev} on {nic.bridge} with {nic.name} in the container"))
        else:
            messages.append((move_message(indexes[nic.dev], netns_fd, nic.name, nic.mac, seq),
                             f"moving {nic.dev} into the container as {nic.name}"))
    return messages


def move_in(nics: tuple[Nic, ...], host_sock: socket.socket, netns_fd: int,
            indexes: dict[str, int]) -> None:
    """Over `host_sock`, give each NIC its end inside the namespace of
    `netns_fd`: a veth pair created with the far end born there and the host
    end up on its bridge (a NIC with a bridge), or the existing host-side end
    moved in; renamed, with its MAC; the far end left down.

    A host end still there under its name is the previous incarnation's of
    the same guest (a restart or a retry): killing a container leaves the
    deletion of its network namespace, and with it its veth pairs, to the
    kernel's work queue, which may not have run yet. It is deleted and the
    creation made again, once (names are unique per host: issue 13)."""
    try:
        _send_on(host_sock, _host_messages(nics, netns_fd, indexes))
    except CnetError as exc:
        if exc.errno != errno.EEXIST:
            raise
        for seq, nic in enumerate(nics, 1):
            if nic.bridge is not None:
                try:
                    _send_on(host_sock, [(del_message(nic.dev, seq), f"link del {nic.dev}")])
                except CnetError as gone:
                    if gone.errno != errno.ENODEV:
                        raise
        _send_on(host_sock, _host_messages(nics, netns_fd, indexes))


def _sysctl(key: str, value: str, required: bool = True) -> None:
    # /proc/sys/net shows the namespace of the process that opens it.
    try:
        with open(f"/proc/sys/net/{key}", "w") as f:
            f.write(value)
    except OSError as exc:
        if required:
            raise CnetError(exc.errno, f"writing {key}: {exc.strerror}") from None


def prepare_inside(config: NetConfig) -> None:
    """From inside the container's fresh network namespace, before its NICs
    arrive: the defaults they inherit. For a guest with IPv6 addresses no
    IPv6 duplicate address detection and no router solicitations (addresses
    are static; DAD's delayed work takes the kernel's global rtnl lock once
    per address, which a thousand guests booting at once queue on);
    forwarding for a router. CnetError names a setting refused."""
    if _has_ipv6(config):
        # Without IPv6 addresses the NICs get no link-local address
        # (`configure_inside`), so no DAD and no router solicitation to turn
        # off; and every open of /proc/sys/net compares its dentry against one
        # per namespace on the host (proc_sys_compare: 2.9 % of the CPU of an
        # `up` of 5,000).
        _sysctl("ipv6/conf/default/accept_dad", "0", required=False)
        _sysctl("ipv6/conf/default/router_solicitations", "0", required=False)
    if config.forward:
        _sysctl("ipv4/ip_forward", "1")
        _sysctl("ipv6/conf/all/forwarding", "1", required=False)


def host_ends_ipv6_off(nics: tuple[Nic, ...]) -> None:
    """From the host's network namespace, right after `move_in` and before
    the far ends come up: IPv6 off on the host end of every pair created
    (a bridge port needs no address; the bridge forwards IPv6 all the same).

    Why: a host end with IPv6 gets, when its carrier comes up, a route to
    ff00::/8 in the host's table, inserted beside the one of every other
    port (fib6_add_rt2node walks them all), and a walk of the host's whole
    IPv6 table (fib6_ifup), again at its end (fib6_ifdown): work that grows
    with the guests already up, under the rtnl lock. bench/container_net.py,
    5,000 namespaces on bridges of 256 ports: 1.34 ms of network per
    namespace with it off, 5.31 ms with it on (bench/RESULTS.md, session 6).
    The sysctl, as no netlink attribute sets it; its write retries while
    another holds rtnl, which with one launcher per CPU is a short wait. A
    kernel without IPv6 has nothing to turn off."""
    for nic in nics:
        if nic.bridge is not None:
            _sysctl(f"ipv6/conf/{nic.dev}/disable_ipv6", "1", required=False)


def configure_inside(config: NetConfig) -> None:
    """From inside the container's network namespace, its NICs there
    (`move_in`): on a guest without IPv6 addresses no IPv6 link-local address
    on its NICs (each would be one more pass of the kernel's DAD work under
    rtnl), lo and the NICs up (with their MTUs), addresses, static routes,
    gateways; one batch of rtnetlink messages, no process.

    Not the `addr_gen_mode` sysctl for the link-local address: its handler
    only try-locks rtnl and restarts the write(2) while another holds it, so
    a thousand launchers at once spun in it (most of the CPU of a 1,000-guest
    boot, perf on lan1000). The per-link attribute waits its turn for rtnl
    like every netlink request. CnetError names the operation refused."""
    with route_socket() as sock:
        _send_on(sock, _config_messages(config))


def _enter(fd: int) -> None:
    """The calling thread into the network namespace of `fd`."""
    rtnl.enter_netns(fd, CnetError)


def setup(config: NetConfig, host_sock: socket.socket, host_netns_fd: int, netns_fd: int,
          indexes: dict[str, int]) -> None:
    """The whole network of a new container, in the order above, from a
    single-threaded caller inside the container's fresh network namespace
    (`netns_fd`) that holds `host_sock` and `indexes` from the host's
    (`host_netns_fd`): `prepare_inside`; from the host's namespace, where
    /proc/sys/net is the host's, `move_in` and `host_ends_ipv6_off`; inside
    again, `configure_inside`. The caller is back inside on return; after a
    CnetError it may be in either namespace."""
    prepare_inside(config)
    _enter(host_netns_fd)
    move_in(config.nics, host_sock, netns_fd, indexes)
    host_ends_ipv6_off(config.nics)
    _enter(netns_fd)
    configure_inside(config)


def _has_ipv6(config: NetConfig) -> bool:
    return bool(config.gateway6) or any(":" in a for nic in config.nics for a in nic.addresses)


def _config_messages(config: NetConfig) -> list[tuple[bytes, str]]:
    messages: list[tuple[bytes, str]] = []

    def add(make, what: str) -> None:
        messages.append((make(len(messages) + 1), what))

    add(lambda s: rtnl.link_up(socket.if_nametoindex("lo"), None, s), "link set lo up")
    no_ll = not _has_ipv6(config)
    for nic in config.nics:
        index = socket.if_nametoindex(nic.name)
        if no_ll:
            add(lambda s, i=index: no_ipv6_ll_message(i, s), f"link set {nic.name} addrgenmode none")
        add(lambda s, i=index, m=nic.mtu: rtnl.link_up(i, m, s), f"link set {nic.name} up")
        for cidr in nic.addresses:
            add(lambda s, i=index, c=cidr: addr_message(i, c, s), f"addr add {cidr} dev {nic.name}")
    for dest, via in config.routes:
        add(lambda s, d=dest, v=via: route_message(d, v, s), f"route add {dest} via {via}")
    if config.gateway:
        add(lambda s: route_message(None, config.gateway, s), f"route add default via {config.gateway}")
    if config.gateway6:
        add(lambda s: route_message(None, config.gateway6, s), f"route add default via {config.gateway6}")
    return messages
