"""The shape of the fanout tree: which agent starts which other agents.

A subtree is a plain, serialisable structure so that a parent can hand it down to
the child that must build it::

    {"host": {<host spec>}, "children": [<subtree>, ...]}

`layout` fills the tree level by level: hosts 0..k-1 hang below the root, each
level is full before the next starts, and each agent of a level takes k hosts of
the next in turn, the agents taken in an order that alternates between the
subtrees of the root (so the subtrees stay the same size). That gives the least
depth (about log_k(n)) *and* the fewest inner agents (about n/k): every other
host is a leaf, which only runs what it is asked and never opens SSH sessions
itself, so building the tree costs little more than one SSH session per host.
No agent holds more than `fanout` sessions; fanout >= n gives a flat star.

The controller's own fanout (`root_fanout`, default `fanout`) can differ: when
the controller has a better uplink than the hosts (a push sends one copy per
child over the sender's link), a wide first level and narrow agents below it
spread the copies over many links: root_fanout r hosts on the first level, k
below each agent after that.
"""

from __future__ import annotations

from typing import Any, Iterator

Subtree = dict[str, Any]


def layout(hosts: list[dict[str, Any]], fanout: int, root_fanout: int | None = None) -> list[Subtree]:
    """The list of subtrees hanging directly below the root."""
    root_fanout = fanout if root_fanout is None else root_fanout
    if fanout < 1 or root_fanout < 1:
        raise ValueError(f"fanout must be at least 1, got {min(fanout, root_fanout)}")
    n = len(hosts)
    nodes: list[Subtree] = [{"host": h, "children": []} for h in hosts]
    top = nodes[:min(root_fanout, n)]
    level, i = top, len(top)
    while i < n:
        count = min(n - i, len(level) * fanout)
        for k, node in enumerate(nodes[i:i + count]):
            level[k // fanout]["children"].append(node)
        i += count
        # The next level in interleaved order (every parent's first child, then
        # every parent's second, ...): consecutive parents then sit in different
        # subtrees of the root, so a partly filled level is spread over all of
        # them. In plain heap order it filled the first subtree alone: 448 hosts
        # at fanout 16 gave one subtree of 193 hosts and fifteen of 17, and that
        # subtree's request carried 43 % of every manifest.
        level = [p["children"][c] for c in range(fanout) for p in level if c < len(p["children"])]
    return top


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
