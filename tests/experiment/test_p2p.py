"""Runtime impairments on a point-to-point link (a veth pair between two
namespaces, no switch, no host-side end), through the CLI on a real testbed:
delay measured by ping between the two namespaces, loss, rate, the wire taken
out again by `link set --clear`, capture through it, and nothing left after
`down`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from megafleet.experiment import hostside
from tests.experiment.test_live import min_rtt, nothing_left, ns_ping, recorded, wait_for_pcap_header
from tests.up.conftest import REPO, TAG, megafleet, megafleet_json

# wirefilter's timer runs a little early: a round trip through a wire of delay
# D each way measures from about 0.99 x 2D.
SLACK = 0.95

T = f"mfx{TAG}p"
FLEET = """
pool p 10.62.0.0/16
router r1
router r2
link r1 -- r2
reachable r1 r2
"""


def _wire_processes() -> list[str]:
    return [r["key"] for r in recorded("net") if r["kind"] == "process" and r["key"].startswith(f"{T}/xwire/")]


def _qdiscs(node: str) -> str:
    return subprocess.run(["tc", "-n", f"{T}-{node}", "qdisc", "show"], capture_output=True, text=True).stdout


def _peer_addr(node: str, peer: str) -> str:
    """The address of `peer` on its link to `node` (the only non-lo interface)."""
    out = subprocess.run(["ip", "-n", f"{T}-{peer}", "-o", "-4", "addr", "show"], capture_output=True,
                         text=True).stdout
    return next(line.split("inet ")[1].split("/")[0] for line in out.splitlines() if " lo " not in line)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, tc, vde)")
    path = tmp_path_factory.mktemp("p2p") / "p2p.fleet"
    path.write_text(FLEET)
    summary = megafleet_json("up", str(path), "-N", T, "--no-ksm", check=False, timeout=300)
    try:
        yield {**summary, "source": str(path)}
    finally:
        megafleet("down", T, check=False)
        nothing_left(T)
        assert _wire_processes() == []


def test_delay_on_a_point_to_point_link_is_measured_by_ping_between_its_namespaces(testbed, tmp_path):
    assert testbed["ok"], testbed
    r2 = _peer_addr("r1", "r2")
    r1 = _peer_addr("r2", "r1")
    r = ns_ping(T, "r1", r2, count=3)
    assert r.returncode == 0 and min_rtt(r.stdout) < 5, r.stdout

    megafleet("link", "set", "r1", "--", "r2", "delay", "50ms")
    # Both directions cross the wire: a round trip is twice the delay.
    for src, dst in (("r1", r2), ("r2", r1)):
        r = ns_ping(T, src, dst, count=3, wait=2)
        assert r.returncode == 0 and min_rtt(r.stdout) >= 100 * SLACK, r.stdout
    # Recorded (three processes, owner "net": down stops them) and shown.
    assert len(_wire_processes()) == 3
    shown = {x["link"]: x for x in megafleet_json("link", "show", T)}
    assert shown["r1 -- r2"]["settings"] == {"delay_us": 50000} and shown["r1 -- r2"]["changed"]
    assert "clsact" in _qdiscs("r1") and "clsact" in _qdiscs("r2")

    # A later change goes through the wire's management socket: same processes.
    before = _wire_processes()
    megafleet("link", "set", "r1", "--", "r2", "delay", "5ms", "loss", "100%")
    r = ns_ping(T, "r1", r2, count=5, wait=1)
    assert " 0 received" in r.stdout, r.stdout
    megafleet("link", "set", "r1", "--", "r2", "loss", "none", "delay", "20ms")
    r = ns_ping(T, "r1", r2, count=3, wait=2)
    assert r.returncode == 0 and 40 * SLACK <= min_rtt(r.stdout) < 100, r.stdout
    assert _wire_processes() == before

    # A capture of the link sees both directions (on the wire's tap: what the
    # node sends is redirected before its own interface's capture point).
    pcap = tmp_path / "p.pcap"
    cap = subprocess.Popen([sys.executable, "-m", "megafleet", "capture", "r1", "--", "r2", "-w", str(pcap),
                            "--count", "6", "--filter", "icmp", "-t", T], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_pcap_header(pcap)
        assert ns_ping(T, "r1", r2, count=3, wait=2).returncode == 0
        cap.wait(timeout=30)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    out = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True).stdout
    assert out.count("ICMP echo request") == 3 and out.count("ICMP echo reply") == 3, out

    # A pulled cable keeps its settings: plugged back, the delay is still there.
    megafleet("link", "down", "r1", "--", "r2")
    assert ns_ping(T, "r1", r2, count=2, wait=1).returncode != 0
    megafleet("link", "up", "r1", "--", "r2")
    deadline = time.monotonic() + 10
    while (r := ns_ping(T, "r1", r2, count=2, wait=2)).returncode != 0:
        assert time.monotonic() < deadline, r.stdout
    assert min_rtt(r.stdout) >= 40 * SLACK, r.stdout
    # `up` of the same file keeps it.
    assert megafleet_json("up", testbed["source"], "-N", T, "--no-ksm", timeout=300)["ok"]
    r = ns_ping(T, "r1", r2, count=3, wait=2)
    assert r.returncode == 0 and min_rtt(r.stdout) >= 40 * SLACK, r.stdout

    # --clear: no impairment left, the wire is out (processes, redirects, taps).
    megafleet("link", "set", "r1", "--", "r2", "--clear")
    r = ns_ping(T, "r1", r2, count=3)
    assert r.returncode == 0 and min_rtt(r.stdout) < 5, r.stdout
    assert _wire_processes() == []
    assert "clsact" not in _qdiscs("r1") and "clsact" not in _qdiscs("r2")
    for node in ("r1", "r2"):
        out = subprocess.run(["ip", "-n", f"{T}-{node}", "-o", "link"], capture_output=True, text=True).stdout
        names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
        assert not [n for n in names if n.startswith(hostside.p2p_tap("eth1")[:2])], names
    shown = {x["link"]: x for x in megafleet_json("link", "show", T)}
    assert shown["r1 -- r2"]["settings"] == {}

    # Rate alone is tc tbf on both ends (no wire); delay again before `down`,
    # which must remove the wire with the testbed (the fixture checks).
    megafleet("link", "set", "r1", "--", "r2", "rate", "10mbit")
    assert "tbf" in _qdiscs("r1") and "tbf" in _qdiscs("r2") and _wire_processes() == []
    megafleet("link", "set", "r1", "--", "r2", "delay", "10ms")
    assert "tbf" not in _qdiscs("r1") and len(_wire_processes()) == 3
    r = ns_ping(T, "r1", r2, count=3, wait=2)
    assert r.returncode == 0 and min_rtt(r.stdout) >= 20 * SLACK, r.stdout


TV = f"mfx{TAG}v"
VDE = """
pool p 10.63.0.0/16
switch v vde
router r3 {
  iface v auto
}
host h on v
reachable h r3
"""


def test_delay_on_a_namespaces_port_on_a_vde_switch(tmp_path):
    """A namespace's port on a VDE switch (its interface is a vde_plug2tap
    tap): `link set` puts a wire between plug and switch, the node keeps its
    address; --clear plugs it back; down leaves nothing."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, vde)")
    path = tmp_path / "vde.fleet"
    path.write_text(VDE)
    wires = lambda: [r["key"] for r in recorded("net")  # noqa: E731
                     if r["kind"] == "process" and r["key"].startswith(f"{TV}/xwire/")]
    try:
        assert megafleet_json("up", str(path), "-N", TV, "--no-ksm", timeout=300)["ok"]
        out = subprocess.run(["ip", "-n", f"{TV}-r3", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        r3 = next(line.split("inet ")[1].split("/")[0] for line in out.splitlines() if " lo " not in line)
        r = ns_ping(TV, "h", r3, count=3)
        assert r.returncode == 0 and min_rtt(r.stdout) < 5, r.stdout
        megafleet("link", "set", "h", "--", "v", "delay", "50ms", "-t", TV)
        assert len(wires()) == 2
        deadline = time.monotonic() + 10
        while (r := ns_ping(TV, "h", r3, count=3, wait=2)).returncode != 0:
            assert time.monotonic() < deadline, r.stdout
        assert min_rtt(r.stdout) >= 100 * SLACK, r.stdout
        assert megafleet_json("verify", TV)["ok"]
        megafleet("link", "set", "h", "--", "v", "--clear", "-t", TV)
        assert wires() == []
        deadline = time.monotonic() + 10
        while (r := ns_ping(TV, "h", r3, count=3)).returncode != 0:
            assert time.monotonic() < deadline, r.stdout
        assert min_rtt(r.stdout) < 5, r.stdout
        megafleet("link", "set", "h", "--", "v", "loss", "100%", "-t", TV)
        assert " 0 received" in ns_ping(TV, "h", r3, count=3, wait=1).stdout
    finally:
        megafleet("down", TV, check=False)
    nothing_left(TV)
    assert wires() == []
