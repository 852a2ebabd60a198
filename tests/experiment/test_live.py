"""Experiments on real testbeds on this host (namespaces, containers, a QEMU
guest, FRR), through the CLI as a user runs it:

- campus-ospf (small): `up` returns with every assertion verified live; a
  pulled cable cuts a staff host off the DMZ, plugging it back restores it
  within the OSPF dead interval plus a margin; delay, loss, restore; jitter
  spreads the round trips, --clear takes it out; settings shown by `link show`
  and `status` and kept by `up` of the same file; capture of 10 pings; a
  container guest stopped (its process gone) and started with its address;
  bad input changes nothing; `down` leaves nothing.
- a square of OSPF routers (three FRR, one BIRD) with a QEMU guest: stopping
  or killing the preferred router stops its daemons and reroutes, starting it
  brings them back with its addresses; the BIRD router's daemon stops and
  starts; the QEMU guest restarts with the same address; a fault schedule's
  two link events are in telemetry at their times and the link followed them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.up.conftest import REPO, TAG, links_in, megafleet, megafleet_json, netns_with

CAMPUS = REPO / "examples" / "campus-ospf.fleet"
T1 = f"mfx{TAG}c"
T2 = f"mfx{TAG}s"
# wirefilter's timer runs a little early: a round trip through a wire of delay
# D each way measures from about 0.99 x 2D.
SLACK = 0.95


def ns_ping(testbed: str, node: str, addr: str, count: int = 1, wait: float = 1, interval: float = 0.2) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", f"{testbed}-{node}", "ping", "-n", "-c", str(count), "-W",
                           str(wait), "-i", str(interval), addr], capture_output=True, text=True)


def rtts(out: str) -> list[float]:
    """Every round trip (ms) of a ping run's replies."""
    return [float(x) for x in re.findall(r"time=([0-9.]+) ms", out)]


def min_rtt(out: str) -> float:
    """The least round trip of a ping run: the link's delay, with none of the
    scheduling noise a loaded host adds to the others."""
    return float(out.split("rtt min/avg/max/mdev = ")[1].split("/")[0])


def wait_for_pcap_header(path: Path, seconds: float = 60) -> None:
    """tcpdump writes the pcap header (24 bytes) as it starts capturing."""
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.stat().st_size >= 24):
        assert time.monotonic() < deadline, f"no pcap header in {path}"
        time.sleep(0.1)


def recorded(owner: str | None = None) -> list[dict]:
    from megafleet.ledger import Ledger
    return [{"owner": r.owner, "kind": r.kind, "key": r.key} for r in Ledger().list(owner)]


def nothing_left(testbed: str) -> None:
    assert netns_with(testbed + "-") == []
    assert links_in(None, testbed) == []
    left = [r for r in recorded() if r["key"].startswith(testbed) and r["owner"] in ("net", "experiment", "up")]
    assert left == []


@pytest.fixture(scope="module")
def campus():
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, containers, FRR)")
    summary = megafleet_json("up", str(CAMPUS), "-N", T1, "-D", "staff=2", "-D", "lab=2", "--no-ksm",
                             check=False, timeout=600)
    try:
        yield summary
    finally:
        megafleet("down", T1, check=False)
        nothing_left(T1)


def test_campus_up_verifies_assertions_live(campus):
    assert campus["ok"], campus
    v = campus["verify"]
    # reachable @staff www1 (4 staff hosts), @lab monitor (4), probe1 lab1_1 (1); IPv4 only.
    assert v["ok"] and v["checks"] == 9 and v["passed"] == 9 and v["failed"] == []
    assert v["converge_s"] is not None and v["converge_s"] < 60
    again = megafleet_json("verify", T1)
    assert again["ok"] and again["checks"] == 9


