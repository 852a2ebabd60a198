"""The tuning policy on traces recorded on this host (tests/ksm/traces/, see its
README), plus unit tests of its arithmetic. Pure: nothing is read or written."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from megafleet.ksm import policy
from megafleet.ksm.policy import Config, Observation, State, decide, pages_to_scan

TRACES = Path(__file__).parent / "traces"


def load(name: str) -> list[Observation]:
    observations = []
    with open(TRACES / name) as f:
        for number, line in enumerate(f, 1):
            try:
                observations.append(Observation.from_json(json.loads(line)["obs"]))
            except (ValueError, KeyError) as e:
                raise AssertionError(f"{TRACES / name}:{number}: bad trace line: {e}") from e
    return observations


def replay(observations, config=Config()):
    state, out = State(), []
    for obs in observations:
        state, decision = decide(state, obs, config)
        out.append((obs, decision))
    return out


def first(pairs, predicate, after=0):
    return next(i for i, pair in enumerate(pairs) if i >= after and predicate(*pair))


def saved_mb(obs):
    return obs.saved_pages * 4096 / 2**20


def event_index(pairs, kind):
    return first(pairs, lambda o, d: any(k == kind for k, _ in o.events))


# --- the boot storm --------------------------------------------------------------

def test_boot_storm_scans_hard_at_once_and_stops_once_savings_level():
    pairs = replay(load("storm12.jsonl"))
    boot = event_index(pairs, "boot")
    obs, decision = pairs[boot]
    assert decision.mode == "storm"
    assert decision.knobs["run"] == 1 and decision.knobs["pages_to_scan"] >= 1000
    assert decision.knobs["sleep_millisecs"] <= 20
    # the fleet merged a lot during the storm (12 identical guests)
    teardown = event_index(pairs, "teardown")
    peak = max(saved_mb(o) for o, _ in pairs[boot:teardown])
    assert peak > 200
    # hard scanning ended at most 30 s after the saving reached 95 % of its peak
    reached = first(pairs, lambda o, d: saved_mb(o) >= 0.95 * peak, after=boot)
    calm = first(pairs, lambda o, d: d.mode == "steady", after=boot)
    assert pairs[calm][0].t - pairs[reached][0].t < 30
    assert pairs[calm][1].knobs == {"run": 0}
    # ... and not before the announced boot had time to happen
    assert pairs[calm][0].t - obs.t >= Config().boot_min_s


def test_steady_state_keeps_ksmd_idle_between_probes():
    pairs = replay(load("storm12.jsonl"))
    boot, teardown = event_index(pairs, "boot"), event_index(pairs, "teardown")
    calm = first(pairs, lambda o, d: d.mode == "steady", after=boot)
    steady = pairs[calm:teardown]
    assert len(steady) > 30
    idle = sum(1 for _, d in steady if d.knobs.get("run") == 0)
    assert idle / len(steady) > 0.7
    # the recorded ksmd CPU agrees: it used little while steady
    cpu = steady[-1][0].ksmd_cpu_s - steady[0][0].ksmd_cpu_s
    span = steady[-1][0].t - steady[0][0].t
    assert cpu / span < 0.1
    # the saving held while ksmd was idle
    assert saved_mb(steady[-1][0]) > 0.9 * saved_mb(steady[0][0])


def test_probes_back_off_while_they_do_not_pay():
    pairs = replay(load("storm12.jsonl"))
    boot, teardown = event_index(pairs, "boot"), event_index(pairs, "teardown")
    starts = [o.t for i, (o, d) in enumerate(pairs[boot:teardown])
              if d.mode == "probe" and pairs[boot + i - 1][1].mode != "probe"]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(later >= earlier for earlier, later in zip(gaps, gaps[1:]))


def test_teardown_cleans_up_with_one_short_scan_then_idles():
    pairs = replay(load("storm12.jsonl"))
    teardown = event_index(pairs, "teardown")
    assert pairs[teardown][1].mode == "probe" and pairs[teardown][1].knobs["run"] == 1
    # in the recorded run ksmd slept after the teardown, so nothing was scanned:
    # the probe gives up within seconds instead of scanning on
    calm = first(pairs, lambda o, d: d.mode == "steady", after=teardown)
    assert pairs[calm][0].t - pairs[teardown][0].t < 10
    assert all(d.knobs == {"run": 0} for _, d in pairs[calm:])


def test_unannounced_boot_is_noticed_from_guest_memory():
    pairs = replay(load("unannounced4.jsonl"))
    assert not any(o.events for o, _ in pairs)
    grew = first(pairs, lambda o, d: o.guest_kb - pairs[0][0].guest_kb > 64 * 1024)
    storm = first(pairs, lambda o, d: d.mode == "storm")
    # it waits until the growth has lasted new_memory_hold_s, not much longer
    delay = pairs[storm][0].t - pairs[grew][0].t
    assert Config().new_memory_hold_s <= delay <= Config().new_memory_hold_s + 3
    assert max(saved_mb(o) for o, _ in pairs) > 50


def test_short_lived_guests_do_not_start_a_storm():
    """Others' test guests that live a few seconds are not worth merging."""
    observations = load("storm12.jsonl")
    pairs = replay(observations)
    boot = event_index(pairs, "boot")
    calm = first(pairs, lambda o, d: d.mode == "steady", after=boot)
    bump = range(calm + 5, calm + 5 + int(Config().new_memory_hold_s) - 3)
    bumped = [dataclasses.replace(o, guest_kb=o.guest_kb + 300 * 1024) if i in bump else o
              for i, o in enumerate(observations)]
    assert all(d.mode != "storm" for _, d in replay(bumped)[calm:calm + 20])
    # the same growth, lasting, does
    lasting = [dataclasses.replace(o, guest_kb=o.guest_kb + 300 * 1024) if i >= bump.start else o
               for i, o in enumerate(observations)]
    assert any(d.mode == "storm" for _, d in replay(lasting)[calm:calm + 20])


