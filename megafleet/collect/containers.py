"""Container guests' telemetry, read by the host: no agent process in any container.

A container shares the host's kernel, so everything its agent used to print is
visible from the host without entering it:

- interface counters as the guest sees them: ``/proc/PID/net/dev`` of its init
  shows its own network namespace (lo and ethN);
- IPv6 addresses (with link-local ones) from ``/proc/PID/net/if_inet6``; IPv4
  addresses are the ones the host configured (`ContainerInfo.addresses`);
- uptime: since its init started (field 22 of ``/proc/PID/stat``);
- load and memory: what the guest's own /proc/loadavg and /proc/meminfo show,
  which are the host's (read once per pass);
- in addition, its CPU seconds and RSS: its init (with its reaped children) and
  the live processes under it.

`ContainerSampler` does that for every running container in one pass per
interval, in the collector's process, and emits the same ``agent`` documents an
agent line would have given (`megafleet.collect.samplers.agent_fields`), with
``source: "host"``, ``cpu_s`` and ``rss_kb`` added. A guest whose agent interval
is 0 gets none, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from megafleet.collect import docs as D
from megafleet.collect.samplers import (CLOCK_TICKS, PAGE_KB, Sampler, agent_fields)
from megafleet.imagegen.contract import AgentLine, InterfaceStats


@dataclass(frozen=True)
class ContainerInfo:
    """One running container guest. `pid` is its init on the host, `pid_start`
    that process's start time in clock ticks (a recycled pid reads as gone);
    `addresses` are the CIDRs per guest interface (eth0, ...) the host set up;
    `interval` the guest's agent interval in seconds (0: no samples)."""

    name: str
    pid: int
    pid_start: int | None = None
    interval: float = 5.0
    addresses: dict[str, tuple[str, ...]] = field(default_factory=dict)


ContainerSource = Callable[[], Iterable[ContainerInfo]]


@dataclass(frozen=True)
class ContainerReading:
    """What one pass read of one container (see the module docstring)."""

    uptime_s: float
    cpu_s: float
    rss_kb: int
    interfaces: dict[str, InterfaceStats]
    ipv6: dict[str, tuple[str, ...]]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def parse_net_dev(text: str) -> dict[str, InterfaceStats]:
    """/proc/net/dev: name -> rx bytes, rx packets, tx bytes, tx packets."""
    out = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        v = rest.split()
        out[name.strip()] = InterfaceStats(int(v[0]), int(v[1]), int(v[8]), int(v[9]))
    return out


def parse_if_inet6(text: str) -> dict[str, tuple[str, ...]]:
    """/proc/net/if_inet6: name -> IPv6 CIDRs (loopback's ::1 included)."""
    import ipaddress

    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        v = line.split()
        if len(v) < 6:
            continue
        addr = ipaddress.IPv6Address(bytes.fromhex(v[0]))
        out.setdefault(v[5], []).append(f"{addr}/{int(v[2], 16)}")
    return {k: tuple(a) for k, a in out.items()}


def _stat_fields(raw: bytes) -> list[bytes]:
    return raw[raw.rindex(b")") + 2:].split()


def _tree_usage(pid: int, proc: str, depth: int = 0) -> tuple[int, int]:
    """CPU clock ticks and RSS pages of the live processes below `pid`."""
    cpu_ticks, rss_pages = 0, 0
    try:
        children = _read(f"{proc}/{pid}/task/{pid}/children").split()
    except OSError:
        return 0, 0
    for child in children:
        try:
            f = _stat_fields(_read(f"{proc}/{int(child)}/stat"))
        except (OSError, ValueError):
            continue  # exited meanwhile: its time lands in its parent's cutime
        cpu_ticks += sum(int(x) for x in f[11:15])
        rss_pages += int(f[21])
        if depth < 16:
            sub_cpu, sub_rss = _tree_usage(int(child), proc, depth + 1)
            cpu_ticks, rss_pages = cpu_ticks + sub_cpu, rss_pages + sub_rss
    return cpu_ticks, rss_pages


