"""The tuning policy: a pure function from observations to KSM knob settings.

`decide(state, observation, config) -> (state, Decision)` reads nothing and
writes nothing; the daemon feeds it what it measured and applies what it says.
That is what lets the tests replay traces recorded on a real host.

The idea, for fleets of near-identical guests:

* **storm** — a bulk boot was announced, or guest (QEMU) memory grew a lot: scan
  hard (a fixed share of one CPU, sized from the measured cost of a page), so
  that identical pages of freshly booted guests merge within seconds.
* It stays hard while it pays: while the announced boot is still in progress,
  while memory keeps growing, and while each full scan still buys at least
  `pay_mb_per_cpu_s` of saving per ksmd CPU-second.
* **steady** — once savings level off, ksmd stops (run=0: merged pages stay
  merged, only scanning stops), or, if configured, is handed to the kernel's
  scan-time advisor with a long target. Every `probe` interval (doubling while
  probes do not pay) one short hard scan checks whether merging pays again.
* **pressure** — little memory left: keep scanning regardless of the marginal
  return (handing over to the kernel advisor where present), because every page
  freed now avoids reclaim or OOM.
* **teardown** — guests were torn down: merged memory went with them. ksmd's
  counters (and its metadata for the dead guests) are only updated when it
  scans, so one short probe cleans up and re-evaluates what remains; scanning
  stops as soon as nothing pays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

MB = 2**20
PAGE = 4096


@dataclass(frozen=True)
class Config:
    sample_interval_s: float = 1.0
    # Share of one CPU ksmd may use while storming. Measured (bench/ksm.py, 12
    # guests): scanning at full rate through the whole boot merges 10 % more than
    # slowing down whenever a full scan of the still-volatile guests did not pay
    # (829 against 749 MB), for 4 s more of ksmd CPU: pages merged while a guest
    # boots stay merged, those missed then are not found identical later.
    storm_cpu: float = 0.9
    storm_sleep_ms: int = 10
    min_pages_to_scan: int = 100
    max_pages_to_scan: int = 100_000
    initial_cost_s_per_page: float = 2e-6   # until measured on this host
    pay_mb_per_cpu_s: float = 20.0    # below this a full scan no longer pays
    min_full_scans: int = 2           # a page needs two scans to merge (checksum)
    boot_s_per_guest: float = 2.0     # how long an announced bulk boot keeps storming
    boot_min_s: float = 10.0
    boot_max_s: float = 180.0
    growth_kb_per_s: float = 4096.0   # guest memory growing faster: guests still booting
    new_memory_mb: float = 64.0       # guest growth while steady that triggers a storm...
    new_memory_hold_s: float = 10.0   # ...once it has lasted this long (short-lived
                                      # test guests come and go; fresh pages are volatile)
    probe_min_s: float = 45.0
    probe_max_s: float = 480.0
    probe_timeout_s: float = 30.0
    pressure_low: float = 0.10        # MemAvailable/MemTotal below: pressure
    pressure_high: float = 0.15       # above again: pressure over
    steady: str = "pause"             # "pause" (run=0) or "advisor"
    steady_scan_time_s: int = 600     # advisor target while steady
    steady_advisor_cpu: int = 5
    pressure_scan_time_s: int = 20    # advisor target under memory pressure
    history_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.storm_cpu < 1:
            raise ValueError(f"storm_cpu={self.storm_cpu}: must be between 0 and 1 (share of one CPU)")
        if self.steady not in ("pause", "advisor"):
            raise ValueError(f"steady={self.steady!r}: must be 'pause' or 'advisor'")
        if not 0 <= self.pressure_low < self.pressure_high < 1:
            raise ValueError("pressure_low < pressure_high, both between 0 and 1")


@dataclass(frozen=True)
class Observation:
    """What the daemon measured at one instant. Counters are KSM's sysfs values;
    missing ones (older kernels) are simply absent."""

    t: float                                  # monotonic seconds
    counters: dict[str, int]
    ksmd_cpu_s: float | None
    mem_total_kb: int
    mem_available_kb: int
    anon_kb: int
    guest_kb: int = 0                         # resident memory of QEMU guests
    advisor: bool = False                     # kernel has advisor_mode
    events: tuple[tuple[str, int], ...] = ()  # ("boot", n) / ("teardown", n)

    @property
    def saved_pages(self) -> int:
        return self.counters.get("pages_sharing", 0) + self.counters.get("ksm_zero_pages", 0)

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "counters": self.counters, "ksmd_cpu_s": self.ksmd_cpu_s,
                "mem_total_kb": self.mem_total_kb, "mem_available_kb": self.mem_available_kb,
                "anon_kb": self.anon_kb, "guest_kb": self.guest_kb, "advisor": self.advisor,
                "events": [list(e) for e in self.events]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Observation":
        return cls(t=float(data["t"]), counters={k: int(v) for k, v in data["counters"].items()
                                                  if isinstance(v, int)},
                   ksmd_cpu_s=data.get("ksmd_cpu_s"), mem_total_kb=int(data["mem_total_kb"]),
                   mem_available_kb=int(data["mem_available_kb"]), anon_kb=int(data["anon_kb"]),
                   guest_kb=int(data.get("guest_kb", 0)),
                   advisor=bool(data.get("advisor", False)),
                   events=tuple((str(k), int(n)) for k, n in data.get("events", ())))


@dataclass(frozen=True)
class Point:
    """The few numbers of an observation the policy keeps in its history."""

    t: float
    full_scans: int
    scanned: int
    saved: int
    cpu: float
    guest_kb: int


@dataclass(frozen=True)
class State:
    mode: str = "start"
    since: float = 0.0
    entry: Point | None = None
    history: tuple[Point, ...] = ()
    cost_s_per_page: float | None = None
    probe_interval_s: float = 0.0
    boot_until: float = -math.inf
    pressure: bool = False
    guest_floor_kb: int = 0       # lowest guest memory seen while steady
    growth_since: float | None = None  # when guest memory rose above the floor


@dataclass(frozen=True)
class Decision:
    mode: str
    knobs: dict[str, int | str]
    reason: str
    pay_mb_per_cpu_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "knobs": self.knobs, "reason": self.reason,
                "pay_mb_per_cpu_s": self.pay_mb_per_cpu_s}


def _point(obs: Observation) -> Point:
    return Point(obs.t, obs.counters.get("full_scans", 0), obs.counters.get("pages_scanned", 0),
                 obs.saved_pages, obs.ksmd_cpu_s or 0.0, obs.guest_kb)


def pay(start: Point, end: Point) -> float | None:
    """Saving gained per ksmd CPU-second between two points, MB/s; None when
    ksmd used no measurable CPU (its clock ticks are 10 ms)."""
    cpu = end.cpu - start.cpu
    gained_mb = (end.saved - start.saved) * PAGE / MB
    if cpu < 0.02:
        return None if gained_mb <= 0 else math.inf
    return gained_mb / cpu


def pages_to_scan(cfg: Config, cost: float | None) -> int:
    """pages per wake-up so that ksmd uses `storm_cpu` of one CPU: it scans P
    pages (P*cost seconds) then sleeps S, so its share is P*c / (P*c + S)."""
    c = cost or cfg.initial_cost_s_per_page
    s = cfg.storm_cpu
    pages = s * (cfg.storm_sleep_ms / 1000) / (c * (1 - s))
    return int(min(cfg.max_pages_to_scan, max(cfg.min_pages_to_scan, pages)))


def _knobs(mode: str, cfg: Config, state: State, obs: Observation) -> dict[str, int | str]:
    hard: dict[str, int | str] = {"pages_to_scan": pages_to_scan(cfg, state.cost_s_per_page),
                                  "sleep_millisecs": cfg.storm_sleep_ms, "run": 1}
    if obs.advisor:
        hard = {"advisor_mode": "none", **hard}
    if mode in ("storm", "probe"):
        return hard
    if mode == "pressure":
        if not obs.advisor:
            return hard
        return {"advisor_mode": "scan-time", "advisor_target_scan_time": cfg.pressure_scan_time_s,
                "advisor_max_cpu": max(1, round(cfg.storm_cpu * 100)),
                "sleep_millisecs": cfg.storm_sleep_ms, "run": 1}
    # steady (and teardown, which is steady with a short probe)
    if cfg.steady == "advisor" and obs.advisor:
        return {"advisor_mode": "scan-time", "advisor_target_scan_time": cfg.steady_scan_time_s,
                "advisor_max_cpu": cfg.steady_advisor_cpu, "run": 1}
    return {"run": 0}


def _update_cost(state: State, point: Point, cfg: Config) -> float | None:
    """Seconds of ksmd CPU per page scanned, smoothed over the recent history.
    Only windows with enough work are trusted (CPU time comes in 10 ms ticks)."""
    for old in state.history:
        scanned = point.scanned - old.scanned
        cpu = point.cpu - old.cpu
        if scanned >= 50_000 and cpu >= 0.2:
            measured = cpu / scanned
            if state.cost_s_per_page is None:
                return measured
            return 0.7 * state.cost_s_per_page + 0.3 * measured
    return state.cost_s_per_page


def _last_full_scan_start(history: tuple[Point, ...], now: Point) -> Point | None:
    """The newest point from before the last complete full scan began, so that
    the window from it to now covers at least one whole scan."""
    for old in reversed(history):
        if old.full_scans <= now.full_scans - 1:
            return old
    return None


def _growth_kb_per_s(history: tuple[Point, ...], now: Point, window_s: float = 5.0) -> float:
    old = next((p for p in history if now.t - p.t <= window_s), None)
    if old is None or now.t <= old.t:
        return 0.0
    return (now.guest_kb - old.guest_kb) / (now.t - old.t)


def _nothing_to_scan(state: State, now: Point, settle_s: float = 3.0) -> bool:
    """ksmd has been running for a while without scanning a page: no process
    has mergeable memory (ksmd does not even count full scans then)."""
    entry = state.entry
    return (entry is not None and now.t - entry.t >= settle_s
            and now.scanned == entry.scanned and now.full_scans == entry.full_scans)


def decide(state: State, obs: Observation, cfg: Config = Config()) -> tuple[State, Decision]:
    now = _point(obs)
    history = tuple(p for p in state.history if obs.t - p.t <= cfg.history_s)
    state = replace(state, cost_s_per_page=_update_cost(state, now, cfg))

    def go(mode: str, reason: str, **changes: Any) -> tuple[State, Decision]:
        changes.setdefault("growth_since", None)
        new = replace(state, mode=mode, since=obs.t, entry=now, history=history + (now,),
                      guest_floor_kb=now.guest_kb, **changes)
        return new, Decision(mode, _knobs(mode, cfg, new, obs), reason)

    def stay(reason: str, pay_rate: float | None = None) -> tuple[State, Decision]:
        new = replace(state, history=history + (now,),
                      guest_floor_kb=min(state.guest_floor_kb, now.guest_kb))
        return new, Decision(state.mode, _knobs(state.mode, cfg, new, obs), reason, pay_rate)

    # 1. Events come first: they are what the vm engine knows before any counter moves.
    for kind, count in obs.events:
        if kind == "boot":
            grace = min(cfg.boot_max_s, max(cfg.boot_min_s, count * cfg.boot_s_per_guest))
            until = max(state.boot_until, obs.t + grace)
            if state.mode == "storm":
                state = replace(state, boot_until=until)
            else:
                state, _ = go("storm", "", boot_until=until)
        elif kind == "teardown":
            # ksmd itself reaps the exited guests' rmap items and corrects its
            # counters (they are stale while it sleeps): one short scan, which
            # also tells whether what remains still pays.
            state, _ = go("probe", "", probe_interval_s=cfg.probe_min_s,
                          boot_until=-math.inf)
    if obs.events:
        kinds = ", ".join(f"{k} of {n}" for k, n in obs.events)
        return state, Decision(state.mode, _knobs(state.mode, cfg, state, obs),
                               f"event: {kinds}")

    # 2. Memory pressure overrides the economics.
    available = obs.mem_available_kb / max(1, obs.mem_total_kb)
    if not state.pressure and available < cfg.pressure_low:
        return go("pressure", f"memory pressure: {available:.0%} available", pressure=True)
    if state.pressure:
        if available > cfg.pressure_high:
            state = replace(state, pressure=False)
            return go("probe", f"pressure over: {available:.0%} available")
        return stay(f"memory pressure: {available:.0%} available")

    if state.mode == "start":
        return go("probe", "daemon started: probe what is mergeable",
                  probe_interval_s=cfg.probe_min_s)

    entry = state.entry or now
    scans_done = now.full_scans - entry.full_scans

    if state.mode == "storm":
        # A boot in progress or growing guest memory holds the storm at full
        # rate, paying or not: what merges while guests boot stays merged.
        start = _last_full_scan_start(history, now)
        rate = pay(start, now) if start else None
        paying = rate is None or rate >= cfg.pay_mb_per_cpu_s
        if obs.t < state.boot_until:
            return stay(f"bulk boot in progress ({state.boot_until - obs.t:.0f} s left)", rate)
        growth = _growth_kb_per_s(history, now)
        # Other guests may keep booting on a busy host: growth holds the storm
        # only for as long as a bulk boot may last.
        if growth > cfg.growth_kb_per_s and obs.t - state.since < cfg.boot_max_s:
            return stay(f"memory still growing ({growth / 1024:.0f} MB/s)", rate)
        if _nothing_to_scan(state, now):
            return go("steady", "nothing mergeable to scan", probe_interval_s=cfg.probe_min_s)
        if scans_done < cfg.min_full_scans:
            return stay(f"{scans_done} of {cfg.min_full_scans} full scans done")
        if paying:
            return stay("merging pays" if rate else "waiting for a full scan", rate)
        return go("steady", f"savings levelled off ({rate:.1f} MB per ksmd CPU-s)",
                  probe_interval_s=cfg.probe_min_s)

    if state.mode == "probe":
        timed_out = obs.t - state.since >= cfg.probe_timeout_s or _nothing_to_scan(state, now)
        if scans_done < cfg.min_full_scans and not timed_out:
            return stay(f"probing: {scans_done} of {cfg.min_full_scans} full scans")
        rate = pay(entry, now)
        if rate is not None and rate >= cfg.pay_mb_per_cpu_s:
            return go("storm", f"probe pays ({rate:.1f} MB per ksmd CPU-s)",
                      probe_interval_s=cfg.probe_min_s)
        interval = min(cfg.probe_max_s, max(cfg.probe_min_s, state.probe_interval_s * 2))
        shown = "nothing" if rate is None else f"{rate:.1f} MB per ksmd CPU-s"
        return go("steady", f"probe does not pay ({shown}); next in {interval:.0f} s",
                  probe_interval_s=interval)

    # steady
    # Growth above the lowest point since steady began, so that guests booted
    # after others were torn down are noticed too.
    grown_mb = (now.guest_kb - min(state.guest_floor_kb, entry.guest_kb)) / 1024
    if grown_mb > cfg.new_memory_mb:
        since = obs.t if state.growth_since is None else state.growth_since
        if obs.t - since >= cfg.new_memory_hold_s:
            return go("storm", f"{grown_mb:.0f} MB of new guest memory for "
                      f"{obs.t - since:.0f} s", boot_until=-math.inf)
        state = replace(state, growth_since=since)
    else:
        state = replace(state, growth_since=None)
    if obs.t - state.since >= state.probe_interval_s:
        return go("probe", f"periodic probe after {state.probe_interval_s:.0f} s")
    return stay("savings level; ksmd idle until the next probe")
