"""Samplers: periodic readings of guests, interfaces and the host.

Each sampler has a blocking `sample(now_ms)` that returns documents (it reads
/proc, /sys or rtnetlink, or calls its source) and an async `run(submit)` that calls it in a
worker thread every `interval` seconds (less often when passes would take more
than `CPU_SHARE` of a CPU: at thousands of guests) and hands the documents to
the pipeline. Samplers never write anywhere themselves.

Guests come from a *source*: a callable returning the guests of this host with
their pids (`GuestInfo`). The vm engine provides one; tests and the benchmark use
their own. A source may also fill in CPU time and RSS itself (the libvirt driver
knows them from domain stats); otherwise they are read from /proc/PID.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import trio

from megafleet.collect import docs as D
from megafleet.collect.linkstats import LinkStats, read_links
from megafleet.imagegen.contract import AgentLine, BadLine, ReadyLine, parse_line

log = logging.getLogger("megafleet.collect")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# What one sampler may take of one CPU, over a pass and the wait after it. The
# collector observes a testbed and must never become its biggest process: with
# a fixed cadence its passes grow with the guests, and at 5,000 containers it
# took 43 % of both CPUs during `up` (perf, 2026-12-06). A pass that costs more
# stretches the wait until the next one; at a few hundred guests a pass costs
# milliseconds and the interval is what was asked for.
CPU_SHARE = 0.02
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class GuestInfo:
    """One guest as its engine sees it."""

    name: str
    state: str                      # running, booting, stopped, failed, ...
    pid: int | None = None          # the QEMU (or container init) process
    image: str | None = None
    cpu_s: float | None = None      # if the source knows it (libvirt stats)
    rss_kb: int | None = None
    # Lifecycle, when the engine records it (the vm engine's state does): the
    # sampler turns each new (state, changed_ms) into a boot event, so boots are
    # reported even when the engine runs in another process.
    boot_s: float | None = None     # ready-line time of the successful boot
    reason: str | None = None       # why it failed
    changed_ms: int | None = None   # when the engine last changed this guest


GuestSource = Callable[[], Iterable[GuestInfo]]


class Sampler:
    """Base: `interval` seconds between readings, aligned to a steady cadence.
    `run` hands samples to `submit` and events (meta.kind "event") to
    `submit_event` (default: `submit`)."""

    name = "sampler"

    def __init__(self, host: str, interval: float):
        if interval <= 0:
            raise ValueError(f"{self.name} interval must be positive, got {interval}")
        self.host = host
        self.interval = float(interval)
        self.cpu_share = CPU_SHARE              # of one CPU, at most (0 < share <= 1)
        self.stretched_s: float | None = None   # the last pass's interval, when stretched

    def sample(self, now_ms: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _next_pass(self, next_at: float, cpu_s: float) -> float:
        """When the next pass starts (trio time): `next_at` on the steady
        cadence, or, after a pass that took `cpu_s` seconds of CPU, late enough
        that passes average at most `cpu_share` of a CPU (the first stretch is
        logged). Missed ticks are skipped, not caught up."""
        now = trio.current_time()
        earliest = now + cpu_s * (1 / self.cpu_share - 1)
        if earliest > max(next_at, now):
            stretched = round(earliest - now + cpu_s, 1)
            if self.stretched_s is None:
                log.warning("telemetry sampler %s: a pass takes %.2f s of CPU; sampling every "
                            "%.1f s instead of %g s (at most %g %% of a CPU)", self.name, cpu_s,
                            stretched, self.interval, self.cpu_share * 100)
            self.stretched_s = stretched
            return earliest
        self.stretched_s = None
        return max(next_at, now)

    def final_events(self, now_ms: int) -> list[dict[str, Any]]:
        """Events this sampler owes when the collector stops (blocking): what
        changed since its last interval. None by default."""
        return []

    async def run(self, submit: Callable[[dict[str, Any]], None], *,
                  submit_event: Callable[[dict[str, Any]], None] | None = None,
                  limiter: trio.CapacityLimiter | None = None,
                  on_error: Callable[[str, Exception], None] | None = None) -> None:
        submit_event = submit_event or submit
        next_at = trio.current_time()
        while True:
            cpu = [0.0]
            try:
                docs = await trio.to_thread.run_sync(_cpu_timed, cpu, self.sample, D.now_ms(),
                                                     limiter=limiter)
            except Exception as exc:  # a sampler must never take the collector down
                if on_error is not None:
                    on_error(self.name, exc)
                docs = []
            for doc in docs:
                (submit_event if doc["meta"]["kind"] == "event" else submit)(doc)
            next_at = self._next_pass(next_at + self.interval, cpu[0])
            await trio.sleep_until(next_at)


def _cpu_timed(cpu: list[float], fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a worker thread, adding the thread's CPU seconds for it to
    cpu[0] (also when it raises)."""
    start = time.thread_time()
    try:
        return fn(*args)
    finally:
        cpu[0] += time.thread_time() - start


