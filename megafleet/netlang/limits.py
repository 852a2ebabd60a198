"""The limits of a description, in one place: what the compiler refuses with
file:line, and the language reference (netlang/__init__.py) quotes.

Two kinds:

- limits of Linux that megafleet cannot lift (interface names of 15 bytes,
  VLAN ids, MTU range, ports of one bridge). A switch with more ports than one
  bridge takes is built as a tree of bridges (see `BRIDGE_PORTS`), so only
  `SWITCH_PORTS_MAX` remains, and `net check` refuses a switch above it;
- limits that protect this process from a typo (`-D n=99999999999`): the number
  of names one description may declare, settable with the environment variable
  `MEGAFLEET_MAX_NAMES`.
"""

from __future__ import annotations

import os

# Linux: IFNAMSIZ is 16 bytes with the terminating NUL.
IFNAME_MAX = 15
# A testbed's name prefixes every interface and namespace it creates; 8
# characters leave 7 for the rest of a generated interface name.
TESTBED_NAME_MAX = 8
NAME_MAX = 63
VLAN_MIN, VLAN_MAX = 1, 4094
MTU_MIN, MTU_MAX = 68, 65535
# A Linux bridge numbers its ports 1..1023 (BR_MAX_PORTS is 1024, port 0 is
# reserved): the kernel refuses the next one with "Exchange full".
BRIDGE_PORTS = 1023
# A switch with more ports becomes a tree: a root bridge and leaf bridges, each
# leaf joined to the root by one veth, so a leaf holds at most BRIDGE_PORTS - 1
# ports. The root keeps room for switch links and VXLAN tunnels.
ROOT_RESERVED = 23
LEAF_PORTS = BRIDGE_PORTS - 1
SWITCH_PORTS_MAX = (BRIDGE_PORTS - ROOT_RESERVED) * LEAF_PORTS     # 1,022,000
# ... but leaves of about LEAF_PORTS_TARGET ports while the root has room for
# that many: the kernel's work to add a port to a bridge walks every port the
# bridge already has (port state selection, promiscuity and feature sync, MTU),
# so bigger leaves cost more per port: bench/container_net.py, 5,000 container
# NICs, 1.34 ms of network each on bridges of 256 ports, 2.37 ms on bridges of
# 1,000 (bench/RESULTS.md, session 6).
LEAF_PORTS_TARGET = 256


def leaf_count(ports: int, root_room: int) -> int | None:
    """How many leaves a tree of `ports` ports gets when its root has room
    for `root_room` of them: enough for leaves of LEAF_PORTS_TARGET, else
    enough for full leaves of LEAF_PORTS; None when even that does not fit.
    The ports are then shared evenly (`leaf_share`)."""
    for size in (LEAF_PORTS_TARGET, LEAF_PORTS):
        n = -(-ports // size)
        if n <= root_room:
            return n
    return None


def leaf_share(ports: int, leaves: int) -> int:
    """Ports per leaf when `ports` are shared evenly by `leaves` leaves (the
    last may have fewer)."""
    return -(-ports // leaves)

DEFAULT_MAX_NAMES = 1_000_000
MAX_NAMES_ENV = "MEGAFLEET_MAX_NAMES"


def max_names() -> int:
    """How many names (nodes and switches) one description may declare:
    $MEGAFLEET_MAX_NAMES, else 1,000,000. Raises ValueError when the variable is
    not a positive whole number."""
    text = os.environ.get(MAX_NAMES_ENV)
    if text is None or text == "":
        return DEFAULT_MAX_NAMES
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MAX_NAMES_ENV}={text!r}: expected a positive whole number")
    return int(text)
