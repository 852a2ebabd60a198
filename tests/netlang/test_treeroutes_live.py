"""Default routes and merged prefixes in the kernel (root): a spine of two pods
of two racks, with the prefixes merged as in a large network, forwards between
every pair of racks; teardown leaves nothing with the test's prefix."""

from __future__ import annotations

import pytest

from megafleet import proc
from megafleet.netlang import live, treeroutes
from megafleet.netlang.compiler import compile_text

from .test_live import addr_of, clean, leftovers, ping_within
from .test_treeroutes import fabric

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def _root(root_only):
    pass


def test_a_fabric_with_default_routes_and_merged_prefixes_forwards_between_all_racks(monkeypatch):
    name = "mfny"
    # Merged prefixes, as a network of more than AGGREGATE_ABOVE subnets gets them.
    monkeypatch.setattr(treeroutes, "AGGREGATE_ABOVE", 0)
    net = compile_text(fabric(2, 2))
    assert net.node("r1").routes[0][0] == "0.0.0.0/0"
    assert "10.0.2.0/23" in dict(net.node("p1").routes)     # pod 2's racks, one prefix
    try:
        live.up(net, name)
        hosts = [f"h{i}" for i in range(1, 5)]
        for a in hosts:
            for b in hosts:
                if a != b:
                    assert ping_within(f"{name}-{a}", addr_of(net, b), 10), (a, b)
        r1 = proc.run(["ip", "-n", f"{name}-r1", "route"]).stdout
        assert f"default via {addr_of(net, 'p1', 1)}" in r1, r1
        p1 = proc.run(["ip", "-n", f"{name}-p1", "route"]).stdout
        assert "10.0.2.0/23 via" in p1 and "default" not in p1, p1
    finally:
        live.down(name)
    assert leftovers(name) == clean(name)
