"""Every network interface of the caller's network namespace with its kind and
counters, from one rtnetlink dump (RTM_GETLINK): what the interface sampler
reads each pass.

Why not /sys/class/net: with thousands of guests the host has tens of
thousands of interfaces, and sysfs costs eight opens and reads per interface
per pass (one per counter), plus more to tell its kind. Each file read also
leaves a dentry and an inode pinning the interface's sysfs node after the
interface is gone, until memory pressure prunes them (16 dentries per link;
on this host, after a day of testbeds, 395,000 dentries and 150,000 inodes
that `echo 2 > drop_caches` freed). The dump gives all of it in a few hundred
reads of one socket: 137 ms of CPU for 5,001 links against 2,687 ms through
sysfs (bench/linkstats.py, bench/RESULTS.md, 2026-12-07).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from megafleet import rtnl
from megafleet.rtnl import (IFLA_IFNAME, IFLA_INFO_DATA, IFLA_INFO_KIND, IFLA_LINKINFO, IFLA_STATS64,
                            NLA_TYPE_MASK, NLMSG_DONE, NLMSG_ERROR, RTM_GETLINK, RTM_NEWLINK)

IFLA_TUN_TYPE, IFF_TAP = 3, 0x2        # linux/if_tun.h: a tun device's kind
_STATS64 = struct.Struct("=8Q")     # the first eight counters of rtnl_link_stats64
_unpack_header = rtnl.HEADER.unpack_from
_unpack_attr = rtnl.ATTR.unpack_from
_unpack_index = struct.Struct("=i").unpack_from     # ifinfomsg's index, after family and type


@dataclass(frozen=True)
class LinkStats:
    """One interface: `kind` is bridge, veth, tap, tun, vxlan, another
    rtnetlink link kind (vlan, dummy, ...) or "other" (a physical NIC, lo);
    counters since the interface was created, in bytes and packets."""

    index: int
    name: str
    kind: str
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_errors: int
    tx_errors: int
    rx_dropped: int
    tx_dropped: int


def _kind(data: bytes, start: int, end: int) -> str:
    """The kind of an IFLA_LINKINFO payload: tun devices split into tap and tun."""
    kind, tun_type = "other", None
    for typ, a, b in rtnl.attributes(data, start, end):
        if typ == IFLA_INFO_KIND:
            kind = data[a:b].rstrip(b"\0").decode(errors="replace")
        elif typ == IFLA_INFO_DATA:
            for sub, c, d in rtnl.attributes(data, a, b):
                if sub == IFLA_TUN_TYPE and d > c:
                    tun_type = data[c]
    if kind == "tun":
        return "tun" if tun_type is not None and not tun_type & IFF_TAP else "tap"
    return kind


def parse_links(data: bytes) -> tuple[list[LinkStats], bool]:
    """The RTM_NEWLINK messages of one read of a dump, and whether the dump
    ended in it. Raises OSError for an error message."""
    links = []
    offset, done = 0, False
    while offset + 16 <= len(data):
        length, typ, _, _, _ = _unpack_header(data, offset)
        if length < 16:
            break
        if typ == NLMSG_DONE:
            done = True
        elif typ == NLMSG_ERROR:
            (code,) = rtnl.ERROR_CODE.unpack_from(data, offset + 16)
            if code:
                raise OSError(-code, f"link dump: {os.strerror(-code)}")
        elif typ == RTM_NEWLINK:
            (index,) = _unpack_index(data, offset + 20)
            name, kind, stats = "", "other", None
            # The attributes, inline: a link carries some forty of them.
            a, end = offset + 32, offset + length
            while a + 4 <= end:
                alen, attr = _unpack_attr(data, a)
                if alen < 4:
                    break
                attr &= NLA_TYPE_MASK
                if attr == IFLA_IFNAME:
                    name = data[a + 4:a + alen].rstrip(b"\0").decode(errors="replace")
                elif attr == IFLA_STATS64 and alen - 4 >= _STATS64.size:
                    stats = _STATS64.unpack_from(data, a + 4)
                elif attr == IFLA_LINKINFO:
                    kind = _kind(data, a + 4, a + alen)
                a += (alen + 3) & ~3
            if name and stats is not None:
                links.append(LinkStats(index, name, kind, *stats))
        offset += (length + 3) & ~3
    return links, done


def read_links() -> list[LinkStats]:
    """Every interface of the calling thread's network namespace, in index
    order. OSError if the kernel refuses the dump."""
    with rtnl.route_socket() as sock:
        sock.sendall(rtnl.dump_request(RTM_GETLINK, 1, rtnl.ifinfo(0)))
        # The kernel fills at most 32 KiB per read of a dump (netlink_recvmsg).
        buf = bytearray(65536)
        links: list[LinkStats] = []
        while True:
            n = sock.recv_into(buf)
            more, done = parse_links(bytes(buf[:n]))
            links.extend(more)
            if done:
                return links
