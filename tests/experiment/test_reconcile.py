"""Changing a running testbed by editing its file: `diff` lists exactly what
differs (with file:line), `up` applies only that, and the guests that stay keep
their pids (and the namespaces that stay, their inodes)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.experiment.test_live import nothing_left
from tests.up.conftest import REPO, TAG, megafleet, megafleet_json

T = f"mfx{TAG}r"

BASE = f"""image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.72.0.0/16
switch lanA
switch lanB
router r1 {{
  iface lanA auto
  iface lanB auto
}}
host h1 on lanA
host h2 on lanA
link h2 -- lanB
vm g[1..3] image tiny driver container mem 64M on lanA
reachable h1 g1
"""


def pids() -> dict[str, int]:
    from megafleet.vm.engine import Engine
    return {v.name: v.pid for v in Engine().list("g*") if v.state == "running"}


def ns_inode(node: str) -> int:
    return os.stat(f"/run/netns/{T}-{node}").st_ino


def test_diff_and_up_after_adding_ten_guests_and_deleting_one_link(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = tmp_path / "rc.fleet"
    path.write_text(BASE)
    try:
        assert megafleet_json("up", str(path), "-N", T, "--no-ksm", timeout=600)["ok"]
        before, inodes = pids(), {n: ns_inode(n) for n in ("h1", "h2", "r1")}
        assert sorted(before) == ["g1", "g2", "g3"]
        # Nothing differs from the file it runs.
        same = megafleet("diff", str(path), "-N", T)
        assert "0 to add, 0 to remove, 0 to change" in same.stdout

        path.write_text(BASE.replace("vm g[1..3]", "vm g[1..13]").replace("link h2 -- lanB\n", ""))
        r = megafleet("diff", str(path), "-N", T, "--json", check=False)
        assert r.returncode == 1
        rows = json.loads(r.stdout)["rows"]
        added = {(x["kind"], x["name"]) for x in rows if x["change"] == "+"}
        removed = {(x["kind"], x["name"]) for x in rows if x["change"] == "-"}
        changed = {(x["kind"], x["name"]) for x in rows if x["change"] == "~"}
        new = [f"g{i}" for i in range(4, 14)]
        assert added == {("guest", g) for g in new} | {("port", f"{g} -- lanA") for g in new}
        assert removed == {("port", "h2 -- lanB")}
        assert changed == {("ns-config", "h2 (addresses, routes)")}
        vm_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("vm g"))
        assert {x["loc"] for x in rows if x["change"] == "+"} == {f"{path}:{vm_line}"}

        summary = megafleet_json("up", str(path), "-N", T, "--no-ksm", timeout=600)
        assert summary["ok"] and summary["ready"] == 13
        after = pids()
        assert sorted(after) == sorted(["g1", "g2", "g3"] + new)
        assert {g: after[g] for g in before} == before            # running guests untouched
        assert {n: ns_inode(n) for n in inodes} == inodes
        out = megafleet("exec", "h2", "-t", T, "--", "ip", "-o", "link").stdout
        assert "eth1" not in out and "eth0" in out
        assert "0 to add, 0 to remove, 0 to change" in megafleet("diff", str(path), "-N", T).stdout
        # And back: the ten guests go, the link comes back, g1..g3 still untouched.
        path.write_text(BASE)
        assert megafleet_json("up", str(path), "-N", T, "--no-ksm", timeout=600)["ok"]
        assert pids() == before
        assert "eth1" in megafleet("exec", "h2", "-t", T, "--", "ip", "-o", "link").stdout
    finally:
        megafleet("down", T, check=False)
    nothing_left(T)
    assert pids() == {} or not any(k.startswith("g") for k in pids())


PROPS = """pool p 10.74.0.0/16
switch s1
router r1 {
  iface s1 auto
}
router r2
link r1 -- r2 delay 5ms
host a on s1 rate 10mbit
host b on s1
vm gx image tiny driver container mem 64M on s1 rate 10mbit
reachable a b
reachable b r1
reachable gx b
reachable b r2
"""


def _ifindex(node: str, dev: str) -> int:
    return int(subprocess.run(["ip", "netns", "exec", f"{T2}-{node}", "cat", f"/sys/class/net/{dev}/ifindex"],
                              capture_output=True, text=True, check=True).stdout)


def _rtt(src: str, addr: str) -> float:
    r = subprocess.run(["ip", "netns", "exec", f"{T2}-{src}", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", addr],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    return float(r.stdout.split("rtt min/avg/max/mdev = ")[1].split("/")[0])


T2 = f"mfx{TAG}q"


def test_changed_link_properties_apply_in_place_and_remade_interfaces_keep_their_addresses(tmp_path):
    """Editing a running testbed's link properties changes them where they run:
    a port's rate (tc, the interface stays), a declared wire's delay (its
    wirefilter; the taps stay), a container guest's rate (the guest keeps its
    pid). An edit that makes interfaces again (a wire that becomes a veth)
    gives them back their addresses and routes: the assertions still hold."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = tmp_path / "props.fleet"
    text = f'image tiny from "{REPO}/examples/images/tiny.toml"\n' + PROPS
    path.write_text(text)
    try:
        assert megafleet_json("up", str(path), "-N", T2, "--no-ksm", timeout=600)["ok"]
        r2 = subprocess.run(["ip", "-n", f"{T2}-r2", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        r2_addr = next(line.split("inet ")[1].split("/")[0] for line in r2.splitlines() if " lo " not in line)
        assert 9 <= _rtt("r1", r2_addr) < 40               # 2 x 5 ms (wirefilter runs ~1% early)
        a_if, r1_wire_if = _ifindex("a", "eth0"), _ifindex("r1", "eth1")
        c_pid = pids().get("gx")
        assert c_pid

        path.write_text(text.replace("host a on s1 rate 10mbit", "host a on s1 rate 20mbit")
                        .replace("delay 5ms", "delay 30ms")
                        .replace("on s1 rate 10mbit\nreachable", "on s1 rate 30mbit\nreachable"))
        rows = json.loads(megafleet("diff", str(path), "-N", T2, "--json", check=False).stdout)["rows"]
        assert {(x["change"], x["kind"]) for x in rows} == {("~", "port"), ("~", "wire")}, rows
        summary = megafleet_json("up", str(path), "-N", T2, "--no-ksm", timeout=600)
        assert summary["ok"] and summary["verify"]["ok"], summary
        assert _ifindex("a", "eth0") == a_if and _ifindex("r1", "eth1") == r1_wire_if
        tc = subprocess.run(["tc", "-n", f"{T2}-a", "qdisc", "show", "dev", "eth0"], capture_output=True,
                            text=True).stdout
        assert "rate 20Mbit" in tc, tc
        assert _rtt("r1", r2_addr) >= 57                   # 2 x 30 ms
        assert pids().get("gx") == c_pid                 # its rate changed on the host side only

        # The wire goes (no delay): r1's and r2's ends are made again as a veth,
        # with their addresses and the routes through them (b reaches r2).
        path.write_text(path.read_text().replace("link r1 -- r2 delay 30ms", "link r1 -- r2"))
        summary = megafleet_json("up", str(path), "-N", T2, "--no-ksm", timeout=600)
        assert summary["ok"] and summary["verify"]["ok"], summary
        assert _rtt("r1", r2_addr) < 20
        assert "0 to add, 0 to remove, 0 to change" in megafleet("diff", str(path), "-N", T2).stdout
    finally:
        megafleet("down", T2, check=False)
    nothing_left(T2)


ROUTING = """pool p 10.75.0.0/16
switch s1
switch s2
switch s3
router f1 {
  iface s1 auto
  iface s2 auto
  ospf area 0
}
router f2 {
  iface s2 auto
  iface s3 auto
  ospf area 0
}
router b1 {
  iface s3 auto
  ospf area 0 daemon bird
}
host h1 on s1
reachable h1 b1
"""
T3 = f"mfx{TAG}o"


def _daemon_pids(router: str) -> dict[str, int]:
    from megafleet.ledger import Ledger
    return {r.key.rsplit("/", 1)[1]: r.data["pid"] for r in Ledger().list("net", "process")
            if r.key.startswith(f"{T3}/frr/{router}/") and "pid" in r.data}


def test_changed_routing_configuration_is_taken_in_place(tmp_path):
    """An OSPF cost edited on a running FRR router restarts only its ospfd
    (zebra, with the interfaces and the kernel's routes, keeps running); a
    BIRD router reads its new configuration (same process). The assertions
    hold afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, FRR, BIRD)")
    path = tmp_path / "routing.fleet"
    path.write_text(ROUTING)
    try:
        summary = megafleet_json("up", str(path), "-N", T3, "--no-ksm", timeout=600)
        assert summary["ok"], summary
        f1, b1 = _daemon_pids("f1"), _daemon_pids("b1")
        assert set(f1) >= {"zebra", "ospfd"} and set(b1) == {"bird"}
        path.write_text(ROUTING.replace("  iface s2 auto\n  ospf area 0\n}\nrouter f2",
                                        "  iface s2 auto\n  ospf area 0 cost 40\n}\nrouter f2")
                        .replace("ospf area 0 daemon bird", "ospf area 0 cost 30 daemon bird"))
        rows = json.loads(megafleet("diff", str(path), "-N", T3, "--json", check=False).stdout)["rows"]
        assert {(x["change"], x["kind"], x["name"]) for x in rows} == {("~", "router", "f1"), ("~", "router", "b1")}
        summary = megafleet_json("up", str(path), "-N", T3, "--no-ksm", timeout=600)
        assert summary["ok"] and summary["verify"]["ok"], summary
        after_f1, after_b1 = _daemon_pids("f1"), _daemon_pids("b1")
        assert after_f1["zebra"] == f1["zebra"] and after_f1["ospfd"] != f1["ospfd"]
        assert after_b1 == b1                                       # BIRD reconfigured, not restarted
        from megafleet.netlang.live import run_base
        conf = subprocess.run(["birdc", "-s", str(run_base(T3) / "frr" / "b1" / "bird.ctl"), "show", "ospf",
                               "interface"], capture_output=True, text=True).stdout
        assert "Cost: 30" in conf or "cost 30" in conf.lower(), conf
        assert "0 to add, 0 to remove, 0 to change" in megafleet("diff", str(path), "-N", T3).stdout
    finally:
        megafleet("down", T3, check=False)
    nothing_left(T3)
