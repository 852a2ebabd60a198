"""A testbed on two namespace hosts (each with its own sshd, reached through gproc):
one switch segment spans both hosts (VXLAN), nodes on different hosts ping each
other through a router, and `down` leaves nothing on either host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megafleet.netlang import compile_file

from .conftest import REPO, TAG, links_in, megafleet, megafleet_json, netns_with

TESTBED = f"mfu{TAG}"

# The inventory gives each test host room for 10 nodes: lanA (r1, 10 namespace
# hosts, 2 container guests) cannot fit on one host and is split over both
# (VXLAN); lanB may span too, depending on where r1 lands. Pings from lanB
# (a container guest, a namespace host) to lanA nodes on the other host cross
# the router and the tunnel; a lanA container pings across the tunnel directly.
FLEET = f"""\
image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.149.0.0/16
switch lanA
switch lanB
router r1 {{
  iface lanA auto
  iface lanB auto
}}
host a[1..10] on lanA
host b[1..4] on lanB
vm g[1..2] image tiny driver container mem 64M on lanA
vm k[1..2] image tiny driver container mem 64M on lanB
"""


def daemons_in(fleet, host: str) -> list[str]:
    """Collectors or ksm daemons still running inside a test host."""
    found = []
    for pid in fleet.pids_in(fleet.names.index(host)):
        try:
            words = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"telemetry" in words or b"ksm" in words:
            found.append(b" ".join(words).decode(errors="replace"))
    return found


def wait_for_guests(path, count: int, timeout: float = 30.0) -> list[tuple[str, str]]:
    """(host, guest) of the guests the telemetry store has samples of, once it
    has `count` of them (or the timeout passed)."""
    from megafleet.collect.queries import latest_guests
    from megafleet.collect.stores import open_store

    deadline = time.monotonic() + timeout
    while True:
        store = open_store(f"sqlite:{path}")
        try:
            seen = [(d["meta"]["host"], d["meta"]["guest"]) for d in latest_guests(store, None)]
        except Exception:
            seen = []            # the collectors may not have created the store yet
        finally:
            getattr(store, "close", lambda: None)()
        if len(seen) >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def wait_for_icmp_sniffed(path, want: set[tuple[str, str]], timeout: float = 30.0) -> set[tuple[str, str]]:
    """(host, switch) pairs whose bridge sniff reported ICMP, once `want` are
    among them (or the timeout passed)."""
    from megafleet.collect.queries import sniff
    from megafleet.collect.stores import open_store

    deadline = time.monotonic() + timeout
    while True:
        store = open_store(f"sqlite:{path}")
        try:
            seen = {(r["host"], r["switch"]) for r in sniff(store, None)
                    if r["protocol"] == "ipv4_icmp" and r["packets"] > 0}
        finally:
            getattr(store, "close", lambda: None)()
        if want <= seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def address(net, node: str) -> str:
    return next(iter(net.node(node).ifaces[0][2].values())).split("/")[0]


def test_two_hosts_vxlan_router_ping_and_clean_down(fleet2, tmp_path):
    fleet_file = tmp_path / "two.fleet"
    fleet_file.write_text(FLEET)
    inv = str(fleet2.inventory_path)
    hs = ["--host-state", fleet2.host_state]
    net = compile_file(fleet_file)

    plan = megafleet_json("plan", str(fleet_file), "--hosts", inv, "-N", TESTBED)
    spanning = {s["segment"]: s for s in plan["spanning"]}
    assert "lanA" in spanning and spanning["lanA"]["hosts"] == sorted(fleet2.names)
    assert len({s["vni"] for s in spanning.values()}) == len(spanning)   # one VNI per segment
    homes = plan["node_host"]
    a_nodes = [f"a{i}" for i in range(1, 11)]
    pairs = [(src, next(a for a in a_nodes if homes[a] != homes[src])) for src in ("k1", "b1", "g1")]

    telemetry = tmp_path / "telemetry.sqlite"
    try:
        summary = megafleet_json("up", str(fleet_file), "--hosts", inv, "-N", TESTBED, "--no-ksm",
                                 "--telemetry", f"sqlite:{telemetry}", "--telemetry-interval", "1", *hs)
        assert summary["ok"], summary
        assert summary["namespaces"] == 15
        assert summary["guests"] == 4 and summary["ready"] == 4
        assert sorted(h["host"] for h in summary["hosts"]) == sorted(fleet2.names)
        for phase in ("compile", "place", "connect", "probe", "push", "apply", "host_net"):
            assert phase in summary["phases"]
        # Each test host has its own, empty image cache: the image was pushed.
        for host in fleet2.names:
            cache = Path(fleet2.host_state.replace("{host}", host)) / "cache"
            (image,) = (cache / "images").iterdir()
            assert (image / "initramfs.img").stat().st_size > 0
            assert (cache / "names" / "tiny").read_text().strip() == image.name

        # A VXLAN device per spanning segment on each host, MTU lowered for the
        # 50 bytes of encapsulation, and the nodes' interfaces agree.
        for host in fleet2.names:
            out = subprocess.run(["ip", "-n", host, "-d", "-o", "link", "show", "type", "vxlan"],
                                 capture_output=True, text=True, check=True).stdout
            assert out.count("vxlan id") == sum(host in s["hosts"] for s in spanning.values()), out
            assert "mtu 1450" in out
        eth = megafleet("exec", "g1", "--", "ip", "-o", "link", "show", "eth0").stdout
        assert "mtu 1450" in eth
        assert netns_with(TESTBED + "-", fleet2, homes["a1"]) != []

        for src, dst in pairs:
            r = megafleet("exec", src, "--", "ping", "-c", "2", "-W", "3", address(net, dst), check=False)
            assert r.returncode == 0 and " 0% packet loss" in r.stdout, (src, dst, r.stdout + r.stderr)
            if src.startswith("k") or src.startswith("g"):
                continue            # busybox ping in the guests has no -M
            # A full-size packet for the lowered MTU, don't fragment: right end to end.
            r = megafleet("exec", src, "--", "ping", "-c", "1", "-W", "3", "-M", "do", "-s", "1422",
                          address(net, dst), check=False)
            assert r.returncode == 0, (src, dst, r.stdout + r.stderr)

        # The pings crossed lanA on both hosts: each host's collector sniffed
        # its lanA bridge and stored the ICMP under the switch's own name.
        want = {(host, "lanA") for host in fleet2.names}
        assert want <= wait_for_icmp_sniffed(telemetry, want)

        status = megafleet_json("status")
        for host in fleet2.names:
            beds = status["hosts"][host]["value"]["testbeds"]
            assert [b["testbed"] for b in beds] == [TESTBED]
            assert beds[0]["failures"] == []
            assert beds[0]["telemetry"]["collector"] == "running"
        nodes = {}
        for h in status["hosts"].values():
            for b in h["value"]["testbeds"]:
                for state, n in b["nodes"].items():
                    nodes[state] = nodes.get(state, 0) + n
        assert nodes == {"up": 15, "running": 4}

        # Telemetry: every guest is in the store, sampled by its own host.
        assert sorted(wait_for_guests(telemetry, 4)) == sorted(
            (homes[g], g) for g in ("g1", "g2", "k1", "k2"))
        status = megafleet_json("status")
        for host in fleet2.names:
            tel = status["hosts"][host]["value"]["testbeds"][0]["telemetry"]
            on_host = sum(homes[g] == host for g in ("g1", "g2", "k1", "k2"))
            assert (tel["guests_seen"], tel["guests"]) == (on_host, on_host)

        # Applying the same testbed again changes nothing.
        again = megafleet_json("up", str(fleet_file), "--hosts", inv, "-N", TESTBED, "--no-ksm",
                               "--telemetry", f"sqlite:{telemetry}", *hs)
        assert again["ok"]
    finally:
        result = megafleet_json("down", check=False)
    assert result["ok"], result
    assert netns_with(TESTBED + "-") == []
    for host in fleet2.names:
        assert netns_with(TESTBED + "-", fleet2, host) == []
        assert links_in(host, TESTBED) == []
        assert daemons_in(fleet2, host) == []
    again = megafleet_json("down", "--hosts", inv, *hs)
    assert again["ok"]
    assert all(not r["value"]["testbeds"] for r in again["results"]["*"].values())


def test_host_agent_killed_during_up_then_down_cleans_both_hosts(fleet2, tmp_path):
    """The agent of one host dies while its guests boot: that host's nodes are
    reported failed, the other host's are up; `down` then cleans both (the dead
    agent's host from its own ledger)."""
    import signal

    from megafleet.gproc import inventory

    inv = inventory.load(fleet2.inventory_path)
    roomy = tmp_path / "hosts.toml"
    roomy.write_text(inventory.render([h.__class__(**{**h.__dict__, "capacity": 160}) for h in inv.hosts],
                                      identity=inv.identity, known_hosts=inv.known_hosts))
    name = f"mfa{TAG}"
    fleet_file = tmp_path / "big.fleet"
    fleet_file.write_text(f"""
image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.151.0.0/16
switch lanA
switch lanB
router r1 {{
  iface lanA auto
  iface lanB auto
}}
vm {name}x[1..150] image tiny driver container mem 64M on lanA
vm {name}y[1..150] image tiny driver container mem 64M on lanB
""")
    plan = megafleet_json("plan", str(fleet_file), "--hosts", str(roomy), "-N", name)
    victim = plan["node_host"][f"{name}y1"]
    survivor = plan["node_host"][f"{name}x1"]
    assert victim != survivor
    hs = ["--host-state", fleet2.host_state]
    child = subprocess.Popen(
        [sys.executable, "-m", "megafleet", "up", str(fleet_file), "--hosts", str(roomy), "-N", name,
         "--no-ksm", "--json", *hs],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(tmp_path / "up.err", "w"), text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed = None
    try:
        # Mid-boot: as soon as the victim host runs some of its 150 guests
        # (they boot in a few seconds, faster than progress lines come).
        deadline = time.monotonic() + 240
        while child.poll() is None and time.monotonic() < deadline:
            if container_guests(f"{name}y"):
                killed = fleet2.agent_pid(fleet2.names.index(victim))
                if killed is not None:
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.05)
        out, _ = child.communicate(timeout=300)
        assert killed is not None, "never saw the victim's guests boot"
        assert child.returncode == 1
        summary = json.loads(out)
        by_host = {h["host"]: h for h in summary["hosts"]}
        assert by_host[victim]["status"] == "failed"
        assert by_host[survivor]["status"] == "ok" and by_host[survivor]["failed"] == 0
        assert {f["host"] for f in summary["failed"]} == {victim}
    finally:
        if child.poll() is None:
            child.kill()
        result = megafleet_json("down", name, check=False)
    assert result["ok"], result
    for host in fleet2.names:
        assert netns_with(name + "-", fleet2, host) == []
        assert links_in(host, name) == []
        assert daemons_in(fleet2, host) == []
    # No container guest outlived the dead agent.
    assert container_guests(name) == []


