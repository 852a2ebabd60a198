"""Fault schedules in a description: timed link and node actions.

    at +30s link r1 -- r2 down
    at +60s link r1 -- r2 up
    at +45s node web[1..10] restart
    every 20s for 2m link core* loss 5%
    every 30s for 5m from +10s node r2 restart

Times count from the end of `megafleet up` (or from `megafleet run-schedule`).
`at T` runs once; `every P for D [from T]` runs at T, T+P, T+2P, ... while
before T+D. Durations: 500ms, 30s, 2m, 1h (a leading + is allowed).

Actions: `link A [-- B] down|up`, `link A [-- B] SETTING VALUE...` (delay,
jitter, loss, rate; `none` removes one), `node REF stop|start|restart|kill`.
References are the language's (names, ranges, globs, @group); they are checked
at compile time like every other statement, with file:line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megafleet.netlang import values
from megafleet.netlang.errors import Loc

_DUR = re.compile(r"\+?(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
LINK_SETTINGS = ("delay", "jitter", "loss", "rate")
NODE_ACTIONS = ("stop", "start", "restart", "kill")
MAX_EVENTS = 100_000


class FaultError(ValueError):
    def __init__(self, loc: Loc, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


@dataclass
class Fault:
    """One schedule statement. kind: "link" (a, b, action down|up|set, settings
    words) or "node" (a, action). Times in seconds from the end of `up`."""

    loc: Loc
    kind: str
    a: str
    b: str | None
    action: str
    settings: list[str] = field(default_factory=list)
    at_s: float = 0.0
    every_s: float | None = None
    for_s: float | None = None
    a_loc: Loc | None = None
    b_loc: Loc | None = None

    def times(self) -> list[float]:
        """When it runs, in seconds from the start of the schedule."""
        if self.every_s is None:
            return [self.at_s]
        assert self.for_s is not None, "'every' comes with 'for'"
        out, t = [], self.at_s
        while t < self.at_s + self.for_s - 1e-9:
            out.append(round(t, 3))
            t += self.every_s
        return out

    def text(self) -> str:
        if self.kind == "node":
            return f"node {self.a} {self.action}"
        ref = self.a if self.b is None else f"{self.a} -- {self.b}"
        return f"link {ref} {self.action if self.action != 'set' else ' '.join(self.settings)}"

    def to_json(self) -> dict:
        return {"loc": f"{self.loc.file}:{self.loc.line}", "kind": self.kind, "a": self.a, "b": self.b,
                "action": self.action, "settings": self.settings, "at_s": self.at_s,
                "every_s": self.every_s, "for_s": self.for_s}


def seconds(text: str, loc: Loc, what: str) -> float:
    m = _DUR.fullmatch(text)
    if not m:
        raise FaultError(loc, f"invalid {what} {text!r} (use e.g. +30s, 500ms, 2m, 1h)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse(words: list, loc: Loc) -> Fault:
    """A schedule statement's words (netlang.parser.Word) -> Fault; raises
    FaultError with the location of the word that is wrong."""
    kw = words[0].text
    i = 1

    def need(what: str):
        nonlocal i
        if i >= len(words):
            raise FaultError(words[-1].loc, f"expected {what} after {words[-1].text!r}")
        w = words[i]
        i += 1
        return w

    at_s, every_s, for_s = 0.0, None, None
    if kw == "at":
        w = need("a time (e.g. +30s)")
        at_s = seconds(w.text, w.loc, "time")
    else:
        w = need("a period (e.g. 20s)")
        every_s = seconds(w.text, w.loc, "period")
        if every_s <= 0:
            raise FaultError(w.loc, "the period of 'every' must be more than 0")
        w = need("'for DURATION'")
        if w.text != "for":
            raise FaultError(w.loc, f"expected 'for DURATION' after the period (a schedule must end), got {w.text!r}")
        w = need("a duration (e.g. 2m)")
        for_s = seconds(w.text, w.loc, "duration")
        if i < len(words) and words[i].text == "from":
            i += 1
            w = need("a time (e.g. +10s)")
            at_s = seconds(w.text, w.loc, "time")
        if for_s / every_s > MAX_EVENTS:
            raise FaultError(loc, f"this schedule would run {int(for_s / every_s)} times (at most {MAX_EVENTS})")
    what = need("'link' or 'node'")
    if what.text == "node":
        ref = need("a node (name, range, glob or @group)")
        act = need(f"an action ({', '.join(NODE_ACTIONS)})")
        if act.text not in NODE_ACTIONS:
            raise FaultError(act.loc, f"unknown node action {act.text!r} (use {', '.join(NODE_ACTIONS)})")
        if i < len(words):
            raise FaultError(words[i].loc, f"unexpected {words[i].text!r} after the node action")
        return Fault(loc, "node", ref.text, None, act.text, [], at_s, every_s, for_s, ref.loc)
    if what.text != "link":
        raise FaultError(what.loc, f"expected 'link' or 'node', got {what.text!r}")
    a = need("a link (A -- B, or A)")
    b = None
    if i < len(words) and words[i].text == "--":
        i += 1
        b = need("the other end of the link")
    rest = words[i:]
    if not rest:
        raise FaultError(words[-1].loc, "expected down, up or link settings (delay, jitter, loss, rate)")
    if rest[0].text in ("down", "up"):
        if len(rest) > 1:
            raise FaultError(rest[1].loc, f"unexpected {rest[1].text!r} after {rest[0].text!r}")
        return Fault(loc, "link", a.text, b.text if b else None, rest[0].text, [], at_s, every_s, for_s,
                     a.loc, b.loc if b else None)
    j = 0
    while j < len(rest):
        k = rest[j]
        if k.text not in LINK_SETTINGS:
            raise FaultError(k.loc, f"unknown link action {k.text!r} (down, up, {', '.join(LINK_SETTINGS)})")
        if j + 1 >= len(rest):
            raise FaultError(k.loc, f"{k.text} needs a value")
        v = rest[j + 1]
        if v.text not in ("none", "0", "off"):
            try:
                if v.text.startswith("-"):
                    raise ValueError(f"invalid {k.text} {v.text!r}: it cannot be negative")
                {"delay": values.duration_us, "jitter": values.duration_us, "loss": values.percent,
                 "rate": values.rate_bit}[k.text](v.text)
            except ValueError as exc:
                raise FaultError(v.loc, str(exc)) from None
        j += 2
    return Fault(loc, "link", a.text, b.text if b else None, "set", [w.text for w in rest], at_s, every_s,
                 for_s, a.loc, b.loc if b else None)


def linked(net, aa: set[str], bb: set[str] | None) -> bool:
    """Whether some link of the compiled net joins a name of `aa` to one of `bb`
    (or, with bb None, touches `aa`)."""
    def hit(x: str, y: str) -> bool:
        if bb is None:
            return x in aa or y in aa
        return (x in aa and y in bb) or (x in bb and y in aa)

    for sl in net.switch_links:
        if hit(sl.a, sl.b):
            return True
    for g, k, node in net.iter_nodes():
        if bb is None and node in aa:
            if g.ifaces or net.extra_ifaces.get(node):
                return True
        for iface in list(g.ifaces) + net.extra_ifaces.get(node, []):
            if k not in iface.members:
                continue
            other = iface.switch if iface.switch is not None else iface.peer
            if other is not None and hit(node, other):
                return True
    return False
