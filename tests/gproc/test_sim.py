"""The control-plane simulator (megafleet.gproc.sim): the real Fleet, Node,
agents, protocol, placement and manifests over simulated links and hosts, on
trio's virtual clock. Small sizes only; the figures come from bench/million.py."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from megafleet.gproc import tree
from megafleet.gproc.sim import hosts as sim_hosts
from megafleet.gproc.sim import links, run

REPO = Path(__file__).resolve().parents[2]


def test_reach_grows_with_the_depth_of_the_tree_not_the_number_of_agents():
    link = links.LinkModel(latency_s=0.001)
    small = run.simulate(run.reach, 20, 4, link)
    large = run.simulate(run.reach, 400, 4, link)
    assert (small.up, large.up) == (20, 400)
    assert small.connects == 20 and large.connects == 400      # one session per host
    depth_small = tree.depth(tree.layout([{"name": str(i)} for i in range(20)], 4))
    depth_large = tree.depth(tree.layout([{"name": str(i)} for i in range(400)], 4))
    assert (depth_small, depth_large) == (2, 5)
    # Each level costs a handshake (4 latencies), setup and ready (2): 6 ms.
    assert 0.006 * depth_small <= small.reach_s < 0.006 * depth_small + 0.004
    assert 0.006 * depth_large <= large.reach_s < 0.006 * depth_large + 0.004
    assert small.agents_left == 0 and large.agents_left == 0


def test_bandwidth_and_decode_cost_are_charged_per_hop():
    fast = run.simulate(run.reach, 50, 50, links.LinkModel(latency_s=0.001, bandwidth_bps=1e12))
    slow = run.simulate(run.reach, 50, 50, links.LinkModel(latency_s=0.001, bandwidth_bps=1e12,
                                                             decode_s_per_byte=1e-3))
    # Flat star: one level; a setup frame of ~150 bytes then costs ~0.15 s to decode.
    assert fast.reach_s < 0.01 and 0.1 < slow.reach_s < 1.0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "racks.fleet"
    path.write_text(run.racks_description(6, 20, racks_per_pod=3, image=str(REPO / "examples/images/tiny.toml")))
    return run.controller_work(str(path), run.host_names(6), 24, testbed="mfgsim")


def test_up_and_down_of_racks_on_simulated_hosts(work):
    assert work.guests == 120 and len(work.hosts) == 6
    # Each host's manifest holds its own rack only.
    assert sorted(len(json.loads(m)["net"]["vms"]) for m in work.manifests.values()) == [20] * 6
    model = sim_hosts.BootModel.containers_here()
    r = run.simulate(functools.partial(run.sim_up, work, 2, links.LinkModel(), model, fail_fraction=0.1))
    assert r.ready + r.failed_guests == 120 and 0 < r.failed_guests < 40
    assert r.failed_hosts == 0 and not r.errors
    # 20 guests, 8 at a time, ~0.99 s each: about 3 rounds of boots.
    assert 2.0 < r.apply_s < 6.0 and r.up_s >= r.apply_s
    assert r.down_s == pytest.approx(20 * model.down_s_per_guest, rel=0.01)
    # Progress is coalesced: fewer frames reach the controller than hosts sent events.
    assert 0 < r.event_frames < r.events
    assert r.tx_bytes > sum(len(str(m)) for m in work.manifests.values()) * 0.5
    assert r.agents_left == 0


def test_hosts_dying_during_up_fail_their_guests_and_the_rest_come_up(work):
    model = sim_hosts.BootModel.containers_here()
    # Fanout 2 over 6 hosts: hosts 1 and 2 are inner agents; killing a third
    # of the hosts (seeded) takes inner ones too, so re-attachment is exercised.
    r = run.simulate(functools.partial(run.sim_up, work, 2, links.LinkModel(), model,
                                       kill_fraction=0.34, seed=3))
    assert r.killed == 2 and r.failed_hosts == 2
    assert r.ready == r.survivors_guests == 80
    assert r.reattachments >= 1
    assert r.agents_left == 0


def test_simulated_hosts_refuse_what_they_do_not_simulate():
    hosts = sim_hosts.SimHosts(sim_hosts.BootModel.qemu_tcg_here())
    assert hosts.lookup("host.apply") == hosts.sim_apply
    from megafleet.gproc.handlers import UnknownHandler
    with pytest.raises(UnknownHandler, match="no simulation handler named 'host.exec'"):
        hosts.lookup("host.exec")


def test_encoded_manifests_are_decoded_only_on_their_own_host():
    from megafleet.gproc.handlers import own_payload

    req = {"per_host": {"a": '{"vms": [1, 2]}', "b": '{"vms": []}'}, "encoded": True}
    assert own_payload(req, "a") == {"vms": [1, 2]}
    assert own_payload(req, "c") is None
    assert own_payload({"per_host": {"a": '{"x": 1}'}}, "a") == '{"x": 1}'    # not encoded: as given
    assert own_payload({"payload": {"y": 2}}, "a") == {"y": 2}