def test_host_agent_killed_during_verify_is_a_failed_up_not_a_traceback(fleet2, tmp_path):
    """An agent that dies after its host applied, while `up` verifies the
    assertions (one never holds live: its node's link is down, so verify keeps
    trying): `up` ends with its
    summary, verify failed naming the host, exit 1, no traceback; down cleans."""
    import signal

    name = f"mfv{TAG}"
    fleet_file = tmp_path / "verify.fleet"
    fleet_file.write_text(FLEET.replace("pool p 10.149.0.0/16", "pool p 10.147.0.0/16")
                          + 'host c1 on lanB exec "ip link set eth0 down"\nreachable c1 a1\n')
    # The host that pings from c1: the one whose agent verify needs.
    plan = megafleet_json("plan", str(fleet_file), "--hosts", str(fleet2.inventory_path), "-N", name)
    victim = plan["node_host"]["c1"]
    hs = ["--host-state", fleet2.host_state]
    child = subprocess.Popen(
        [sys.executable, "-m", "megafleet", "up", str(fleet_file), "--hosts", str(fleet2.inventory_path),
         "-N", name, "--no-ksm", "--json", *hs],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed = None
    err_lines = []
    try:
        for line in child.stderr:
            err_lines.append(line)
            if line.startswith("verify ") or " verify " in line:
                break
        # The controller starts a new agent for its next call: kill each one for
        # 15 s, so that some call of verify's dies in flight.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and child.poll() is None:
            pid = fleet2.agent_pid(fleet2.names.index(victim))
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = pid
            time.sleep(0.05)
        out, err = child.communicate(timeout=300)
        err = "".join(err_lines) + err
        assert killed is not None, err
        assert child.returncode == 1, err
        assert "Traceback" not in err, err
        summary = json.loads(out)
        assert summary["ok"] is False
        assert summary["verify"]["ok"] is False
        if "error" in summary["verify"]:       # a call died in flight (else its checks failed)
            assert victim in summary["verify"]["error"], summary["verify"]
    finally:
        if child.poll() is None:
            child.kill()
        result = megafleet_json("down", name, check=False)
    assert result["ok"], result
    for host in fleet2.names:
        assert netns_with(name + "-", fleet2, host) == []
        assert links_in(host, name) == []
        assert daemons_in(fleet2, host) == []


def container_guests(prefix: str) -> list[str]:
    """Names of running container guests whose name starts with prefix (read from
    the guest's own /etc/megafleet/cmdline through /proc/PID/root)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if b"MEGAFLEET_CONTAINER=1" not in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                continue
            words = open(f"/proc/{pid}/root/etc/megafleet/cmdline").read().split()
        except OSError:
            continue
        found += [w.split("=", 1)[1] for w in words
                  if w.startswith("megafleet.name=") and w.split("=", 1)[1].startswith(prefix)]
    return found


def test_dead_host_fails_its_nodes_the_rest_comes_up_and_down_cleans_the_rest(fleet2, tmp_path):
    """Runs last in this module: it stops host 1's sshd, then starts it again."""
    fleet_file = tmp_path / "two.fleet"
    fleet_file.write_text(FLEET)
    inv = str(fleet2.inventory_path)
    hs = ["--host-state", fleet2.host_state]
    alive, dead = fleet2.names
    fleet2.stop_sshd(1)
    try:
        r = megafleet("up", str(fleet_file), "--hosts", inv, "-N", TESTBED, "--no-ksm", *hs, "--json",
                      check=False)
        assert r.returncode == 1
        summary = json.loads(r.stdout)
        by_host = {h["host"]: h for h in summary["hosts"]}
        assert by_host[dead]["status"] == "failed" and "unreachable" in by_host[dead]["error"]
        assert by_host[alive]["status"] == "ok" and by_host[alive]["failed"] == 0
        dead_nodes = {f["node"] for f in summary["failed"]}
        assert dead_nodes and all(f["host"] == dead for f in summary["failed"])
        assert netns_with(TESTBED + "-", fleet2, alive) != []
        status = megafleet_json("status", check=False)
        assert status["hosts"][dead]["status"] == "unreachable"
        assert status["hosts"][alive]["value"]["testbeds"][0]["failures"] == []
    finally:
        result = megafleet_json("down", check=False)
    # The reachable host is clean; the dead one is reported, and the controller
    # keeps the testbed so that a later `down` can finish the job.
    assert result["results"][TESTBED][alive]["status"] == "ok"
    assert result["results"][TESTBED][dead]["status"] == "unreachable"
    assert not result["ok"]
    assert netns_with(TESTBED + "-", fleet2, alive) == []
    assert links_in(alive, TESTBED) == []
    assert daemons_in(fleet2, alive) == []
    # The host is back: `down` again finishes the job, and the controller
    # forgets the testbed (its record and its lock file).
    fleet2.start_sshd(1)
    fleet2._wait_port(fleet2.address(1), 22)
    again = megafleet_json("down", check=False)
    assert again["ok"] and again["results"][TESTBED][dead]["status"] == "ok", again
    assert netns_with(TESTBED + "-", fleet2, dead) == []
    assert links_in(dead, TESTBED) == []
    from megafleet import locks, sweep
    assert not locks.lock_path(TESTBED).exists()
    assert [f for f in sweep.leftovers() if f.owner in ("lock", "up-controller")] == []
