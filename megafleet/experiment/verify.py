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
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class PingResult:
    """One check's ping: `ok` when a reply came, its round trip in ms, or why not."""

    ok: bool
    rtt_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class FailedCheck:
    """A check that still failed when `converge` decided, and its last error."""

    check: Check
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {**self.check.to_json(), "error": self.error}


@dataclass
class VerifyResult:
    """Every check of a testbed's assertions: how many, how many `passed`,
    when all did (`converge_s`, seconds from the start; None: never, within
    the time), the `seconds` it took, and the checks that failed."""

    checks: int
    passed: int
    converge_s: float | None
    seconds: float
    failed: list[FailedCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": self.checks, "passed": self.passed, "converge_s": self.converge_s,
                "seconds": self.seconds, "failed": [f.to_json() for f in self.failed]}


@dataclass
class UpVerify:
    """The verify part of `up`'s summary: the checks' `result`; or why they
    were `skipped` (--no-verify, no assertions); or the `error` that kept
    them from running (a host's agent gone after its apply)."""

    result: VerifyResult | None = None
    skipped: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """False when the assertions failed or could not be checked."""
        return self.error is None and (self.result is None or self.result.ok)

    def to_json(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        if self.result is None:
            return {"ok": False, "error": self.error, "after_up": True}
        return {**self.result.to_json(), "after_up": True}


@dataclass
class ScheduleRun:
    """The fault schedule `up` started in the background: `steps` actions
    over `span_s` seconds from `start` (epoch seconds), by process `pid`,
    logging to `log`."""

    steps: int
    span_s: float
    pid: int
    start: float
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AfterUp:
    """What `up` did once the guests were ready (`after_up`)."""

    verify: UpVerify
    schedule: ScheduleRun | None = None


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


async def run_checks(tb: control.Testbed, todo: list[Check], timeout: float = 2.0) -> dict[Check, PingResult]:
    """One round: each check's ping, on whichever host its source node runs."""
    if not todo:
        return {}
    payload = {"checks": [c.to_json() for c in todo], "timeout": timeout}
    res = await control.on_hosts(tb, "experiment.ping", payload, timeout=60 + len(todo))
    by_key = {(c.src, c.addr): c for c in todo}
    out: dict[Check, PingResult] = {}
    for rows in res.values():
        for r in rows:          # the hosts' JSON (hostside.ping)
            c = by_key.get((r["src"], r["addr"]))
            if c is not None:
                out[c] = PingResult(r["ok"], r.get("rtt_ms"), r.get("error"))
    for c in todo:
        out.setdefault(c, PingResult(False, error=f"node {c.src} runs on no host of the testbed"))
    return out


async def converge(tb: control.Testbed, *, within: float = 60.0, interval: float = 1.0,
                   progress: Callable[[str], None] = lambda s: None) -> VerifyResult:
    """Check every assertion; repeat the failing checks until all pass or
    `within` seconds passed. Returns when it is decided."""
    t0 = time.monotonic()
    todo = checks(tb.compiled())
    total = len(todo)
    last: dict[Check, PingResult] = {}
    converge_s = None
    rounds = 0
    while True:
        rounds += 1
        results = await run_checks(tb, todo)
        last.update(results)
        todo = [c for c in todo if not results[c].ok]
        if not todo:
            converge_s = round(time.monotonic() - t0, 3)
            break
        if time.monotonic() - t0 >= within:
            break
        if rounds == 1 or rounds % 5 == 0:
            progress(f"{total - len(todo)}/{total} reachability checks pass; waiting for routing")
        await trio.sleep(interval)
    failed = [FailedCheck(c, last[c].error) for c in todo]
    return VerifyResult(total, total - len(todo), converge_s, round(time.monotonic() - t0, 3), failed)


def summary_lines(verify: VerifyResult | UpVerify | None, schedule: ScheduleRun | None = None) -> list[str]:
    """Lines for a human about a `megafleet verify` result, or `up`'s verify
    and schedule parts: convergence, then every failed check with its
    assertion's file:line."""
    lines = []
    result = verify.result if isinstance(verify, UpVerify) else verify
    after_up = isinstance(verify, UpVerify)
    if isinstance(verify, UpVerify) and verify.skipped is not None:
        lines.append(f"verify: skipped ({verify.skipped})")
    elif isinstance(verify, UpVerify) and verify.error is not None:
        lines.append(f"verify: could not check the assertions: {verify.error}")
    elif result is not None and result.ok:
        lines.append(f"verify: {result.checks} reachability checks pass (all true after {result.converge_s:.1f} s"
                     + (" of waiting for routing)" if after_up else ")"))
    elif result is not None:
        lines.append(f"verify: {len(result.failed)} of {result.checks} reachability checks FAILED "
                     f"(checked for {result.seconds:.1f} s)")
        for f in result.failed[:20]:
            c = f.check
            lines.append(f"  {c.loc}: {c.assertion}: {c.src} -> {c.dst} ({c.addr}): {f.error}")
        if len(result.failed) > 20:
            lines.append(f"  ... and {len(result.failed) - 20} more (--json lists all)")
    if schedule is not None:
        lines.append(f"schedule: {schedule.steps} fault actions over {schedule.span_s:g} s, running in the "
                     f"background (pid {schedule.pid}, log {schedule.log}); "
                     f"'megafleet telemetry events --kind fault' shows them")
    return lines


async def after_up(testbed: str, out_line: Callable[[str], None], *, verify: bool = True,
                   within: float = 60.0, net: Any = None) -> AfterUp:
    """What `up` runs once the guests are ready: put back the links' recorded
    runtime settings (a rebuilt network lost them), verify the assertions
    (unless verify is False), then start the fault schedule in the background.
    `net`: the description as `up` compiled it (else it is compiled again)."""
    from megafleet.experiment import schedule

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
        checked = UpVerify(skipped="--no-verify")
    elif not net.reachable:
        checked = UpVerify(skipped="no reachable assertions")
    else:
        out_line(f"verify   {len(checks(net))} pings for {len(net.reachable)} reachable assertions")
        try:
            result = await converge(tb, within=within, progress=lambda s: out_line(f"verify   {s}"))
        except control.ControlError as exc:
            # A host's agent died after its apply (killed, host gone): the
            # assertions cannot be checked, which is a failed up, not a crash.
            checked = UpVerify(error=str(exc))
            out_line(f"verify   could not check the assertions: {exc}")
        else:
            checked = UpVerify(result=result)
            out_line(f"verify   {result.passed}/{result.checks} pass" +
                     (f", converged in {result.converge_s:.1f} s" if result.ok else ""))
    plan = schedule.steps(net.faults)
    started = None
    if plan:
        start = time.time()
        pid = await trio.to_thread.run_sync(schedule.spawn, testbed, start)
        started = ScheduleRun(len(plan), plan[-1].at_s, pid, start, str(schedule.log_path(testbed)))
    return AfterUp(checked, started)
