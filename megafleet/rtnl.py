"""rtnetlink, the kernel's interface for links, addresses and routes: the
message encoding and the request-and-acknowledge exchange that megafleet's
three users of it share.

- netlang.netlink configures the namespaces of a testbed (links up,
  addresses, routes), one batch per namespace;
- vm.cnet builds a container's network from its launcher (veth pairs born
  in the container's namespace, then the same three kinds of message);
- collect.linkstats dumps every link's counters for the interface sampler.

Messages are bytes (an nlmsghdr, a fixed family header, then attributes), so
a batch is one `sendall`; the kernel answers each with an acknowledgement
(NLMSG_ERROR, code 0 for success) carrying the request's sequence number.

Stdlib only and no megafleet import: the container launcher runs as
``python -I -S`` and imports this file by path (vm/nsspawn.py).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from typing import Callable, Sequence

NETLINK_ROUTE = 0
CLONE_NEWNET = 0x40000000

# Message types and flags (linux/netlink.h, linux/rtnetlink.h).
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_NEWROUTE = 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

# Links (linux/if_link.h).
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_LINKINFO, IFLA_STATS64, IFLA_AF_SPEC, IFLA_NET_NS_FD = 18, 23, 26, 28
IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 31, 32
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2

# Addresses (linux/if_addr.h) and routes (linux/rtnetlink.h).
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_NODAD = 0x02
RTA_DST, RTA_GATEWAY = 1, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1

HEADER = struct.Struct("=LHHLL")        # nlmsghdr: length, type, flags, seq, port
ERROR_CODE = struct.Struct("=i")        # an NLMSG_ERROR's code, after its header: 0 or -errno
ATTR = struct.Struct("=HH")             # rtattr: length (with itself), type


def attr(kind: int, data: bytes) -> bytes:
    """One attribute (rtattr): length, type, payload, padded to 4 bytes."""
    length = 4 + len(data)
    return ATTR.pack(length, kind) + data + b"\0" * (-length % 4)


def attributes(data: bytes, start: int, end: int):
    """(type without its flags, payload start, payload end) of each attribute
    in data[start:end], for walking a received message."""
    while start + 4 <= end:
        length, kind = ATTR.unpack_from(data, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def u32(kind: int, value: int) -> bytes:
    """An attribute holding one native-endian 32-bit integer (MTU, index, fd)."""
    return attr(kind, struct.pack("=I", value))


def request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A request of message type `kind` asking for an acknowledgement."""
    return HEADER.pack(16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def dump_request(kind: int, seq: int, body: bytes) -> bytes:
    """A dump request of message type `kind` (RTM_GETLINK, ...): the kernel
    answers with every object, in reads of up to 32 KiB, then NLMSG_DONE."""
    return HEADER.pack(16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def ifinfo(index: int, flags: int = 0, change: int = 0) -> bytes:
    """The link header (ifinfomsg): link `index` (0: by name or new), the IFF_
    `flags` to set among those in `change`."""
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def link_up(index: int, mtu: int | None, seq: int) -> bytes:
    """RTM_NEWLINK: link `index` up, with `mtu` (bytes) when given."""
    body = ifinfo(index, IFF_UP, IFF_UP)
    if mtu is not None:
        body += u32(IFLA_MTU, int(mtu))
    return request(RTM_NEWLINK, 0, seq, body)


def addr_add(index: int, family: int, raw: bytes, plen: int, seq: int) -> bytes:
    """RTM_NEWADDR: address `raw` (4 or 16 bytes, network order) with prefix
    length `plen` on link `index`; `family` is AF_INET or AF_INET6. An IPv6
    address skips duplicate address detection (addresses are planned)."""
    body = struct.pack("=BBBBI", family, plen, 0, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
    if family == socket.AF_INET6:
        body += u32(IFA_FLAGS, IFA_F_NODAD)
    return request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, seq, body)


def route_add(family: int, dst: bytes | None, plen: int, gateway: bytes, seq: int) -> bytes:
    """RTM_NEWROUTE in the main table: to `dst`/`plen` (None and 0: the
    default route) via `gateway` (raw addresses of `family`)."""
    body = struct.pack("=BBBBBBBBI", family, plen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                       RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
    if plen and dst is not None:
        body += attr(RTA_DST, dst)
    body += attr(RTA_GATEWAY, gateway)
    return request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, seq, body)


def route_socket() -> socket.socket:
    """A bound rtnetlink socket of the calling thread's network namespace; it
    keeps speaking to that namespace after the thread enters another."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    sock.bind((0, 0))
    return sock


def exchange(sock: socket.socket, messages: Sequence[bytes], what: Callable[[int], str],
             error: type[OSError] = OSError, where: str = "") -> None:
    """Send a batch of requests with sequence numbers 1..n in order, and read
    every acknowledgement. Raises `error` (errno, text) naming the first
    request the kernel refused as "WHERE: WHAT: strerror", WHAT being
    `what(i)` of its position i from 0 (asked only then: a plan's thousands of
    routes are not described in advance); only after every acknowledgement
    was read, as the socket may serve the next batch, which a stale one would
    answer."""
    if not messages:
        return
    sock.sendall(b"".join(messages))
    pending = len(messages)
    first: tuple[int, int] | None = None
    while pending:
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _, seq, _ = HEADER.unpack_from(data, offset)
            if kind == NLMSG_ERROR:
                (code,) = ERROR_CODE.unpack_from(data, offset + 16)
                pending -= 1
                if code != 0 and first is None:
                    first = (-code, seq)
            offset += (length + 3) & ~3
    if first is not None:
        code, seq = first
        prefix = f"{where}: " if where else ""
        raise error(code, f"{prefix}{what(seq - 1)}: {os.strerror(code)}")


_libc: ctypes.CDLL | None = None


def enter_netns(fd: int, error: type[OSError] = OSError) -> None:
    """The calling thread into the network namespace of `fd` (setns(2) moves
    only the thread). Raises `error` with the errno on refusal."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise error(err, f"setns into a network namespace: {os.strerror(err)}")