def test_link_down_cuts_a_staff_host_off_and_up_restores_it_within_the_dead_interval(campus):
    www1 = "10.20.5.2"
    assert ns_ping(T1, "probe1", www1, wait=2).returncode == 0
    megafleet("link", "down", "dist1", "--", "core")
    time.sleep(1)
    assert ns_ping(T1, "probe1", www1, count=3, wait=1).returncode != 0
    failed = megafleet_json("verify", T1, check=False)
    assert not failed["ok"]
    assert {f["loc"] for f in failed["failed"]} >= {f"{CAMPUS}:51"}
    shown = {r["link"]: r for r in megafleet_json("link", "show", T1)}
    assert shown["dist1 -- core"]["state"] == "down" and shown["dist1 -- core"]["changed"]
    megafleet("link", "up", "dist1", "--", "core")
    t0 = time.monotonic()
    # OSPF here: dead interval 4 s (the interface waits that long before its DR
    # election), then FRR's default LSA and SPF throttles (minimum LSA interval
    # 5 s, SPF hold growing after the flap): measured 11-14 s on this host.
    while ns_ping(T1, "probe1", www1, wait=1).returncode != 0:
        assert time.monotonic() - t0 < 4 + 16, "not reachable again within the dead interval (4 s) + 16 s"
        time.sleep(0.2)
    assert megafleet_json("verify", T1, "--within", "10")["ok"]


def test_link_delay_loss_and_restore_on_a_live_link(campus):
    www1 = "10.20.5.2"
    r = ns_ping(T1, "probe1", www1, count=3)
    assert r.returncode == 0 and min_rtt(r.stdout) < 5
    megafleet("link", "set", "dist1", "--", "core", "delay", "50ms")
    r = ns_ping(T1, "probe1", www1, count=3, wait=2)
    assert r.returncode == 0 and min_rtt(r.stdout) >= 100, r.stdout
    megafleet("link", "set", "dist1", "--", "core", "loss", "100%")
    r = ns_ping(T1, "probe1", www1, count=5, wait=1)
    assert " 0 received" in r.stdout, r.stdout
    megafleet("link", "set", "dist1", "--", "core", "delay", "none", "loss", "none")
    # Five seconds of 100% loss outlast OSPF's dead interval (4 s) here: the
    # adjacency may have gone, and comes back within the LSA/SPF throttles.
    deadline = time.monotonic() + 30
    while (r := ns_ping(T1, "probe1", www1, count=3)).returncode != 0:
        assert time.monotonic() < deadline, r.stdout
    assert min_rtt(r.stdout) < 5, r.stdout

    # Recorded, shown by status, and kept by `up` of the same file.
    megafleet("link", "set", "dist1", "--", "core", "delay", "20ms")
    status = megafleet_json("status", T1)
    links = [x for h in status["hosts"].values() for b in h["value"]["testbeds"] for x in b["links"]]
    assert {"link": "dist1 -- core", "state": "up", "settings": {"delay_us": 20000}} in links
    again = megafleet_json("up", str(CAMPUS), "-N", T1, "-D", "staff=2", "-D", "lab=2", "--no-ksm", timeout=600)
    assert again["ok"]
    r = ns_ping(T1, "probe1", www1, count=3, wait=2)
    assert r.returncode == 0 and min_rtt(r.stdout) >= 40, r.stdout
    megafleet("link", "set", "dist1", "--", "core", "delay", "none")


def test_jitter_at_runtime_spreads_the_round_trips_and_clear_restores(campus):
    www1 = "10.20.5.2"
    megafleet("link", "set", "dist1", "--", "core", "delay", "20ms", "jitter", "10ms")
    try:
        shown = {r["link"]: r for r in megafleet_json("link", "show", T1)}
        assert shown["dist1 -- core"]["settings"] == {"delay_us": 20000, "jitter_us": 10000}
        r = ns_ping(T1, "probe1", www1, count=30, wait=2, interval=0.05)
        times = rtts(r.stdout)
        assert len(times) >= 25, r.stdout
        # The wire delays each direction by 20 ms +- 10 ms (uniform), so a round
        # trip lies in 2 x (20 -+ 10) = 20..60 ms around a mean of 40 ms. Thirty
        # of them reach well into both halves (the chance that all of them stay
        # above 35 ms is 0.72^30, 5e-5); a loaded host only adds time, so only
        # the lower bound is a hard limit.
        assert min(times) >= 20 * SLACK, times
        assert min(times) < 35 and max(times) > 45, times
    finally:
        megafleet("link", "set", "dist1", "--", "core", "--clear")
    shown = {r["link"]: r for r in megafleet_json("link", "show", T1)}
    assert shown["dist1 -- core"]["settings"] == {}, shown["dist1 -- core"]
    r = ns_ping(T1, "probe1", www1, count=10, interval=0.05)
    assert r.returncode == 0 and min_rtt(r.stdout) < 5, r.stdout


