"""The network sniff: packets and bytes by protocol on one switch (bridge).

An AF_PACKET socket bound to the bridge, in promiscuous mode (so the bridge
passes up the frames it forwards between its ports), reads only the first bytes
of each frame (MSG_TRUNC still reports the frame's length). Each interval the
counts by protocol go out as one `sniff` sample; raw packets are never kept.
What the kernel dropped because we were too slow comes from PACKET_STATISTICS
and is reported as `kernel_drops`: best effort, but counted.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable

import trio

from megafleet.collect import docs as D
from megafleet.names import check_name

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_STATISTICS = 6
HEAD = 64  # bytes of each frame we look at: Ethernet + VLAN + IP headers

ETHERTYPES = {0x0800: "ipv4", 0x86DD: "ipv6", 0x0806: "arp", 0x88CC: "lldp",
              0x8035: "rarp"}
IP_PROTOCOLS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 58: "icmp6",
                89: "ospf", 112: "vrrp", 132: "sctp"}


def classify(frame: bytes | memoryview, length: int) -> str:
    """A protocol key for one frame (valid as a MongoDB field name), from its
    first bytes: ipv4_tcp, ipv6_udp, arp, ... or ether_0xNNNN."""
    if length < 14:
        return "runt"
    ethertype = (frame[12] << 8) | frame[13]
    offset = 14
    while ethertype in (0x8100, 0x88A8) and length >= offset + 4:  # VLAN tags
        ethertype = (frame[offset + 2] << 8) | frame[offset + 3]
        offset += 4
    family = ETHERTYPES.get(ethertype)
    if family is None:
        return f"ether_0x{ethertype:04x}"
    if family == "ipv4" and length > offset + 9:
        proto = frame[offset + 9]
    elif family == "ipv6" and length > offset + 6:
        proto = frame[offset + 6]
    else:
        return family
    return f"{family}_{IP_PROTOCOLS.get(proto, str(proto))}"


class Summary:
    """Counts for one interval."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.protocols: dict[str, list[int]] = {}

    def add(self, key: str, length: int) -> None:
        self.packets += 1
        self.bytes += length
        entry = self.protocols.get(key)
        if entry is None:
            self.protocols[key] = [1, length]
        else:
            entry[0] += 1
            entry[1] += length

    def fields(self, interval_s: float, kernel_drops: int) -> dict[str, Any]:
        return {"interval_s": round(interval_s, 3), "packets": self.packets,
                "bytes": self.bytes, "kernel_drops": kernel_drops,
                "protocols": {k: {"packets": p, "bytes": b}
                              for k, (p, b) in sorted(self.protocols.items())}}


def open_socket(ifname: str) -> socket.socket:
    """A non-blocking promiscuous packet socket on `ifname` (needs root)."""
    check_name(ifname, "switch interface")
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((ifname, ETH_P_ALL))
        index = socket.if_nametoindex(ifname)
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                        struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def kernel_drops(sock: socket.socket) -> int:
    """Frames the kernel dropped for this socket since the last call."""
    _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return drops


class SwitchSniffer:
    """Summarises the traffic of one switch every `interval` seconds."""

    name = "sniff"

    def __init__(self, host: str, switch: str, ifname: str | None = None,
                 interval: float = 10.0):
        self.host = host
        self.switch = check_name(switch, "switch")
        self.ifname = ifname or switch
        self.interval = float(interval)

    async def run(self, submit: Callable[[dict[str, Any]], None], *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = open_socket(self.ifname)
        buf = bytearray(HEAD)
        view = memoryview(buf)
        summary, started = Summary(), trio.current_time()
        try:
            kernel_drops(sock)  # reset the kernel's counters
            task_status.started()
            started = trio.current_time()
            deadline = started + self.interval
            while True:
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(sock)
                # Drain what is there; yield now and then so other tasks run.
                for _ in range(4096):
                    try:
                        length = sock.recv_into(buf, HEAD, socket.MSG_TRUNC)
                    except BlockingIOError:
                        break
                    except OSError:
                        break  # interface went away; the next interval says 0
                    summary.add(classify(view, length), length)
                now = trio.current_time()
                if now >= deadline:
                    submit(D.sample(D.SNIFF, self.host,
                                    summary.fields(now - started, kernel_drops(sock)),
                                    switch=self.switch))
                    summary, started = Summary(), now
                    deadline = now + self.interval
                await trio.lowlevel.checkpoint()
        finally:
            # Stopping (cancelled) still reports the last, partial interval:
            # submit only enqueues, so it is safe here.
            if summary.packets:
                now = trio.current_time()
                submit(D.sample(D.SNIFF, self.host,
                                summary.fields(now - started, kernel_drops(sock)),
                                switch=self.switch))
            sock.close()
