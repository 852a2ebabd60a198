"""The shape of the fanout tree: which agent starts which other agents.

A subtree is a plain, serialisable structure so that a parent can hand it down to
the child that must build it::

    {"host": {<host spec>}, "children": [<subtree>, ...]}

`layout` splits n hosts into at most `fanout` groups of near-equal size; the first
host of each group becomes a direct child and the rest of the group its subtree,
laid out the same way. Depth is therefore about log_fanout(n) and no agent ever
holds more than `fanout` SSH sessions. fanout >= n gives a flat star.
"""

from __future__ import annotations

from typing import Any, Iterator

Subtree = dict[str, Any]


def layout(hosts: list[dict[str, Any]], fanout: int) -> list[Subtree]:
    """The list of subtrees hanging directly below the root."""
    if fanout < 1:
        raise ValueError(f"fanout must be at least 1, got {fanout}")
    if not hosts:
        return []
    groups = min(fanout, len(hosts))
    size, extra = divmod(len(hosts), groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (1 if g < extra else 0)
        head, rest = hosts[start], hosts[start + 1:end]
        out.append({"host": head, "children": layout(rest, fanout)})
        start = end
    return out


def names(subtree: Subtree) -> Iterator[str]:
    """Every host name in a subtree, its head first."""
    yield subtree["host"]["name"]
    for child in subtree["children"]:
        yield from names(child)


def depth(subtrees: list[Subtree]) -> int:
    """Number of agent levels below the root (0 for an empty fleet)."""
    return max((1 + depth(s["children"]) for s in subtrees), default=0)


def prune(subtree: Subtree, wanted: set[str]) -> bool:
    """True if any host of the subtree is in `wanted` (whether a request must be
    forwarded into it)."""
    return any(name in wanted for name in names(subtree))