# --- memory pressure (derived from the storm trace, see traces/README) ------------

def with_pressure(observations, start, end, share=0.05):
    out = []
    for i, obs in enumerate(observations):
        if start <= i < end:
            obs = dataclasses.replace(obs, mem_available_kb=int(obs.mem_total_kb * share))
        out.append(obs)
    return out


def test_memory_pressure_keeps_scanning_via_the_advisor_then_recovers():
    observations = load("storm12.jsonl")
    pairs = replay(observations)
    boot = event_index(pairs, "boot")
    calm = first(pairs, lambda o, d: d.mode == "steady", after=boot)
    start, end = calm + 5, calm + 25
    pressured = replay(with_pressure(observations, start, end))
    assert pressured[start - 1][1].mode == "steady"
    for obs, decision in pressured[start:end]:
        assert decision.mode == "pressure"
        assert decision.knobs["run"] == 1
        assert decision.knobs["advisor_mode"] == "scan-time"
        assert decision.knobs["advisor_target_scan_time"] == Config().pressure_scan_time_s
    # once memory is back, it probes whether scanning still pays
    assert pressured[end][1].mode == "probe"


def test_memory_pressure_without_advisor_scans_at_storm_rate():
    observations = [dataclasses.replace(o, advisor=False) for o in load("storm12.jsonl")]
    pairs = replay(with_pressure(observations, 40, 50))
    decision = pairs[45][1]
    assert decision.mode == "pressure"
    assert "advisor_mode" not in decision.knobs
    assert decision.knobs["run"] == 1 and decision.knobs["pages_to_scan"] >= 1000


# --- arithmetic ----------------------------------------------------------------------

def test_pages_to_scan_targets_the_cpu_share():
    cfg = Config(storm_cpu=0.5, storm_sleep_ms=10)
    # P*c / (P*c + S) = 0.5  =>  P = S / c = 0.01 / 2e-6
    assert pages_to_scan(cfg, 2e-6) == 5000
    assert pages_to_scan(cfg, None) == pages_to_scan(cfg, cfg.initial_cost_s_per_page)
    assert pages_to_scan(cfg, 1e-12) == cfg.max_pages_to_scan
    assert pages_to_scan(cfg, 1.0) == cfg.min_pages_to_scan


def test_pay_is_mb_per_cpu_second():
    a = policy.Point(t=0, full_scans=0, scanned=0, saved=0, cpu=10.0, guest_kb=0)
    b = policy.Point(t=5, full_scans=2, scanned=1, saved=25600, cpu=10.5, guest_kb=0)
    assert policy.pay(a, b) == pytest.approx(100 / 0.5)
    # no measurable CPU: None when nothing was gained, infinite when something was
    assert policy.pay(a, dataclasses.replace(a, t=1)) is None
    assert policy.pay(a, dataclasses.replace(a, t=1, saved=10)) == math.inf


@pytest.mark.parametrize("kwargs, message", [
    ({"storm_cpu": 1.5}, "storm_cpu"),
    ({"steady": "sleep"}, "steady"),
    ({"pressure_low": 0.5, "pressure_high": 0.2}, "pressure_low"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_steady_can_hand_over_to_the_kernel_advisor():
    pairs = replay(load("storm12.jsonl"), Config(steady="advisor"))
    calm = next(d for _, d in pairs if d.mode == "steady")
    assert calm.knobs["advisor_mode"] == "scan-time"
    assert calm.knobs["advisor_target_scan_time"] == Config().steady_scan_time_s
    assert calm.knobs["run"] == 1


def test_a_boot_holds_the_storm_at_full_rate_paying_or_not():
    """While an announced boot lasts, ksmd scans at the storm rate even when a
    full scan of the still-volatile guests did not pay: pages merged while the
    guests boot stay merged, and slowing down lost 10 % of the saving."""
    cfg = Config()
    state, held = State(), []
    for obs in load("storm12.jsonl"):
        state, decision = decide(state, obs, cfg)
        if decision.mode == "storm" and decision.reason.startswith("bulk boot in progress"):
            held.append((state, decision))
    unpaid = [(st, d) for st, d in held
              if d.pay_mb_per_cpu_s is not None and d.pay_mb_per_cpu_s < cfg.pay_mb_per_cpu_s]
    assert unpaid, "the recorded storm has full scans that did not pay"
    for st, decision in held:
        assert decision.knobs["pages_to_scan"] == pages_to_scan(cfg, st.cost_s_per_page)
        assert decision.knobs["run"] == 1
