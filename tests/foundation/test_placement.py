import pytest

from megafleet.placement import HostOffer, NodeDemand, PlacementError, place
from megafleet.vm.driver import DRIVER_KINDS


def nodes(segment, n, mem=64, prefix=None):
    return [NodeDemand(f"{prefix or segment}{i}", segment, mem) for i in range(1, n + 1)]


def test_segments_stay_whole_when_they_fit():
    plan = place(nodes("lan1", 30) + nodes("lan2", 30) + nodes("lan3", 10),
                 [HostOffer("h1", 50, 10_000), HostOffer("h2", 50, 10_000)])
    assert plan.tunnels == 0
    assert all(len(hs) == 1 for hs in plan.segment_hosts.values())
    assert sorted(len(v) for v in plan.hosts.values()) == [30, 40]
    assert plan.vnis == {}


def test_a_segment_too_big_for_one_host_spans_few_hosts_with_a_vni():
    plan = place(nodes("big", 120), [HostOffer(f"h{i}", 50, 100_000) for i in range(1, 5)])
    assert len(plan.segment_hosts["big"]) == 3  # 50 + 50 + 20, not spread over 4
    assert plan.vnis == {"big": 10000}
    assert sum(len(v) for v in plan.hosts.values()) == 120


def test_memory_budget_counts_ksm_sharing():
    overhead = DRIVER_KINDS["qemu"].overhead_mb
    demand = [NodeDemand(f"q{i}", "lan", 100, driver="qemu") for i in range(10)]
    budget = 10 * (50 + overhead)
    with pytest.raises(PlacementError, match=f"needs {10 * (100 + overhead)} MB .* total {budget} MB"):
        place(demand, [HostOffer("h1", 100, budget)])
    plan = place(demand, [HostOffer("h1", 100, budget)], ksm_sharing=0.5)  # 10 x (50 + overhead)
    assert len(plan.hosts["h1"]) == 10


def test_driver_footprints_not_mem():
    # A container costs its driver's few MiB whatever its `mem`; a namespace
    # node (no driver) its mem_mb; an unknown driver is an error, not a guess.
    containers = [NodeDemand(f"c{i}", "lan", 4096, driver="container") for i in range(1000)]
    plan = place(containers, [HostOffer("h1", 10_000, 4000)])
    assert len(plan.hosts["h1"]) == 1000
    with pytest.raises(PlacementError, match="unknown driver 'xen'"):
        place([NodeDemand("x", "lan", 128, driver="xen")], [HostOffer("h1", 10, 10_000)])


def test_capacity_is_respected_and_errors_are_clear():
    with pytest.raises(PlacementError, match="exceed the inventory's capacity of 8"):
        place(nodes("lan", 9), [HostOffer("h1", 4, 10_000), HostOffer("h2", 4, 10_000)])
    with pytest.raises(PlacementError, match="no hosts"):
        place(nodes("lan", 1), [])


def test_placement_is_deterministic():
    demand = nodes("a", 17) + nodes("b", 33) + nodes("c", 5)
    hosts = [HostOffer("x", 30, 5000), HostOffer("y", 30, 5000)]
    first = place(demand, hosts)
    assert place(list(reversed(demand)), hosts).node_host == first.node_host
