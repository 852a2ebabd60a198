"""Running a description's fault schedule (`at` / `every` statements, see
`netlang.faults`) against a running testbed.

Each action runs at its time, in its own task (a slow node restart does not
delay the next link event), through the same functions as `megafleet link` and
`megafleet node`; the host that acts records a `fault` event in its telemetry
store with the time the action started (`megafleet telemetry events --kind
fault`). The runner stops when the schedule is done, or as soon as the testbed
is no longer up (`down` while it runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import trio

from megafleet import paths
from megafleet.experiment import control
from megafleet.experiment import refs as R


@dataclass(frozen=True)
class Step:
    """One action at `at_s` seconds from the start of the schedule."""

    at_s: float
    fault: Any            # netlang.faults.Fault

    @property
    def text(self) -> str:
        return self.fault.text()


def steps(faults: list) -> list[Step]:
    """Every action of the schedule, in time order (stable for equal times)."""
    out = [Step(t, f) for f in faults for t in f.times()]
    return sorted(out, key=lambda s: s.at_s)


async def perform(tb: control.Testbed, f, time_ms: int) -> list[dict]:
    if f.kind == "node":
        return await control.node(tb, f.action, f.a, source="schedule", time_ms=time_ms)
    settings = R.parse_settings(f.settings) if f.action == "set" else None
    return await control.link(tb, f.action, f.a, f.b, settings, source="schedule", time_ms=time_ms)


async def run(tb: control.Testbed, start: float | None = None,
              say: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Run the schedule; `start` is the epoch time the offsets count from
    (default: now). Returns what happened, one entry per action."""
    net = tb.compiled()
    plan = steps(net.faults)
    start = time.time() if start is None else start
    log: list[dict[str, Any]] = []
    if not plan:
        return log

    async def still_up() -> None:
        from megafleet.up import deployments
        while True:
            await trio.sleep(1)
            if tb.name not in await trio.to_thread.run_sync(deployments):
                say(f"testbed {tb.name} is down; schedule stopped")
                nursery.cancel_scope.cancel()

    async def one(step: Step) -> None:
        await trio.sleep(max(0.0, start + step.at_s - time.time()))
        t_ms = int(time.time() * 1000)
        entry = {"at_s": step.at_s, "action": step.text, "loc": f"{step.fault.loc.file}:{step.fault.loc.line}",
                 "time_ms": t_ms}
        try:
            entry["done"] = await perform(tb, step.fault, t_ms)
            say(f"+{step.at_s:g}s {step.text}: done")
        except (control.ControlError, R.RefError) as exc:
            entry["error"] = str(exc)
            say(f"+{step.at_s:g}s {step.text}: FAILED: {exc}")
        log.append(entry)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(still_up)
        async with trio.open_nursery() as steps_nursery:
            for step in plan:
                steps_nursery.start_soon(one, step)
        nursery.cancel_scope.cancel()
    return sorted(log, key=lambda e: e["at_s"])


def log_path(testbed: str):
    return paths.state_dir() / "up" / f"{testbed}.schedule.log"


def spawn(testbed: str, start: float) -> int:
    """Run the schedule in the background (`megafleet run-schedule` in its own
    session, its output in the state directory); it ends by itself when the
    schedule is done or the testbed goes down. Returns its pid."""
    log = log_path(testbed)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "megafleet", "run-schedule", testbed,
                                  "--start", f"{start:.3f}"], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    child.returncode = 0          # not reaped here: it outlives `up`
    return child.pid
