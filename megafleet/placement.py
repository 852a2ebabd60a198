"""Placement: which host runs which node of a testbed.

A pure, deterministic function of the testbed and the host inventory. Goals, in
order:

1. Respect every host's capacity (guest count) and memory budget. A node costs
   its driver's footprint (`megafleet.vm.driver.DRIVER_KINDS`: a QEMU guest its
   RAM plus QEMU's overhead, a container a few MiB), with the share of guest RAM
   KSM is expected to merge taken off: the same model the engine's admission
   applies on the host, so what is placed on a host is admitted there.
2. Keep each switch segment on as few hosts as possible: every segment that spans
   hosts costs a VXLAN tunnel and cross-host traffic.
3. Spread load: between hosts that fit equally well, pick the emptiest.

The method is first-fit-decreasing over segments: segments are placed largest
first, each on the single host with the most room where it fits whole; a segment
that fits on no single host is split across the hosts with the most room, largest
share first. Ties are broken by name, so the same inputs always give the same plan.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

VXLAN_VNI_BASE = 10000


@dataclass(frozen=True)
class NodeDemand:
    """What one node asks of a host."""

    name: str
    segment: str  # the switch it sits on (its first one); routers: their first iface's
    mem_mb: int   # a guest's `mem`; a node without driver (namespace): its host MiB
    image: str = ""
    driver: str | None = None  # vm driver (megafleet.vm.driver registry); None: a namespace


@dataclass(frozen=True)
class HostOffer:
    """What one host can give."""

    name: str
    capacity: int  # guests at most
    mem_mb: int  # memory budget for guests


@dataclass
class Plan:
    hosts: dict[str, list[str]]  # host -> node names, sorted
    node_host: dict[str, str]
    segment_hosts: dict[str, list[str]]  # segment -> hosts it spans, sorted
    vnis: dict[str, int]  # spanning segment -> VXLAN VNI
    unplaced: list[str] = field(default_factory=list)

    @property
    def tunnels(self) -> int:
        return sum(len(h) - 1 for h in self.segment_hosts.values() if len(h) > 1)


class PlacementError(ValueError):
    pass


def demand_mb(node: NodeDemand, ksm_sharing: float) -> float:
    """Host MiB a node is expected to cost: its driver's footprint once KSM has
    merged `ksm_sharing` (0..0.9) of its RAM; a node without driver, its mem_mb.
    Raises PlacementError for an unknown driver."""
    if node.driver is None:
        return float(node.mem_mb)
    from megafleet.vm.driver import driver_kind
    try:
        return driver_kind(node.driver).footprint_mb(node.mem_mb, ksm_sharing)
    except ValueError as exc:
        raise PlacementError(f"node {node.name}: {exc}") from None


def place(nodes: list[NodeDemand], hosts: list[HostOffer], *, ksm_sharing: float = 0.0) -> Plan:
    """Place nodes on hosts (see the module docstring). Raises PlacementError when the
    whole testbed cannot fit, naming how much is missing, before anything starts."""
    if not hosts:
        raise PlacementError("no hosts to place on")
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise PlacementError("duplicate host names in the inventory")

    cost = {n.name: demand_mb(n, ksm_sharing) for n in nodes}
    total_need = sum(cost.values())
    total_mem = sum(h.mem_mb for h in hosts)
    total_cap = sum(h.capacity for h in hosts)
    if len(nodes) > total_cap:
        raise PlacementError(
            f"{len(nodes)} nodes exceed the inventory's capacity of {total_cap} guests")
    if total_need > total_mem:
        raise PlacementError(
            f"the testbed needs {total_need:.0f} MB of guest memory (KSM sharing "
            f"{ksm_sharing:.0%} counted) but the hosts' budgets total {total_mem} MB")

    free_slots = {h.name: h.capacity for h in hosts}
    free_mem = {h.name: float(h.mem_mb) for h in hosts}
    segments: dict[str, list[NodeDemand]] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        segments.setdefault(node.segment, []).append(node)

    node_host: dict[str, str] = {}
    unplaced: list[str] = []

    def need_of(members: list[NodeDemand]) -> float:
        return sum(cost[m.name] for m in members)

    def fits(host: str, count: int, need: float) -> bool:
        return free_slots[host] >= count and free_mem[host] >= need

    def room(host: str) -> tuple[float, str]:
        # Emptiest first (by the scarcer of slots and memory), name breaks ties.
        return (-min(free_slots[host], free_mem[host]), host)

    # Hosts by room in a heap, so finding the roomiest host that fits costs
    # O(log hosts) per segment instead of sorting every host for every segment
    # (4,480 hosts and segments made that the slowest step of a million-guest
    # plan). Entries are (room, host); an entry whose room is no longer the
    # host's current one is stale and skipped.
    current = {h: room(h) for h in free_slots}
    heap = list(current.values())
    heapq.heapify(heap)

    def roomiest_fitting(count: int, need: float) -> str | None:
        """The first host in room order where `count` nodes needing `need` MB fit."""
        popped = []
        found = None
        while heap and current[heap[0][1]] != heap[0]:
            heapq.heappop(heap)             # stale
        # A host that fits has min(slots, MB) >= min(count, need), and the top
        # has the largest min: when even it is below, none fits. Without this,
        # every segment too big for any host (a pod's routers) popped every
        # host: segments x hosts.
        if not heap or -heap[0][0] < min(count, need):
            return None
        while heap:
            key = heapq.heappop(heap)
            if current[key[1]] != key:
                continue
            popped.append(key)
            if fits(key[1], count, need):
                found = key[1]
                break
        for key in popped:
            heapq.heappush(heap, key)
        return found

    def take(host: str, node: NodeDemand) -> None:
        node_host[node.name] = host
        free_slots[host] -= 1
        free_mem[host] -= cost[node.name]
        key = room(host)
        if key != current[host]:
            current[host] = key
            heapq.heappush(heap, key)

    order = sorted(segments, key=lambda s: (-len(segments[s]), s))
    for segment in order:
        members = segments[segment]
        whole = roomiest_fitting(len(members), need_of(members))
        if whole is not None:
            for node in members:
                take(whole, node)
            continue
        # Split: fill the roomiest hosts in turn, so the segment touches few hosts.
        segment_uses: set[str] = set()
        for node in members:
            need = cost[node.name]
            # Prefer a host this segment already uses, to avoid another tunnel.
            used = [h for h in sorted(segment_uses, key=room) if fits(h, 1, need)]
            candidate = used[0] if used else roomiest_fitting(1, need)
            if candidate is None:
                unplaced.append(node.name)
                continue
            take(candidate, node)
            segment_uses.add(candidate)

    if unplaced:
        raise PlacementError(
            f"{len(unplaced)} nodes do not fit on any host (first: {unplaced[0]}); "
            "add hosts or raise their capacity or memory budgets")

    by_host: dict[str, list[str]] = {h.name: [] for h in hosts}
    segment_hosts: dict[str, set[str]] = {}
    for node in nodes:
        host = node_host[node.name]
        by_host[host].append(node.name)
        segment_hosts.setdefault(node.segment, set()).add(host)
    spanning = sorted(s for s, hs in segment_hosts.items() if len(hs) > 1)
    return Plan(
        hosts={h: sorted(ns) for h, ns in by_host.items()},
        node_host=node_host,
        segment_hosts={s: sorted(hs) for s, hs in sorted(segment_hosts.items())},
        vnis={s: VXLAN_VNI_BASE + i for i, s in enumerate(spanning)},
    )
