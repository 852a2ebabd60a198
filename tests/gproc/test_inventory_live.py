"""A testbed on 64 namespace hosts (each with its own sshd) named by one host
range of the inventory: `megafleet up --hosts` takes the range, places one node
on each host, and `down` leaves nothing on any of them.

Heavy (64 sshd, 64 agents, 64 collectors): run it under the shared lock,
`flock /tmp/megafleet-heavy.lock .venv/bin/python -m pytest tests/gproc/test_inventory_live.py`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.up.conftest import links_in, netns_with

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1800)]

TAG = os.getpid() % 1000
COUNT = 64
REPO = Path(__file__).resolve().parents[2]


def megafleet(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafleet", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def fleet64():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, sshd)")
    from megafleet.gproc.testfleet import TestFleet, leftovers

    prefix = f"mfgr{TAG}"
    work = Path(tempfile.mkdtemp(prefix="mfg-range-"))
    fleet = TestFleet(prefix, COUNT, work / "fleet", subnet=f"10.146.{TAG % 250}.0/24")
    try:
        fleet.up()
        yield fleet
    finally:
        fleet.down()
        shutil.rmtree(work, ignore_errors=True)
    assert leftovers(prefix) == []


def test_64_hosts_of_one_range_come_up_and_go_down(fleet64, tmp_path):
    f = fleet64
    first, last = f.address(0), f.address(COUNT - 1)
    net = first.rsplit(".", 1)[0]
    inv = tmp_path / "range.toml"
    inv.write_text(f"""\
[defaults]
identity = "{f.identity}"
known_hosts = "{f.known_hosts}"
agent = ["{sys.executable}", "-m", "megafleet", "agent"]

# The whole fleet in one line, one node per host.
[[range]]
hosts = "{f.prefix}h[0-{COUNT - 1}]"
address = "{net}.[{first.rsplit('.', 1)[1]}-{last.rsplit('.', 1)[1]}]"
capacity = 1
labels = ["test"]
""")
    ls = megafleet("hosts", "ls", "-i", str(inv), "--json")
    assert ls.returncode == 0, ls.stderr
    hosts = json.loads(ls.stdout)["hosts"]
    assert [h["name"] for h in hosts] == f.names
    assert [h["address"] for h in hosts] == [f.address(i) for i in range(COUNT)]

    testbed = f"mfu{TAG}r"
    desc = tmp_path / "spread.fleet"
    desc.write_text("pool p 10.145.0.0/16\n" + "".join(
        f"switch s{i}\nhost n{i} on s{i}\n" for i in range(1, COUNT + 1)))
    state = str(tmp_path / "h" / "{host}")
    try:
        r = megafleet("up", str(desc), "--hosts", str(inv), "-N", testbed, "--no-ksm",
                      "--telemetry-interval", "60", "--host-state", state, "--json")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        summary = json.loads(r.stdout)
        assert summary["ok"] and summary["namespaces"] == COUNT
        assert sorted(h["host"] for h in summary["hosts"]) == sorted(f.names)
        assert all(h["nodes"] == 1 and h["status"] == "ok" for h in summary["hosts"])
        # The test hosts share one /run/netns: every host sees the 64 namespaces,
        # one per host; each host's own record holds exactly its own.
        assert len(netns_with(testbed + "-", f, f.names[0])) == COUNT
        from megafleet.ledger import Ledger
        own = []
        for host in (f.names[0], f.names[-1]):
            ledger = Ledger(Path(state.replace("{host}", host)) / "state" / "ledger.sqlite")
            (ns,) = [r.data["ns"] for r in ledger.list("net", "netns")]
            own.append(ns)
        assert len(set(own)) == 2 and all(ns.startswith(f"{testbed}-n") for ns in own)
    finally:
        down = megafleet("down", testbed, "--hosts", str(inv), "--host-state", state, "--json")
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    assert json.loads(down.stdout)["ok"]
    for host in f.names:
        assert netns_with(testbed + "-", f, host) == []
        assert links_in(host, testbed) == []