def test_node_stop_and_start_of_a_container_guest(campus):
    """A stopped container's process is gone and it answers no ping; started
    again it is a new process with the same address."""
    from megafleet.proc import RecordedProcess
    from megafleet.vm.engine import Engine

    addr = _guest_addr(T1, "www2")
    assert _wait_ping(T1, "monitor", addr, 10)
    pid = _guest_pid("www2")
    assert pid is not None
    before = RecordedProcess.of(pid)
    done = megafleet_json("node", "stop", "www2", "-t", T1)
    assert [(d["node"], d["action"]) for d in done] == [("www2", "stop")]
    assert not before.alive()
    assert [v.state for v in Engine().list("www2")] == ["stopped"]
    assert ns_ping(T1, "monitor", addr, count=2).returncode != 0
    done = megafleet_json("node", "start", "www2", "-t", T1, timeout=300)
    assert [(d["node"], d["action"]) for d in done] == [("www2", "start")]
    assert [v.state for v in Engine().list("www2")] == ["running"]
    assert _guest_pid("www2") != pid
    assert _guest_addr(T1, "www2") == addr
    assert _wait_ping(T1, "monitor", addr, 20)


def test_capture_of_ten_pings_reads_twenty_icmp(campus, tmp_path):
    pcap = tmp_path / "p.pcap"
    cap = subprocess.Popen([sys.executable, "-m", "megafleet", "capture", "probe1",
                            "-w", str(pcap), "--count", "20", "--filter", "icmp", "-t", T1], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_pcap_header(pcap)        # tcpdump is listening
        assert ns_ping(T1, "probe1", "10.20.5.2", count=10).returncode == 0
        cap.wait(timeout=30)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    assert cap.returncode == 0, cap.stderr.read()
    out = subprocess.run(["tcpdump", "-r", str(pcap), "-n"], capture_output=True, text=True).stdout
    assert out.count("ICMP echo request") == 10 and out.count("ICMP echo reply") == 10
    # -w - streams to stdout.
    r = subprocess.run([sys.executable, "-m", "megafleet", "capture", "dist1", "--", "core", "-w", "-",
                        "--duration", "3", "-t", T1], cwd=REPO, capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")


def test_bad_input_is_a_clear_error_and_changes_nothing(campus, tmp_path):
    before = megafleet_json("link", "show", T1)
    procs = [r for r in recorded("net") if r["kind"] == "process"]
    for args, why in ((["link", "set", "dist1", "--", "lab1", "delay", "5ms"], "no link dist1 -- lab1"),
                      (["link", "set", "dist1", "--", "core", "delay", "-5ms"], "cannot be negative"),
                      (["link", "down", "ghost", "--", "core"], "unknown node or switch 'ghost'"),
                      (["capture", "ghost", "-w", str(tmp_path / "x.pcap")], "unknown node or switch 'ghost'"),
                      (["node", "stop", "nobody"], "unknown node or switch 'nobody'")):
        r = megafleet(*args, "-t", T1, check=False) if args[0] != "link" else megafleet(*args, check=False)
        assert r.returncode != 0 and why in r.stderr, (args, r.stderr)
    assert megafleet_json("link", "show", T1) == before
    assert [r for r in recorded("net") if r["kind"] == "process"] == procs
    assert not (tmp_path / "x.pcap").exists()


SQUARE = f"""
image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.61.0.0/16
switch lanA
switch lanB
switch top
switch bottom
switch left
switch right
router r1 {{
  iface lanA auto
  iface top auto
  iface left auto
  ospf area 0
}}
router r2 {{
  iface top auto
  iface right auto
  ospf area 0
}}
router r3 {{
  iface left auto
  iface bottom auto
  ospf area 0 cost 50 daemon bird
}}
router r4 {{
  iface right auto
  iface bottom auto
  iface lanB auto
  ospf area 0
}}
host a on lanA
host b on lanB
vm q1 image tiny mem 128M on lanA
reachable a b
at +5s link r2 -- right down
at +15s link r2 -- right up
"""


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, QEMU, FRR)")
    path = tmp_path_factory.mktemp("sq") / "square.fleet"
    path.write_text(SQUARE)
    t0 = time.time()
    summary = megafleet_json("up", str(path), "-N", T2, "--no-ksm", "--boot-timeout", "120", check=False,
                             timeout=900)
    try:
        yield path, summary, t0
    finally:
        megafleet("down", T2, check=False)
        nothing_left(T2)
        time.sleep(1)
        assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_schedule_of(p, T2)]


