"""OSPF timers: explicit values from the description, the rest scaled with the
number of OSPF routers in the testbed.

Why scale: every router sends a hello on every interface each hello interval and
runs an SPF after every change it hears. With 1 s hellos a few hundred routers
on one 2-core host spend the CPU on hellos alone, and an SPF per received LSA
during the initial flood multiplies the work by the number of routers. Longer
hellos (the dead interval 4x the hello, as in RFC 2328's defaults) and a
throttled SPF keep the total work roughly linear in the number of routers.

Scale (n = OSPF routers in the description; `scaled`):
    n <= 50      hello 1 s, dead 4 s, the daemon's SPF and LSA defaults
                 (what small emulated networks want: a cut noticed in seconds)
    n > 50       hello ceil(n / 75) s capped at 10, dead 4x hello,
                 SPF delay/hold/max = min(n, 1000) ms / min(5n, 5000) ms / 10 s,
                 LSA pacing (minimum interval between originations of one LSA,
                 and minimum arrival interval) = 1000 ms

Explicit values (`ospf hello 5 dead 20 spf 100ms 1s 10s lsa 500ms`) always win
over scaled ones. With only `hello` given the dead interval is 4x it; with only
`dead` given the hello is a quarter of it (at least 1 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megafleet.netlang.model import Net

# Below this many OSPF routers the timers stay the fast ones (1 s / 4 s).
SMALL = 50

# Limits of the language (FRR's and BIRD's common ranges).
HELLO_MAX_S = 65535
SPF_MAX_MS = 600000
LSA_MAX_MS = 5000


@dataclass(frozen=True)
class OspfTimers:
    """Timers of one router. Seconds for hello/dead, milliseconds for the rest;
    None: the daemon's default."""

    hello_s: int = 1
    dead_s: int = 4
    spf_delay_ms: int | None = None
    spf_hold_ms: int | None = None
    spf_max_ms: int | None = None
    lsa_ms: int | None = None


def scaled(n_routers: int) -> OspfTimers:
    """The timers for a testbed of `n_routers` OSPF routers (see the module text)."""
    if n_routers <= SMALL:
        return OspfTimers()
    hello = min(10, math.ceil(n_routers / 75))
    return OspfTimers(hello_s=hello, dead_s=4 * hello, spf_delay_ms=min(n_routers, 1000),
                      spf_hold_ms=min(5 * n_routers, 5000), spf_max_ms=10000, lsa_ms=1000)


def ospf_router_count(net: Net) -> int:
    """OSPF routers in the description (a group counts all its members)."""
    return sum(len(g) for g in net.groups if g.kind == "router" and "ospf" in g.props)


def effective(ospf: dict, n_routers: int) -> OspfTimers:
    """Timers of a router whose `ospf` properties are `ospf` (the compiler's dict:
    keys hello, dead, spf (delay, hold, max) and lsa when written), in a testbed
    of `n_routers` OSPF routers: explicit values win, the rest are scaled."""
    base = scaled(n_routers)
    hello: int | None = ospf.get("hello")
    dead: int | None = ospf.get("dead")
    if hello is None and dead is None:
        hello, dead = base.hello_s, base.dead_s
    elif dead is None:
        assert hello is not None
        dead = 4 * hello
    elif hello is None:
        hello = max(1, dead // 4)
    assert hello is not None and dead is not None
    spf_delay, spf_hold, spf_max = ospf.get("spf") or (base.spf_delay_ms, base.spf_hold_ms, base.spf_max_ms)
    lsa = ospf["lsa"] if "lsa" in ospf else base.lsa_ms
    return OspfTimers(hello, min(dead, HELLO_MAX_S), spf_delay, spf_hold, spf_max, lsa)


def check(ospf: dict) -> str | None:
    """What is wrong with explicit timers (a message for the user), or None."""
    hello, dead = ospf.get("hello"), ospf.get("dead")
    if hello is not None and dead is not None and dead <= hello:
        return f"OSPF dead interval {dead} s must be longer than the hello interval {hello} s"
    if dead is not None and hello is None and dead < 2:
        return f"OSPF dead interval {dead} s is too short (at least 2 s: it must exceed a hello of 1 s)"
    spf = ospf.get("spf")
    if spf is not None and not spf[0] <= spf[1] <= spf[2]:
        return (f"OSPF spf timers {spf[0]}ms {spf[1]}ms {spf[2]}ms: expected delay <= hold <= max "
                f"(e.g. spf 200ms 1s 10s)")
    return None
