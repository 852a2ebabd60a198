"""References to nodes and links of a compiled description, and link settings.

The same references the language accepts: a name (`r1`, `core`), a range
(`web[1..10]`), a glob (`core*`, `pc?_1`), a group (`@staff`). A link is
`A -- B` (node -- node, switch -- node, node -- switch, switch -- switch) or
`A` alone: every link with an end in A. Pure logic on `netlang.model.Net`: no
host is touched here.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from megafleet.netlang import values
from megafleet.netlang.model import Net

_RANGE_RE = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*?)\[(\d+)\.\.(\d+)\]([A-Za-z0-9_.-]*)")


class RefError(ValueError):
    """A reference or a setting the user gave that does not hold."""


@dataclass(frozen=True)
class LinkRef:
    """One link of the description, by the names at its ends.

    kind: "port" (a = node, b = switch), "p2p" (a, b nodes, sorted) or
    "swlink" (a, b switches, as declared)."""

    kind: str
    a: str
    b: str

    @property
    def label(self) -> str:
        return f"{self.a} -- {self.b}"

    def to_json(self) -> list[str]:
        return [self.kind, self.a, self.b]

    @classmethod
    def from_json(cls, d: list[str]) -> "LinkRef":
        return cls(*d)


@dataclass
class LinkSettings:
    """What `link set` changes; None leaves a setting as it is. Units: delay and
    jitter in microseconds, loss in percent, rate in bit/s; `clear` names the
    settings to remove (back to none)."""

    delay_us: int | None = None
    jitter_us: int | None = None
    loss_pct: float | None = None
    rate_bit: int | None = None
    clear: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [])}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LinkSettings":
        return cls(**d)

    def empty(self) -> bool:
        return not self.to_json()


# The settings of a LinkSettings (its fields but `clear`): the keys of a link's
# run-time record and of the impairments in a description's link props.
IMPAIRMENTS = ("delay_us", "jitter_us", "loss_pct", "rate_bit")


SETTINGS = ("delay", "jitter", "loss", "rate")


def parse_settings(words: list[str]) -> LinkSettings:
    """`delay 50ms jitter 5ms loss 1% rate 10mbit`; `none` (or 0) as a value
    removes that setting. Raises RefError naming the bad word."""
    s = LinkSettings()
    i = 0
    if not words:
        raise RefError(f"nothing to set: give one or more of {', '.join(SETTINGS)} with a value")
    while i < len(words):
        key = words[i]
        if key not in SETTINGS:
            raise RefError(f"unknown link setting {key!r} (known: {', '.join(SETTINGS)})")
        if i + 1 >= len(words):
            raise RefError(f"{key} needs a value (e.g. delay 50ms, loss 5%, rate 10mbit, or none)")
        value = words[i + 1]
        i += 2
        if value.startswith("-"):
            raise RefError(f"invalid {key} {value!r}: it cannot be negative")
        if value in ("none", "0", "off"):
            s.clear.append(key)
            continue
        try:
            if key == "delay":
                s.delay_us = values.duration_us(value)
            elif key == "jitter":
                s.jitter_us = values.duration_us(value)
            elif key == "loss":
                s.loss_pct = values.percent(value)
            else:
                s.rate_bit = values.rate_bit(value)
        except ValueError as exc:
            raise RefError(str(exc)) from None
    return s


_FIELDS = {"delay": "delay_us", "jitter": "jitter_us", "loss": "loss_pct", "rate": "rate_bit"}


def clear_others(s: LinkSettings) -> LinkSettings:
    """`link set --clear [settings]`: every setting `s` does not give goes back
    to none (with no settings: the link has no impairment at all)."""
    return LinkSettings(s.delay_us, s.jitter_us, s.loss_pct, s.rate_bit,
                        clear=[k for k in SETTINGS if getattr(s, _FIELDS[k]) is None])


def split_link_words(words: list[str]) -> tuple[str, str | None, list[str]]:
    """`A -- B rest...` -> (A, B, rest); `A rest...` -> (A, None, rest)."""
    if not words:
        raise RefError("expected a link: A -- B (or A for every link of A)")
    if len(words) >= 3 and words[1] == "--":
        return words[0], words[2], words[3:]
    if words[0] == "--" or (len(words) > 1 and words[1] == "--"):
        raise RefError("expected a link: A -- B")
    return words[0], None, words[1:]


def resolve(net: Net, text: str, want: str = "any") -> list[str]:
    """Names matching a reference; `want` is "node", "switch" or "any". Raises
    RefError when nothing matches or a name is unknown."""
    sw, idx = net.switches, net.index
    if text.startswith("@"):
        members = [n for g in net.groups if g.group == text[1:] for n in g.names]
        if not members:
            raise RefError(f"unknown group {text[1:]!r}")
        names = members
    elif (m := _RANGE_RE.fullmatch(text)) is not None:
        base, lo_t, hi_t, suffix = m.groups()
        width = len(lo_t) if lo_t.startswith("0") and len(lo_t) > 1 else 0
        names = [f"{base}{i:0{width}d}{suffix}" for i in range(int(lo_t), int(hi_t) + 1)]
        missing = [n for n in names if n not in sw and n not in idx]
        if missing:
            raise RefError(f"unknown node or switch {missing[0]!r} in {text!r}")
    elif set("*?[") & set(text):
        pool = (list(sw) if want in ("switch", "any") else []) + (list(idx) if want in ("node", "any") else [])
        names = fnmatch.filter(pool, text)
        if not names:
            raise RefError(f"pattern {text!r} matches no {'node or switch' if want == 'any' else want}")
        return names
    else:
        if text not in sw and text not in idx:
            raise RefError(f"unknown node or switch {text!r}")
        names = [text]
    if want == "node" and any(n in sw for n in names):
        raise RefError(f"{next(n for n in names if n in sw)!r} is a switch, not a node")
    if want == "switch" and any(n not in sw for n in names):
        raise RefError(f"{next(n for n in names if n not in sw)!r} is not a switch")
    return names


def all_links(net: Net) -> list[LinkRef]:
    """Every link of the description, in a stable order."""
    out: list[LinkRef] = []
    seen: set[LinkRef] = set()
    for _, _, node in net.iter_nodes():
        for _, iface, _ in net.node(node).ifaces:
            if iface.switch is not None:
                ref = LinkRef("port", node, iface.switch)
            elif iface.peer is not None:
                a, b = sorted((node, iface.peer))
                ref = LinkRef("p2p", a, b)
            else:
                continue        # on neither a switch nor a link: no link to name
            if ref not in seen:
                seen.add(ref)
                out.append(ref)
    for sl in net.switch_links:
        ref = LinkRef("swlink", sl.a, sl.b)
        if ref not in seen:
            seen.add(ref)
            out.append(ref)
    return out


def links(net: Net, a: str, b: str | None) -> list[LinkRef]:
    """The links between the references `a` and `b` (or every link with an end
    in `a` when b is None). Raises RefError when there is none."""
    aa = set(resolve(net, a))
    bb = set(resolve(net, b)) if b is not None else None
    found = []
    for ref in all_links(net):
        if bb is None:
            hit = ref.a in aa or ref.b in aa
        else:
            hit = (ref.a in aa and ref.b in bb) or (ref.a in bb and ref.b in aa)
        if hit:
            found.append(ref)
    if not found:
        what = f"{a} -- {b}" if b is not None else a
        raise RefError(f"no link {what} in the description"
                       + ("" if b is None else f" ({a} and {b} are not connected)"))
    return found


def nodes(net: Net, pattern: str) -> list[str]:
    """Node names matching a reference (no switches)."""
    return resolve(net, pattern, "node")
