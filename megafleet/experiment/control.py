"""The controller side: which testbed, its compiled description, and calling the
host side on every host of it (through gproc, or in this process when the
testbed is local)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import trio

from megafleet.experiment import refs as R
from megafleet.experiment.hostside import MODULE

LOCAL = "local"


class ControlError(RuntimeError):
    pass


@dataclass
class Testbed:
    """A testbed this controller brought up: its name, where it runs, its
    description compiled again (with the parameters `up` was given)."""

    name: str
    target: Any                   # megafleet.up.Target
    source: str
    defines: dict[str, str]
    hosts: list[str]
    net: Any = None

    def compiled(self):
        if self.net is None:
            from megafleet.netlang import CompileError, compile_file
            try:
                self.net = compile_file(self.source, self.defines, graph=False)
            except CompileError as exc:
                raise ControlError(f"the description of {self.name} no longer compiles: {exc}") from None
            except OSError as exc:
                raise ControlError(f"cannot read the description of {self.name}: {exc}") from None
        return self.net


def testbed(name: str | None) -> Testbed:
    """The named testbed, or the only one up. Raises ControlError."""
    from megafleet.up import Target, deployments

    known = deployments()
    if name is None:
        if len(known) != 1:
            raise ControlError("no testbed is up" if not known else
                               f"{len(known)} testbeds are up ({', '.join(sorted(known))}); name one with -t")
        name = next(iter(known))
    if name not in known:
        raise ControlError(f"testbed {name!r} is not up (known: {', '.join(sorted(known)) or 'none'})")
    d = known[name]
    return Testbed(name, Target.from_json(d["target"]), d["source"], dict(d.get("defines") or {}),
                   list(d.get("hosts") or []))


async def on_hosts(tb: Testbed, handler: str, payload: dict[str, Any], *, timeout: float = 120,
                   on_event: Callable[[str, Any], Any] | None = None,
                   only: list[str] | None = None) -> dict[str, Any]:
    """Run an experiment.* handler on every host of the testbed; returns
    {host: value}. A host that failed raises ControlError naming it."""
    from megafleet.gproc import handlers

    payload = {**payload, "testbed": tb.name}
    if tb.target.embedded:
        fn = handlers.lookup(handler, [MODULE])

        async def emit(event: Any) -> None:
            if on_event is not None:
                r = on_event(LOCAL, event)
                if hasattr(r, "__await__"):
                    await r

        try:
            return {LOCAL: await fn(payload, handlers.Context(LOCAL, emit))}
        except ControlError:
            raise
        except Exception as exc:
            raise ControlError(str(exc)) from None
    from megafleet.gproc import Fleet

    inv = tb.target.inventory()
    names = tb.hosts or [h.name for h in inv.select(tb.target.hosts or None)]
    if only is not None:
        names = [h for h in names if h in only]
    async with Fleet.connect(inv, hosts=names, fanout=8) as fleet:
        per_host = {h: {**payload, **tb.target.dirs(h)} for h in names}
        report = await fleet.call(handler, per_host=per_host, modules=[MODULE], timeout=timeout,
                                  on_event=on_event)
    failed = {h: r.error or r.status for h, r in report.results.items() if r.status != "ok"}
    if failed:
        raise ControlError("; ".join(f"host {h}: {e}" for h, e in sorted(failed.items())))
    return {h: r.value for h, r in report.results.items()}


def message(op: str, link_words: str, settings: R.LinkSettings | None = None) -> str:
    text = f"link {link_words} {op}"
    if settings is not None:
        parts = []
        names = {"delay_us": "delay", "jitter_us": "jitter", "loss_pct": "loss", "rate_bit": "rate"}
        for k, v in settings.to_json().items():
            if k == "clear":
                parts += [f"{c} none" for c in v]
            elif k in ("delay_us", "jitter_us"):
                parts.append(f"{names[k]} {v / 1000:g}ms")
            elif k == "loss_pct":
                parts.append(f"loss {v:g}%")
            else:
                parts.append(f"rate {v}bit")
        text = f"link {link_words} " + " ".join(parts)
    return text


async def link(tb: Testbed, op: str, a: str, b: str | None, settings: R.LinkSettings | None = None,
               source: str = "cli", time_ms: int | None = None) -> list[dict]:
    """`op` (set | up | down) on the links between references a and b. Every
    reference is checked against the description before any host is touched."""
    try:
        found = R.links(tb.compiled(), a, b)
    except R.RefError as exc:
        raise ControlError(str(exc)) from None
    words = f"{a} -- {b}" if b is not None else a
    payload = {"op": op, "links": [r.to_json() for r in found],
               "settings": settings.to_json() if settings else {},
               "message": message(op, words, settings), "source": source, "action": "link " + op,
               "time_ms": time_ms or int(time.time() * 1000)}
    res = await on_hosts(tb, "experiment.link", payload)
    done = [{**row, "host": h} for h, rows in res.items() for row in rows]
    missing = {r.label for r in found} - {d["link"] for d in done}
    if missing and not done:
        raise ControlError(f"no host has the link(s) {', '.join(sorted(missing))}")
    return done


async def node(tb: Testbed, action: str, pattern: str, source: str = "cli",
               time_ms: int | None = None) -> list[dict]:
    try:
        names = R.nodes(tb.compiled(), pattern)
    except R.RefError as exc:
        raise ControlError(str(exc)) from None
    payload = {"action": action, "nodes": names, "message": f"node {pattern} {action}", "source": source,
               "time_ms": time_ms or int(time.time() * 1000)}
    res = await on_hosts(tb, "experiment.node", payload, timeout=600)
    return [{**row, "host": h} for h, rows in res.items() for row in rows]


async def link_show(tb: Testbed) -> list[dict]:
    res = await on_hosts(tb, "experiment.link-show", {})
    return sorted(({**row, "host": h} for h, rows in res.items() for row in rows), key=lambda r: r["link"])


def parse_capture_target(net, text: str) -> dict[str, Any]:
    """NODE[:IFACE] | SWITCH | 'A -- B' (given as one string or words)."""
    if " -- " in text:
        a, b = (w.strip() for w in text.split(" -- ", 1))
        found = R.links(net, a, b)
        if len(found) != 1:
            raise R.RefError(f"{text!r} names {len(found)} links; capture one")
        return {"link": found[0].to_json()}
    name, _, iface = text.partition(":")
    if name in net.switches:
        if iface:
            raise R.RefError(f"{name} is a switch: capture it whole (no :IFACE)")
        return {"switch": name}
    if name not in net.index:
        raise R.RefError(f"unknown node or switch {name!r}")
    if iface:
        have = [e for e, _, _ in net.node(name).ifaces]
        if iface not in have:
            raise R.RefError(f"node {name} has no interface {iface!r} (it has {', '.join(have) or 'none'})")
    return {"node": name, "iface": iface or None}


async def capture(tb: Testbed, what: dict[str, Any], write: Callable[[bytes], None], *, count: int | None,
                  duration: float | None, bpf: str | None) -> dict[str, Any]:
    """Stream a pcap from the host that has `what` to `write` (called in this
    thread with each chunk; the pcap header comes first, from tcpdump itself).
    One host captures (a switch spanning hosts: the first that has it), so that
    one pcap stream comes back. Locally tcpdump runs as a child of this process;
    on a remote host through gproc's exec, whose output is a byte stream."""
    payload = {"what": what, "count": count, "duration": duration, "filter": bpf}
    probe = await on_hosts(tb, "experiment.capture", {**payload, "probe": True})
    having = sorted(h for h, v in probe.items() if v.get("has"))
    if not having:
        raise ControlError("no host of the testbed has that capture point (is the node running?)")
    host = having[0]
    if tb.target.embedded:
        from megafleet.experiment import hostside

        async def sink(chunk: bytes) -> None:
            write(chunk)

        return {host: await hostside.capture(tb.name, what, sink, count=count, duration=duration, bpf=bpf)}
    from megafleet.gproc import Fleet

    argv = probe[host]["argv"]
    if duration:
        # SIGINT: tcpdump flushes what it has and exits 0.
        argv = ["timeout", "-s", "INT", f"{duration:g}"] + argv
    total = {"bytes": 0}
    errors: list[bytes] = []

    def on_output(h: str, fd: int, data: bytes) -> None:
        if fd == 1:
            total["bytes"] += len(data)
            write(data)
        else:
            errors.append(data)

    inv = tb.target.inventory()
    async with Fleet.connect(inv, hosts=[host], fanout=8) as fleet:
        report = await fleet.exec(argv, hosts=[host], timeout=(duration or 24 * 3600) + 30, on_output=on_output)
    r = report.results[host]
    if r.status != "ok" and not total["bytes"]:
        raise ControlError(f"capture on {host} failed: {r.error or b''.join(errors).decode(errors='replace')[-300:]}")
    return {host: {"bytes": total["bytes"]}}


def run(fn, *args, **kwargs):
    return trio.run(lambda: fn(*args, **kwargs))


def source_path(tb: Testbed) -> Path:
    return Path(tb.source)
