"""Checking a testbed's `reachable` assertions live.

Each assertion `reachable A B` becomes one ping per source node of A, per
destination node of B and per address family the destination has (its first
address of that family), sent from inside the source node: `ip netns exec` for
namespace nodes, nsenter for containers, the exec channel for QEMU and libvirt
guests (on whichever host the node runs). `converge` repeats the checks that
fail until all pass or the time is up: right after `up`, routing (OSPF, BGP)
may not have converged yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import trio

from megafleet.experiment import control
from megafleet.experiment import refs as R


@dataclass(frozen=True)
class Check:
    """One ping: from node `src` to `addr` (node `dst`), for the assertion at `loc`."""

    assertion: str               # "reachable A B"
    loc: str                     # file:line
    src: str
    dst: str
    addr: str
    family: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyResult:
    checks: int
    passed: int
    converge_s: float | None          # when every check passed (None: never, within the time)
    seconds: float
    failed: list[dict[str, Any]] = field(default_factory=list)   # check + error, one per failed ping

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": self.checks, "passed": self.passed, "converge_s": self.converge_s,
                "seconds": self.seconds, "failed": self.failed}


def first_addresses(net, node: str) -> dict[int, str]:
    """The node's first address of each family (without prefix length)."""
    out: dict[int, str] = {}
    for _, _, addrs in net.node(node).ifaces:
        for fam in sorted(addrs):
            out.setdefault(fam, addrs[fam].split("/")[0])
    return out


def checks(net) -> list[Check]:
    """Every ping the description's assertions ask for."""
    out: list[Check] = []
    for a_text, b_text, loc in net.reachable:
        srcs, dsts = R.nodes(net, a_text), R.nodes(net, b_text)
        where = f"{loc.file}:{loc.line}"
        for dst in dsts:
            for fam, addr in sorted(first_addresses(net, dst).items()):
                for src in srcs:
                    if src != dst:
                        out.append(Check(f"reachable {a_text} {b_text}", where, src, dst, addr, fam))
    return out


async def run_checks(tb: control.Testbed, todo: list[Check], timeout: float = 2.0) -> dict[Check, dict]:
    """One round: each check's result {ok, rtt_ms, error}."""
    if not todo:
        return {}
    payload = {"checks": [c.to_json() for c in todo], "timeout": timeout}
    res = await control.on_hosts(tb, "experiment.ping", payload, timeout=60 + len(todo))
    by_key = {(c.src, c.addr): c for c in todo}
    out: dict[Check, dict] = {}
    for rows in res.values():
        for r in rows:
            c = by_key.get((r["src"], r["addr"]))
            if c is not None:
                out[c] = {"ok": r["ok"], "rtt_ms": r.get("rtt_ms"), "error": r.get("error")}
    for c in todo:
        out.setdefault(c, {"ok": False, "rtt_ms": None, "error": f"node {c.src} runs on no host of the testbed"})
    return out


async def converge(tb: control.Testbed, *, within: float = 60.0, interval: float = 1.0,
                   progress: Callable[[str], None] = lambda s: None) -> VerifyResult:
    """Check every assertion; repeat the failing checks until all pass or
    `within` seconds passed. Returns when it is decided."""
    t0 = time.monotonic()
    todo = checks(tb.compiled())
    total = len(todo)
    last: dict[Check, dict] = {}
    converge_s = None
    rounds = 0
    while True:
        rounds += 1
        results = await run_checks(tb, todo)
        last.update(results)
        todo = [c for c in todo if not results[c]["ok"]]
        if not todo:
            converge_s = round(time.monotonic() - t0, 3)
            break
        if time.monotonic() - t0 >= within:
            break
        if rounds == 1 or rounds % 5 == 0:
            progress(f"{total - len(todo)}/{total} reachability checks pass; waiting for routing")
        await trio.sleep(interval)
    failed = [{**c.to_json(), "error": last[c]["error"]} for c in todo]
    return VerifyResult(total, total - len(todo), converge_s, round(time.monotonic() - t0, 3), failed)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Lines for a human about `up`'s "verify" and "schedule" parts (or a
    `megafleet verify` result given as {"verify": ...}): convergence, then
    every failed check with its assertion's file:line."""
    lines = []
    v = summary.get("verify")
    if v is not None and v.get("skipped"):
        lines.append(f"verify: skipped ({v['skipped']})")
    elif v is not None and v.get("error"):
        lines.append(f"verify: could not check the assertions: {v['error']}")
    elif v is not None and v["ok"]:
        lines.append(f"verify: {v['checks']} reachability checks pass (all true after {v['converge_s']:.1f} s"
                     + (" of waiting for routing)" if v.get("after_up") else ")"))
    elif v is not None:
        lines.append(f"verify: {len(v['failed'])} of {v['checks']} reachability checks FAILED "
                     f"(checked for {v['seconds']:.1f} s)")
        for f in v["failed"][:20]:
            lines.append(f"  {f['loc']}: {f['assertion']}: {f['src']} -> {f['dst']} ({f['addr']}): {f['error']}")
        if len(v["failed"]) > 20:
            lines.append(f"  ... and {len(v['failed']) - 20} more (--json lists all)")
    sch = summary.get("schedule")
    if sch:
        lines.append(f"schedule: {sch['steps']} fault actions over {sch['span_s']:g} s, running in the "
                     f"background (pid {sch['pid']}, log {sch['log']}); "
                     f"'megafleet telemetry events --kind fault' shows them")
    return lines


async def after_up(testbed: str, out_line: Callable[[str], None], *, verify: bool = True,
                   within: float = 60.0, net: Any = None) -> dict[str, Any]:
    """What `up` runs once the guests are ready: put back the links' recorded
    runtime settings (a rebuilt network lost them), verify the assertions
    (unless verify is False), then start the fault schedule in the background.
    `net`: the description as `up` compiled it (else it is compiled again).
    Returns the summary's {"verify": ..., "schedule": ...} parts."""
    from megafleet.experiment import schedule

    out: dict[str, Any] = {}
    tb = control.testbed(testbed)
    if net is not None:
        tb.net = net
    try:
        restored = await control.on_hosts(tb, "experiment.reapply", {})
        n = sum(len(v) for v in restored.values())
        if n:
            out_line(f"links    restored {n} runtime link settings")
    except control.ControlError as exc:
        out_line(f"links    could not restore runtime link settings: {exc}")
    net = tb.compiled()
    if not verify:
        out["verify"] = {"skipped": "--no-verify"}
    elif not net.reachable:
        out["verify"] = {"skipped": "no reachable assertions"}
    else:
        out_line(f"verify   {len(checks(net))} pings for {len(net.reachable)} reachable assertions")
        try:
            result = await converge(tb, within=within, progress=lambda s: out_line(f"verify   {s}"))
        except control.ControlError as exc:
            # A host's agent died after its apply (killed, host gone): the
            # assertions cannot be checked, which is a failed up, not a crash.
            out["verify"] = {"ok": False, "error": str(exc), "after_up": True}
            out_line(f"verify   could not check the assertions: {exc}")
        else:
            out["verify"] = {**result.to_json(), "after_up": True}
            out_line(f"verify   {result.passed}/{result.checks} pass" +
                     (f", converged in {result.converge_s:.1f} s" if result.ok else ""))
    plan = schedule.steps(net.faults)
    if plan:
        start = time.time()
        pid = await trio.to_thread.run_sync(schedule.spawn, testbed, start)
        out["schedule"] = {"steps": len(plan), "span_s": plan[-1].at_s, "pid": pid, "start": start,
                           "log": str(schedule.log_path(testbed))}
    return out
