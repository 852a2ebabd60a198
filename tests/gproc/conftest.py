"""A fleet of namespace hosts, each with its own OpenSSH sshd, shared by the
integration tests of this package (built once per module: ~1 s)."""

from __future__ import annotations

import os
import time

import pytest




@pytest.fixture(scope="module")
def testfleet(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, sshd)")
    from megafleet.gproc.testfleet import TestFleet, leftovers

    # pid-derived prefix and subnet: two runs of these tests never share anything.
    tag = os.getpid() % 1000
    prefix = f"mfgt{tag}"
    fleet = TestFleet(prefix, 20, tmp_path_factory.mktemp("fleet"),
                      subnet=f"10.147.{10 + tag % 200}.0/24", shape_mbit=100)
    try:
        fleet.inventory = fleet.up()
        yield fleet
    finally:
        fleet.down()
    assert leftovers(prefix) == []


def wait_no_agents(fleet, timeout: float = 10.0) -> dict:
    """Agents exit when their parent session closes; give them a moment."""
    deadline = time.monotonic() + timeout
    while (left := fleet.agent_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
