"""The contract between an image's guest init/agent and the host.

One image serves thousands of VMs, so everything per VM travels on the kernel
command line (or, for container guests, in the file /etc/megafleet/cmdline of the
guest's writable layer, same syntax). The guest prints two kinds of lines:

Readiness (once, on the console, when init has applied its configuration)::

    MEGAFLEET-READY name=web1 uptime=3.42

Agent (every `megafleet.agent` seconds, on the virtio-serial port named
org.megafleet.agent, or on the console if there is none)::

    MEGAFLEET-AGENT v=1 name=web1 seq=7 up=73.10 load=0.00,0.01,0.00
        mem=60212,48712,51200 if=eth0:1280:12:980:9,lo:0:0:0:0
        addr=eth0:10.0.0.5/24

(one line; wrapped here). Fields are space-separated key=value tokens; values
contain no spaces. Unknown keys are kept (forward compatible). `mem` is
total,free,available in kB; `if` is name:rx_bytes:rx_packets:tx_bytes:tx_packets
per interface; `addr` is name:cidr per address. The image's agent also sends
`mtu=eth0:1500,lo:65536` (name:mtu per interface), kept in `fields`.

Exec (QEMU and libvirt guests: the host runs a command in the guest over the
virtio-serial port org.megafleet.exec; one request line, one answer line)::

    host -> guest:  ID WORDS
    guest -> host:  MEGAFLEET-EXEC id=ID rc=RC out=STDOUT err=STDERR

ID is lowercase hex; WORDS is base64 of the argv quoted word by word for the
shell (shlex.join), which the guest evaluates: exactly that argv runs, from /,
with no stdin. STDOUT and STDERR are base64 (empty when there was none).

Kernel command-line parameters understood by the guest init:

=========================== ==================================================
megafleet.name=NAME         hostname
megafleet.net=MAC,CIDR[,..] addresses of the interface with that MAC; items
                            `mtu=N` set its MTU. Repeatable, one per interface
megafleet.gw=IP             default IPv4 gateway (megafleet.gw6 for IPv6)
megafleet.route=CIDR,VIA    a static route. Repeatable
megafleet.agent=SECONDS     agent interval; 0 disables the agent
megafleet.svc=a,b           extra services to start (as named in the image)
megafleet.forward=1         forward IPv4 and IPv6 packets (a router)
=========================== ==================================================
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from megafleet.names import check_name

READY_MARKER = "MEGAFLEET-READY"
AGENT_MARKER = "MEGAFLEET-AGENT"
AGENT_PORT_NAME = "org.megafleet.agent"
EXEC_PORT_NAME = "org.megafleet.exec"
EXEC_MARKER = "MEGAFLEET-EXEC"

_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


@dataclass(frozen=True)
class NicConfig:
    mac: str
    addresses: tuple[str, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True)
class GuestConfig:
    """Everything per VM that the guest init applies at boot."""

    name: str
    nics: tuple[NicConfig, ...] = ()
    gateway: str | None = None
    gateway6: str | None = None
    routes: tuple[tuple[str, str], ...] = ()
    agent_interval: float = 5.0
    services: tuple[str, ...] = ()
    forward: bool = False                     # a router: forward IPv4 and IPv6

    def kernel_args(self) -> list[str]:
        """The `megafleet.*` kernel parameters, validated, in a stable order."""
        args = [f"megafleet.name={check_name(self.name, 'guest name')}"]
        for nic in self.nics:
            mac = nic.mac.lower()
            if not _MAC_RE.fullmatch(mac):
                raise ValueError(f"invalid MAC address {nic.mac!r} for guest {self.name}")
            items = [mac] + [str(ipaddress.ip_interface(a)) for a in nic.addresses]
            if nic.mtu is not None:
                items.append(f"mtu={int(nic.mtu)}")
            args.append("megafleet.net=" + ",".join(items))
        if self.gateway:
            args.append(f"megafleet.gw={ipaddress.IPv4Address(self.gateway)}")
        if self.gateway6:
            args.append(f"megafleet.gw6={ipaddress.IPv6Address(self.gateway6)}")
        for dest, via in self.routes:
            args.append(f"megafleet.route={ipaddress.ip_network(dest)},{ipaddress.ip_address(via)}")
        args.append(f"megafleet.agent={self.agent_interval:g}")
        if self.forward:
            args.append("megafleet.forward=1")
        if self.services:
            args.append("megafleet.svc=" + ",".join(check_name(s, "service") for s in self.services))
        return args


@dataclass(frozen=True)
class ReadyLine:
    name: str
    uptime: float
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InterfaceStats:
    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


@dataclass(frozen=True)
class AgentLine:
    name: str
    seq: int
    uptime: float
    load: tuple[float, float, float]
    mem_total_kb: int
    mem_free_kb: int
    mem_available_kb: int
    interfaces: dict[str, InterfaceStats]
    addresses: dict[str, tuple[str, ...]]
    fields: dict[str, str] = field(default_factory=dict)


class BadLine(ValueError):
    pass


def _fields(text: str) -> dict[str, str]:
    out = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            out[key] = value
    return out


def parse_line(line: str) -> ReadyLine | AgentLine | None:
    """Parse one console or agent-port line. Returns None for lines that carry no
    marker (kernel messages and the like); raises BadLine for a marked line that is
    malformed. The marker may be preceded by console noise (\\r, timestamps)."""
    for marker in (READY_MARKER, AGENT_MARKER):
        at = line.find(marker + " ")
        if at >= 0:
            break
    else:
        return None
    fields = _fields(line[at + len(marker):])
    try:
        if marker == READY_MARKER:
            return ReadyLine(name=fields["name"], uptime=float(fields["uptime"]), fields=fields)
        loads = [float(x) for x in fields.get("load", "0,0,0").split(",")] + [0.0, 0.0, 0.0]
        load = (loads[0], loads[1], loads[2])          # 1, 5 and 15 minutes; missing ones 0
        mem = [int(x) for x in fields.get("mem", "0,0,0").split(",")]
        interfaces = {}
        for item in filter(None, fields.get("if", "").split(",")):
            name, rxb, rxp, txb, txp = item.split(":")
            interfaces[name] = InterfaceStats(int(rxb), int(rxp), int(txb), int(txp))
        addresses: dict[str, list[str]] = {}
        for item in filter(None, fields.get("addr", "").split(",")):
            name, _, cidr = item.partition(":")
            addresses.setdefault(name, []).append(cidr)
        return AgentLine(
            name=fields["name"], seq=int(fields.get("seq", 0)), uptime=float(fields["up"]),
            load=load,
            mem_total_kb=mem[0], mem_free_kb=mem[1], mem_available_kb=mem[2],
            interfaces=interfaces,
            addresses={k: tuple(v) for k, v in addresses.items()},
            fields=fields,
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise BadLine(f"malformed {marker} line: {line.strip()!r} ({exc})") from exc