def _is_schedule_of(pid: str, testbed: str) -> bool:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"run-schedule" in words and testbed.encode() in words


def test_schedule_events_in_telemetry_at_their_times(square):
    path, summary, _ = square
    assert summary["ok"], summary
    sch = summary["schedule"]
    assert sch["steps"] == 2
    start = sch["start"]
    # The link follows the schedule: down between +5 s and +15 s.
    while time.time() < start + 7:
        time.sleep(0.1)
    shown = {r["link"]: r["state"] for r in megafleet_json("link", "show", T2)}
    assert shown["r2 -- right"] == "down"
    while time.time() < start + 17:
        time.sleep(0.1)
    shown = {r["link"]: r["state"] for r in megafleet_json("link", "show", T2)}
    assert shown["r2 -- right"] == "up"
    events = megafleet_json("telemetry", "events", "--kind", "fault", "--since", "10m")
    mine = [e for e in events if e.get("testbed") == T2]
    assert [e["message"] for e in mine] == ["link r2 -- right down", "link r2 -- right up"]
    for e, at in zip(mine, (5.0, 15.0)):
        when = datetime.fromisoformat(e["time"]).replace(tzinfo=timezone.utc).timestamp()
        assert abs(when - (start + at)) <= 1.0, (e, start)


def test_killing_the_preferred_router_reroutes(square):
    b_addr = _addr(T2, "b")
    assert _wait_ping(T2, "a", b_addr, 30)
    deadline = time.monotonic() + 30        # the schedule's link events may still echo in OSPF
    while _path(T2, "a", b_addr) != "r2" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _path(T2, "a", b_addr) == "r2"
    megafleet("node", "kill", "r2", "-t", T2)
    t0 = time.monotonic()
    assert _wait_ping(T2, "a", b_addr, 30), "no route around the killed router"
    assert _path(T2, "a", b_addr) == "r3"
    assert time.monotonic() - t0 < 30
    megafleet("node", "start", "r2", "-t", T2)
    assert _wait_ping(T2, "a", b_addr, 30)


def test_stopping_a_router_stops_its_daemons_and_routing_goes_around_it(square):
    b_addr = _addr(T2, "b")
    assert _wait_path(T2, "a", b_addr, "r2", 30)

    # The BIRD router (one process) off the preferred path: stopped, traffic
    # keeps going through r2; started again, a new process.
    bird = _daemons(T2, "r3")
    assert set(bird) == {"bird"} and bird["bird"].alive()
    r3_addrs = _addrs(T2, "r3")
    megafleet("node", "stop", "r3", "-t", T2)
    assert not bird["bird"].alive()
    assert _wait_ping(T2, "a", b_addr, 10)
    megafleet("node", "start", "r3", "-t", T2)
    again = _daemons(T2, "r3")
    assert set(again) == {"bird"} and again["bird"].alive() and again["bird"].pid != bird["bird"].pid
    assert _addrs(T2, "r3") == r3_addrs

    # The FRR router on the preferred path: its daemons stop, and routing goes
    # around it, through the BIRD router started again just now.
    daemons = _daemons(T2, "r2")
    assert set(daemons) == {"zebra", "ospfd"} and all(p.alive() for p in daemons.values())
    r2_addrs = _addrs(T2, "r2")
    megafleet("node", "stop", "r2", "-t", T2)
    assert not any(p.alive() for p in daemons.values())
    assert _wait_ping(T2, "a", b_addr, 30), "no route around the stopped router"
    assert _path(T2, "a", b_addr) == "r3"
    megafleet("node", "start", "r2", "-t", T2)
    again = _daemons(T2, "r2")
    assert set(again) == {"zebra", "ospfd"} and all(p.alive() for p in again.values())
    assert not {p.pid for p in again.values()} & {p.pid for p in daemons.values()}
    assert _addrs(T2, "r2") == r2_addrs
    assert _wait_path(T2, "a", b_addr, "r2", 30), "r2 started again but carries no traffic"
    assert _wait_ping(T2, "a", b_addr, 10)


