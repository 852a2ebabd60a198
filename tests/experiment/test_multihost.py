"""Experiments across hosts: a testbed on two namespace hosts (each with its own
sshd, reached through gproc). `up` verifies the assertions from inside nodes on
both hosts; a link on the far host is delayed and pulled; a capture on the far
host streams its pcap back through gproc; a container guest there restarts with
the same address; `down` leaves nothing on either host."""

from __future__ import annotations

import json
import subprocess
import sys

from megafleet.netlang import compile_file

from tests.experiment.test_live import wait_for_pcap_header
from tests.up.conftest import REPO, TAG, fleet2, links_in, megafleet, megafleet_json, netns_with  # noqa: F401

T = f"mfx{TAG}m"

# lanA (r1, 12 namespace hosts, a container) cannot fit on one test host (room
# for 10 nodes each): it spans both, joined by VXLAN.
FLEET = f"""\
image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.151.0.0/16
switch lanA
switch lanB
router r1 {{
  iface lanA auto
  iface lanB auto
}}
host a[1..12] on lanA
host b1 on lanB
vm g1 image tiny driver container mem 64M on lanA
reachable a[1..12] b1
reachable b1 g1
"""


def addr(net, node: str) -> str:
    return next(iter(net.node(node).ifaces[0][2].values())).split("/")[0]


def rtt(out: str) -> float:
    return float(out.split("min/avg/max")[1].split("=")[1].split("/")[1])


def test_link_capture_node_and_verify_through_gproc(fleet2, tmp_path):
    path = tmp_path / "mh.fleet"
    path.write_text(FLEET)
    inv = str(fleet2.inventory_path)
    hs = ["--host-state", fleet2.host_state]
    net = compile_file(path)
    homes = megafleet_json("plan", str(path), "--hosts", inv, "-N", T)["node_host"]
    # A node on the host that is not r1's: its link and its traffic live there.
    far = next(n for n in (f"a{i}" for i in range(1, 13)) if homes[n] != homes["r1"])
    b1 = addr(net, "b1")
    try:
        summary = megafleet_json("up", str(path), "--hosts", inv, "-N", T, "--no-ksm", *hs, timeout=600)
        assert summary["ok"], summary
        assert summary["verify"]["ok"] and summary["verify"]["checks"] == 13

        def ping(count: int = 3) -> subprocess.CompletedProcess:
            return megafleet("exec", far, "-t", T, "--", "ping", "-c", str(count), "-i", "0.2", "-W", "2", b1,
                             check=False)

        r = ping()
        assert r.returncode == 0 and rtt(r.stdout) < 5, r.stdout
        done = megafleet_json("link", "set", far, "--", "lanA", "delay", "50ms")
        assert [(d["link"], d["host"]) for d in done] == [(f"{far} -- lanA", homes[far])]
        r = ping()
        assert r.returncode == 0 and rtt(r.stdout) >= 100, r.stdout
        megafleet("link", "set", far, "--", "lanA", "delay", "none")
        megafleet("link", "down", far, "--", "lanA")
        assert ping(2).returncode != 0
        megafleet("link", "up", far, "--", "lanA")
        assert ping().returncode == 0

        # Capture on the far host, streamed back through gproc.
        pcap = tmp_path / "far.pcap"
        cap = subprocess.Popen([sys.executable, "-m", "megafleet", "capture", far, "-w", str(pcap), "--count", "20",
                                "--filter", "icmp", "-t", T], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        try:
            wait_for_pcap_header(pcap)
            assert megafleet("exec", far, "-t", T, "--", "ping", "-c", "10", "-i", "0.2", b1).returncode == 0
            cap.wait(timeout=60)
        finally:
            if cap.poll() is None:
                cap.kill()
                cap.wait()
        assert cap.returncode == 0, cap.stderr.read()
        out = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True).stdout
        assert out.count("ICMP echo request") == 10 and out.count("ICMP echo reply") == 10

        # A container guest restarts with its address, on whichever host it is.
        g1 = addr(net, "g1")
        done = megafleet_json("node", "restart", "g1", "-t", T, timeout=300)
        assert [(d["node"], d["host"]) for d in done] == [("g1", homes["g1"])]
        out = json.loads(megafleet("exec", "g1", "-t", T, "--json", "--", "ip", "-o", "-4", "addr").stdout)
        assert f"inet {g1}/" in out["nodes"][0]["stdout"]
        assert megafleet_json("verify", T, "--within", "20")["ok"]
    finally:
        result = megafleet_json("down", T, check=False)
    assert result["ok"], result
    for host in fleet2.names:
        assert netns_with(T + "-", fleet2, host) == []
        assert links_in(host, T) == []