def _rate(now: float, before: float | None, dt: float) -> float | None:
    if before is None or dt <= 0 or now < before:
        return None  # first reading, or a counter reset
    return round((now - before) / dt, 3)


# --- guests ----------------------------------------------------------------------

def read_proc_usage(pid: int, proc: Path = Path("/proc")) -> tuple[float, int, int] | None:
    """(cpu seconds, rss kB, start time) of a process, or None if it is gone."""
    try:
        with open(proc / str(pid) / "stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(proc / str(pid) / "statm", "rb") as f:
            statm = f.read().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return cpu_s, int(statm[1]) * PAGE_KB, int(fields[19])


def aggregate_guest_samples(host: str, docs: list[dict[str, Any]], now_ms: int) -> list[dict[str, Any]]:
    """One host's guest samples of one interval folded into one `guest` sample
    without a guest in its meta: `guests` (count), `states` ({state: count}),
    `cpu_s` and `cpu_pct` (sums), `cpu_pct_max`, `rss_kb` (sum), `rss_kb_max`,
    `aggregate` True. Events among `docs` are kept as they are, after it."""
    samples = [d for d in docs if d["meta"]["kind"] == D.GUEST]
    events = [d for d in docs if d["meta"]["kind"] != D.GUEST]
    states: dict[str, int] = {}
    cpu_s = cpu_pct = 0.0
    cpu_pct_max = 0.0
    rss = rss_max = 0
    for d in samples:
        states[d["state"]] = states.get(d["state"], 0) + 1
        cpu_s += d.get("cpu_s", 0.0)
        pct = d.get("cpu_pct", 0.0)
        cpu_pct += pct
        cpu_pct_max = max(cpu_pct_max, pct)
        rss += d.get("rss_kb", 0)
        rss_max = max(rss_max, d.get("rss_kb", 0))
    fields = {"aggregate": True, "guests": len(samples), "states": states,
              "cpu_s": round(cpu_s, 3), "cpu_pct": round(cpu_pct, 2), "cpu_pct_max": round(cpu_pct_max, 2),
              "rss_kb": rss, "rss_kb_max": rss_max}
    return [D.sample(D.GUEST, host, fields, time_ms=now_ms, extra="all")] + events


class GuestSampler(Sampler):
    """State, CPU time (and CPU percent over the last interval) and RSS of each
    guest the source lists.

    With many guests, one interval's readings are spread over the interval in
    slices of at most `slice_size` guests (each guest still read once per
    interval, at a steady phase): the store receives a steady trickle instead
    of one burst, so every sample is stored soon after it is taken, and the
    host's CPU is not taken in one gulp every interval.

    With `aggregate`, the host sends one document per interval for all its
    guests instead (`aggregate_guest_samples`: counts by state, CPU and RSS
    totals and maxima); boot and teardown events stay per guest. At a million
    guests on 4,480 hosts that is 448 documents a second for the store instead
    of 100,000."""

    name = "guests"

    def __init__(self, host: str, source: GuestSource, interval: float = 10.0,
                 proc: Path | str = "/proc", slice_size: int = 1000, aggregate: bool = False):
        super().__init__(host, interval)
        self.aggregate = aggregate
        if slice_size < 1:
            raise ValueError(f"guest sampler slice_size must be at least 1, got {slice_size}")
        self.source = source
        self.proc = Path(proc)
        self.slice_size = slice_size
        self._last: dict[str, tuple[int, float, int | None]] = {}  # name -> (ms, cpu, start)
        self._known: set[str] = set()                  # guests seen in the last interval
        self._lifecycle: dict[str, tuple[str, int]] = {}  # name -> (state, changed_ms) reported

    def sample(self, now_ms: int) -> list[dict[str, Any]]:
        """All guests at once (blocking)."""
        guests = list(self.source())
        docs = self.read(guests, now_ms)
        if self.aggregate:
            docs = aggregate_guest_samples(self.host, docs, now_ms)
        return docs + self._forget_gone(guests, now_ms)

    def final_events(self, now_ms: int) -> list[dict[str, Any]]:
        """The boot events of guests that reached running (or failed) since the
        last interval: `down` records the boots an interrupted `up` left
        unrecorded just before it stops the collector, which must not take
        them with it. Teardowns are left to the next collector (guests are
        still listed when `down` stops this one)."""
        return [e for g in self.source() if (e := self._lifecycle_event(g)) is not None]

    def _forget_gone(self, guests: list[GuestInfo], now_ms: int) -> list[dict[str, Any]]:
        """Drop what we kept about guests that are gone; each is a teardown event."""
        names = {g.name for g in guests}
        gone = sorted(self._known - names)
        self._known = names
        self._last = {n: v for n, v in self._last.items() if n in names}
        self._lifecycle = {n: v for n, v in self._lifecycle.items() if n in names}
        return [D.event("teardown", self.host, guest=name, ok=True, time_ms=now_ms,
                        reason="no longer listed by the engine") for name in gone]

    def _lifecycle_event(self, g: GuestInfo) -> dict[str, Any] | None:
        """A boot event the first time a guest is seen running (with its boot
        time) or failed (with its reason) after a change. Its id comes from the
        engine's change time, so a restarted collector re-sends the same id and
        the store keeps one."""
        if g.changed_ms is None or g.state not in ("running", "failed"):
            return None
        if g.state == "running" and g.boot_s is None:
            # Running by its console but not yet recorded so by the engine (or
            # settled by `down`): its boot comes with the record, which may
            # carry this same change time (read after the state): not marked.
            return None
        mark = (g.state, g.changed_ms)
        if self._lifecycle.get(g.name) == mark:
            return None
        self._lifecycle[g.name] = mark
        if g.state == "running" and g.boot_s is not None:      # (None returned above)
            return D.event("boot", self.host, guest=g.name, image=g.image, ok=True,
                           duration_s=round(g.boot_s, 3), time_ms=g.changed_ms)
        return D.event("boot", self.host, level="error", guest=g.name, image=g.image, ok=False,
                       reason=g.reason or "failed", time_ms=g.changed_ms)

    def read(self, guests: list[GuestInfo], now_ms: int) -> list[dict[str, Any]]:
        """Documents for these guests, read now (blocking)."""
        out = []
        for g in guests:
            cpu_s, rss_kb, start = g.cpu_s, g.rss_kb, None
            if g.pid is not None and (cpu_s is None or rss_kb is None):
                usage = read_proc_usage(g.pid, self.proc)
                if usage is not None:
                    cpu_s = usage[0] if cpu_s is None else cpu_s
                    rss_kb = usage[1] if rss_kb is None else rss_kb
                    start = usage[2]
            fields: dict[str, Any] = {"state": g.state}
            if g.pid is not None:
                fields["pid"] = g.pid
            if cpu_s is not None:
                fields["cpu_s"] = round(cpu_s, 3)
                last = self._last.get(g.name)
                # A restarted guest (new process) starts a new CPU series.
                if last is not None and last[2] == start:
                    pct = _rate(cpu_s, last[1], (now_ms - last[0]) / 1000)
                    if pct is not None:
                        fields["cpu_pct"] = round(pct * 100, 2)
                self._last[g.name] = (now_ms, cpu_s, start)
            if rss_kb is not None:
                fields["rss_kb"] = int(rss_kb)
            out.append(D.sample(D.GUEST, self.host, fields, time_ms=now_ms, guest=g.name,
                                image=g.image))
            event = self._lifecycle_event(g)
            if event is not None:
                out.append(event)
        return out

    async def run(self, submit: Callable[[dict[str, Any]], None], *,
                  submit_event: Callable[[dict[str, Any]], None] | None = None,
                  limiter: trio.CapacityLimiter | None = None,
                  on_error: Callable[[str, Exception], None] | None = None) -> None:
        submit_event = submit_event or submit

        def deliver(docs: list[dict[str, Any]]) -> None:
            for doc in docs:
                (submit_event if doc["meta"]["kind"] == "event" else submit)(doc)

        next_at = trio.current_time()
        while True:
            cpu = [0.0]
            try:
                guests = await trio.to_thread.run_sync(_cpu_timed, cpu, lambda: list(self.source()),
                                                       limiter=limiter)
            except Exception as exc:  # the engine's state is unreadable this time
                if on_error is not None:
                    on_error(self.name, exc)
                guests = []
            # Aggregated: every guest in one reading, one document.
            slices = 1 if self.aggregate else max(1, -(-len(guests) // self.slice_size))
            step = self.interval / slices
            for k in range(slices):
                part = guests if self.aggregate else guests[k * self.slice_size:(k + 1) * self.slice_size]
                now_ms = D.now_ms()
                try:
                    docs = await trio.to_thread.run_sync(_cpu_timed, cpu, self.read, part, now_ms,
                                                         limiter=limiter)
                    if self.aggregate:
                        docs = aggregate_guest_samples(self.host, docs, now_ms)
                except Exception as exc:
                    if on_error is not None:
                        on_error(self.name, exc)
                    docs = []
                deliver(docs)
                if k + 1 < slices:
                    await trio.sleep_until(next_at + (k + 1) * step)
            deliver(self._forget_gone(guests, D.now_ms()))
            next_at = self._next_pass(next_at + self.interval, cpu[0])
            await trio.sleep_until(next_at)


# --- interfaces ------------------------------------------------------------------

# The counters of each interface document (LinkStats fields; in sysfs, the
# files of /sys/class/net/DEV/statistics).
COUNTERS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets",
            "rx_dropped", "tx_dropped", "rx_errors", "tx_errors")
VIRTUAL_TYPES = ("tap", "bridge", "veth", "vxlan")


class InterfaceSampler(Sampler):
    """rx/tx bytes, packets, drops, errors (and byte rates) of the host's
    interfaces that `select(name, kind)` accepts: by default taps, bridges,
    veths and vxlans. One rtnetlink dump per pass (`linkstats.read_links`):
    over 5,001 links a pass costs 137 ms of CPU, against 2,687 ms reading
    sysfs as before (bench/linkstats.py, bench/RESULTS.md, 2026-12-07)."""

    name = "interfaces"

    def __init__(self, host: str, interval: float = 10.0,
                 select: Callable[[str, str], bool] | None = None):
        super().__init__(host, interval)
        self.select = select or (lambda name, kind: kind in VIRTUAL_TYPES)
        # name -> (time in ms, counters) of the last pass, for byte rates.
        self._last: dict[str, tuple[int, LinkStats]] = {}

    def sample(self, now_ms: int) -> list[dict[str, Any]]:
        try:
            links = read_links()
        except OSError as exc:
            log.warning("interfaces: %s", exc)
            return []
        out = []
        seen = {}
        for link in sorted(links, key=lambda link: link.name):
            if not self.select(link.name, link.kind):
                continue
            fields: dict[str, Any] = {counter: getattr(link, counter) for counter in COUNTERS}
            last = self._last.get(link.name)
            # A name reused by a new interface (a torn-down tap, a new one)
            # starts its rates afresh.
            if last is not None and last[1].index == link.index and last[1].kind == link.kind:
                dt = (now_ms - last[0]) / 1000
                for bps_field, now, before in (("rx_bps", link.rx_bytes, last[1].rx_bytes),
                                               ("tx_bps", link.tx_bytes, last[1].tx_bytes)):
                    bps = _rate(now, before, dt)
                    if bps is not None:
                        fields[bps_field] = bps
            seen[link.name] = (now_ms, link)
            out.append(D.sample(D.IFACE, self.host, fields, time_ms=now_ms, iface=link.name,
                                type=link.kind))
        self._last = seen
        return out


# --- the host --------------------------------------------------------------------

def read_ksm(root: Path = Path("/sys/kernel/mm/ksm")) -> dict[str, Any] | None:
    """KSM counters and the memory saved, or None without KSM. Uses the ksm
    package's reader when present (one definition of "saved"), else sysfs."""
    if not (root / "run").is_file():
        return None
    try:
        from megafleet.ksm.sysfs import KsmSysfs

        snap = KsmSysfs(root).read()
        counters = {k: v for k, v in snap.counters.items() if isinstance(v, int)}
        counters["run"] = snap.get("run")
        return {"counters": counters, "saving_bytes": int(snap.saved_bytes)}
    except (ImportError, AttributeError, OSError):
        pass  # no ksm package (or another shape of it): read sysfs ourselves
    counters = {}
    for p in sorted(root.iterdir()):
        try:
            text = p.read_text().strip()
        except OSError:
            continue
        if text.lstrip("-").isdigit():
            counters[p.name] = int(text)
    saving = (counters.get("pages_sharing", 0) + counters.get("ksm_zero_pages", 0)) * PAGE_SIZE
    return {"counters": counters, "saving_bytes": saving}


class HostSampler(Sampler):
    """Load, memory and KSM of this host."""

    name = "host"

    def __init__(self, host: str, interval: float = 10.0, proc: Path | str = "/proc",
                 ksm_source: Callable[[], dict[str, Any] | None] | None = read_ksm):
        super().__init__(host, interval)
        self.proc = Path(proc)
        self.ksm_source = ksm_source

    def sample(self, now_ms: int) -> list[dict[str, Any]]:
        load = (self.proc / "loadavg").read_text().split()
        mem: dict[str, int] = {}
        for line in (self.proc / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                mem[key] = int(parts[0])
        fields: dict[str, Any] = {
            "load1": float(load[0]), "load5": float(load[1]), "load15": float(load[2]),
            "mem_total_kb": mem.get("MemTotal", 0), "mem_free_kb": mem.get("MemFree", 0),
            "mem_available_kb": mem.get("MemAvailable", 0),
        }
        ksm = self.ksm_source() if self.ksm_source else None
        if ksm is not None:
            fields["ksm"] = ksm["counters"]
            fields["ksm_saving_bytes"] = ksm["saving_bytes"]
        return [D.sample(D.HOST, self.host, fields, time_ms=now_ms)]


# --- guest agent lines -------------------------------------------------------------

def agent_fields(line: AgentLine) -> dict[str, Any]:
    return {
        "seq": line.seq, "up_s": line.uptime,
        "load1": line.load[0], "load5": line.load[1], "load15": line.load[2],
        "mem_total_kb": line.mem_total_kb, "mem_free_kb": line.mem_free_kb,
        "mem_available_kb": line.mem_available_kb,
        "ifaces": {name: {"rx_bytes": s.rx_bytes, "rx_packets": s.rx_packets,
                          "tx_bytes": s.tx_bytes, "tx_packets": s.tx_packets}
                   for name, s in line.interfaces.items()},
        "addresses": {name: ",".join(cidrs) for name, cidrs in line.addresses.items()},
    }


def agent_line_doc(host: str, guest: str, line: str, *, seq: int = 0,
                   time_ms: int | None = None) -> dict[str, Any] | None:
    """The document for one console or agent-port line (guest contract): an
    `agent` sample, a `ready` event, an `agent-error` warning event for a
    malformed marked line, or None for lines without a marker."""
    try:
        parsed = parse_line(line)
    except BadLine as exc:
        return D.event("agent-error", host, level="warning", guest=guest, message=str(exc),
                       seq=seq, time_ms=time_ms)
    if isinstance(parsed, AgentLine):
        return D.sample(D.AGENT, host, agent_fields(parsed), guest=guest, time_ms=time_ms,
                        extra=str(parsed.seq))
    if isinstance(parsed, ReadyLine):
        return D.event("ready", host, guest=guest, uptime_s=parsed.uptime, seq=seq,
                       time_ms=time_ms)
    return None


class AgentLogSampler(Sampler):
    """Follows the files where guests' agent lines land (the qemu driver's
    agent.log of each guest): every interval, the new complete lines of each
    become documents. `source` returns (guest, path) pairs."""

    name = "agent-logs"
    MAX_READ = 1 << 20  # per file and interval: a runaway guest cannot stall us

    def __init__(self, host: str, source: Callable[[], Iterable[tuple[str, str]]],
                 interval: float = 5.0):
        super().__init__(host, interval)
        self.source = source
        self._offsets: dict[tuple[str, str], int] = {}
        self._seq = 0

    def sample(self, now_ms: int) -> list[dict[str, Any]]:
        out = []
        offsets = {}
        for guest, path in self.source():
            key = (guest, str(path))
            offset = self._offsets.get(key, 0)
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < offset:
                        offset = 0  # the file was recreated (guest restarted)
                    f.seek(offset)
                    data = f.read(self.MAX_READ)
            except OSError:
                continue
            complete = data.rfind(b"\n") + 1  # a partial last line waits for its end
            offsets[key] = offset + complete
            for raw in data[:complete].splitlines():
                self._seq += 1
                doc = agent_line_doc(self.host, guest, raw.decode(errors="replace"),
                                     seq=self._seq, time_ms=now_ms)
                if doc is not None:
                    out.append(doc)
        self._offsets = offsets
        return out
