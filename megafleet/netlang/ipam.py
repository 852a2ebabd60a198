"""Addresses as integers: parsing, formatting, pools and overlap checks.

Addresses stay plain ints (and contiguous runs of them stay `range` objects), so a
group of 100,000 hosts costs one range, not 100,000 ipaddress objects.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from dataclasses import dataclass, field

BITS = {4: 32, 6: 128}
P2P_PLEN = {4: 30, 6: 126}


@dataclass(frozen=True)
class Subnet:
    family: int
    net: int
    plen: int

    @property
    def size(self) -> int:
        return 1 << (BITS[self.family] - self.plen)

    @property
    def last(self) -> int:
        return self.net + self.size - 1

    def first_host(self) -> int:
        return self.net if self.size <= 2 else self.net + 1

    def capacity(self) -> int:
        """Usable host addresses: v4 loses network and broadcast (except /31, /32);
        v6 loses the subnet-router anycast address ::0."""
        if self.size <= 2:
            return self.size
        return self.size - (2 if self.family == 4 else 1)

    def contains(self, addr: int) -> bool:
        return self.net <= addr <= self.last

    def __str__(self) -> str:
        return f"{fmt(self.family, self.net)}/{self.plen}"


def fmt(family: int, addr: int) -> str:
    if family == 4:
        return socket.inet_ntoa(addr.to_bytes(4, "big"))
    return str(ipaddress.IPv6Address(addr))


def parse_addr(text: str) -> tuple[int, int, int | None] | None:
    """'10.0.0.5' or '10.0.0.5/24' or 'fd00::5/64' -> (family, int, plen or None)."""
    addr, _, plen_text = text.partition("/")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    plen = None
    if plen_text:
        if not plen_text.isdigit() or int(plen_text) > BITS[ip.version]:
            return None
        plen = int(plen_text)
    return ip.version, int(ip), plen


def parse_subnet(text: str) -> Subnet | str:
    """A CIDR with no host bits, or an error message."""
    if "/" not in text:
        return f"{text!r} is not a subnet (expected e.g. 10.1.0.0/16 or fd00::/48)"
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as err:
        if "host bits set" in str(err):
            return f"subnet {text} has host bits set (did you mean {ipaddress.ip_network(text, strict=False)}?)"
        return f"{text!r} is not a subnet (expected e.g. 10.1.0.0/16 or fd00::/48)"
    return Subnet(net.version, int(net.network_address), net.prefixlen)


def looks_like_address(text: str) -> bool:
    return any(c in text for c in ".:") and text[0].isalnum() and parse_addr(text) is not None


class Taken:
    """Address ranges already in use (explicit subnets), for one family: sorted,
    non-overlapping after checks, queried with bisect."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)

    def overlapping(self, start: int, end: int) -> int | None:
        """End of a taken range overlapping [start, end], or None."""
        i = bisect.bisect_right(self.starts, end)
        # Ranges never overlap each other, so only the one starting just before or
        # inside [start, end] can reach into it.
        if i > 0 and self.ends[i - 1] >= start:
            return self.ends[i - 1]
        return None


@dataclass
class Pool:
    name: str
    subnet: Subnet
    per: int
    loc: object = None
    cursor: int = field(default=-1)

    def allocate(self, plen: int, taken: Taken) -> Subnet | None:
        """The next free aligned subnet of length plen, skipping taken ranges."""
        size = 1 << (BITS[self.subnet.family] - plen)
        cur = self.subnet.net if self.cursor < 0 else self.cursor
        while True:
            cur = (cur + size - 1) // size * size
            end = cur + size - 1
            if end > self.subnet.last:
                return None
            clash = taken.overlapping(cur, end)
            if clash is None:
                self.cursor = end + 1
                taken.add(cur, end)
                return Subnet(self.subnet.family, cur, plen)
            cur = clash + 1