def read_container(c: ContainerInfo, host_uptime_s: float, proc: str = "/proc") -> ContainerReading | None:
    """Read one container from the host; None if its init is gone (or its pid
    now belongs to another process)."""
    try:
        f = _stat_fields(_read(f"{proc}/{c.pid}/stat"))
        start = int(f[19])
        if c.pid_start is not None and start != c.pid_start:
            return None
        net_dev = _read(f"{proc}/{c.pid}/net/dev").decode()
        if_inet6 = _read(f"{proc}/{c.pid}/net/if_inet6").decode() if os.path.exists(
            f"{proc}/{c.pid}/net/if_inet6") else ""
    except (OSError, ValueError, IndexError):
        return None
    # utime, stime and the reaped children's cutime, cstime; then the live ones.
    tree_cpu, tree_rss = _tree_usage(c.pid, proc)
    cpu_s = (sum(int(x) for x in f[11:15]) + tree_cpu) / CLOCK_TICKS
    rss_kb = (int(f[21]) + tree_rss) * PAGE_KB
    return ContainerReading(uptime_s=round(max(0.0, host_uptime_s - start / CLOCK_TICKS), 2),
                            cpu_s=round(cpu_s, 3), rss_kb=rss_kb,
                            interfaces=parse_net_dev(net_dev), ipv6=parse_if_inet6(if_inet6))


def _meminfo(proc: str) -> tuple[int, int, int]:
    mem = {}
    for line in _read(f"{proc}/meminfo").decode().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemFree", "MemAvailable"):
            mem[key] = int(rest.split()[0])
    return mem.get("MemTotal", 0), mem.get("MemFree", 0), mem.get("MemAvailable", 0)


class ContainerSampler(Sampler):
    """Agent-equivalent samples of every container guest, read from the host in
    one pass per interval (see the module docstring). A guest with a longer
    agent interval than the sampler's is sampled every so many passes."""

    name = "containers"

    def __init__(self, host: str, source: ContainerSource, interval: float = 5.0,
                 proc: Path | str = "/proc"):
        super().__init__(host, interval)
        self.source = source
        self.proc = str(proc)
        self._seq: dict[tuple[str, int], int] = {}     # (guest, pid) -> next seq
        self._due: dict[str, int] = {}                  # guest -> ms of its next sample

    def sample(self, now_ms: int) -> list[dict[str, Any]]:
        containers = [c for c in self.source() if c.interval > 0]
        if not containers:
            self._seq, self._due = {}, {}
            return []
        host_uptime = float(_read(f"{self.proc}/uptime").split()[0])
        l1, l5, l15 = (float(x) for x in _read(f"{self.proc}/loadavg").split()[:3])
        total, free, available = _meminfo(self.proc)
        out = []
        seqs: dict[tuple[str, int], int] = {}
        due: dict[str, int] = {}
        for c in containers:
            key = (c.name, c.pid)
            if now_ms < self._due.get(c.name, 0):
                seqs[key] = self._seq.get(key, 0)
                due[c.name] = self._due[c.name]
                continue
            reading = read_container(c, host_uptime, self.proc)
            if reading is None:
                continue
            seq = self._seq.get(key, 0)
            seqs[key] = seq + 1
            # Half a sampler interval of slack keeps a 5 s guest on a 5 s sampler.
            due[c.name] = now_ms + int((c.interval - self.interval / 2) * 1000)
            # lo is up with 127.0.0.1/8 in every container (the launcher set it up).
            addresses = {"lo": ("127.0.0.1/8",), **{k: tuple(v) for k, v in c.addresses.items()}}
            for dev, cidrs in reading.ipv6.items():
                addresses[dev] = addresses.get(dev, ()) + cidrs
            line = AgentLine(name=c.name, seq=seq, uptime=reading.uptime_s, load=(l1, l5, l15),
                             mem_total_kb=total, mem_free_kb=free, mem_available_kb=available,
                             interfaces=reading.interfaces, addresses=addresses)
            fields = agent_fields(line)
            fields.update(source="host", cpu_s=reading.cpu_s, rss_kb=reading.rss_kb)
            out.append(D.sample(D.AGENT, self.host, fields, guest=c.name, time_ms=now_ms,
                                extra=str(seq)))
        self._seq, self._due = seqs, due
        return out