def test_qemu_guest_restart_comes_back_with_the_same_address(square):
    before = json.loads(megafleet("exec", "q1", "-t", T2, "--json", "--", "ip", "-o", "-4", "addr", "show",
                                  "eth0").stdout)
    addr = before["nodes"][0]["stdout"].split("inet ")[1].split()[0]
    pid_before = _guest_pid("q1")
    done = megafleet_json("node", "restart", "q1", "-t", T2, timeout=300)
    assert [d["node"] for d in done] == ["q1"]
    assert _guest_pid("q1") != pid_before
    after = json.loads(megafleet("exec", "q1", "-t", T2, "--json", "--", "ip", "-o", "-4", "addr", "show",
                                 "eth0").stdout)
    assert after["nodes"][0]["stdout"].split("inet ")[1].split()[0] == addr
    assert _wait_ping(T2, "a", addr.split("/")[0], 30)


def _guest_pid(name: str) -> int | None:
    from megafleet.vm.engine import Engine
    return next(v.pid for v in Engine().list(name))


def _guest_addr(testbed: str, node: str) -> str:
    """A guest's IPv4 address on eth0, as the guest itself has it."""
    r = json.loads(megafleet("exec", node, "-t", testbed, "--json", "--", "ip", "-o", "-4", "addr", "show",
                             "eth0").stdout)
    return r["nodes"][0]["stdout"].split("inet ")[1].split("/")[0]


def _daemons(testbed: str, router: str) -> dict:
    """A namespace router's routing daemons as recorded: daemon -> RecordedProcess."""
    from megafleet.ledger import Ledger
    from megafleet.proc import RecordedProcess
    prefix = f"{testbed}/frr/{router}/"
    return {r.key[len(prefix):]: RecordedProcess(r.data["pid"], r.data["start"])
            for r in Ledger().list("net", "process") if r.key.startswith(prefix) and "pid" in r.data}


def _addrs(testbed: str, node: str) -> list[str]:
    """Every global address of a namespace node (both families), sorted."""
    out = subprocess.run(["ip", "-n", f"{testbed}-{node}", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True).stdout
    return sorted(line.split()[3] for line in out.splitlines())


def _wait_path(testbed: str, node: str, addr: str, router: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _path(testbed, node, addr) != router:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def _addr(testbed: str, node: str) -> str:
    out = subprocess.run(["ip", "-n", f"{testbed}-{node}", "-o", "-4", "addr", "show", "eth0"],
                         capture_output=True, text=True).stdout
    return out.split("inet ")[1].split("/")[0]


def _wait_ping(testbed: str, node: str, addr: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ns_ping(testbed, node, addr).returncode == 0:
            return True
        time.sleep(0.3)
    return False


def _path(testbed: str, node: str, addr: str) -> str:
    """The router r1 forwards to for `addr` (its next hop, by name)."""
    out = subprocess.run(["ip", "-n", f"{testbed}-r1", "-4", "route", "get", addr], capture_output=True,
                         text=True).stdout.split()
    via = out[out.index("via") + 1] if "via" in out else ""
    for router in ("r2", "r3", "r4"):
        mine = subprocess.run(["ip", "-n", f"{testbed}-{router}", "-o", "-4", "addr"], capture_output=True,
                              text=True).stdout
        if f"inet {via}/" in mine:
            return router
    return ""


def test_json_of_link_show_is_a_list(campus):
    rows = megafleet_json("link", "show", T1)
    assert isinstance(rows, list) and all({"link", "kind", "host", "state", "settings"} <= set(r) for r in rows)
    json.dumps(rows)
