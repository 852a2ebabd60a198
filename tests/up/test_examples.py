"""The examples of `megafleet up` compile and check (`megafleet net check`) and
place deterministically on a four-host inventory (`megafleet plan`, which reaches
no host)."""

from __future__ import annotations

import pytest

from .conftest import REPO, megafleet, megafleet_json

EXAMPLES = ["campus.fleet", "campus-ospf.fleet", "isp.fleet", "lan1000.fleet", "triangle.fleet"]

INVENTORY = """
[defaults]
user = "root"
capacity = 300

[[host]]
name = "node1"
address = "192.0.2.1"

[[host]]
name = "node2"
address = "192.0.2.2"

[[host]]
name = "node3"
address = "192.0.2.3"

[[host]]
name = "node4"
address = "192.0.2.4"
"""


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_passes_net_check(example):
    r = megafleet("net", "check", str(REPO / "examples" / example))
    assert ": ok:" in r.stdout


def test_lan1000_spreads_over_four_hosts_with_one_vxlan_segment(tmp_path):
    inv = tmp_path / "hosts.toml"
    inv.write_text(INVENTORY)
    plan = megafleet_json("plan", str(REPO / "examples" / "lan1000.fleet"), "--hosts", str(inv))
    guests = {h["host"]: h["containers"] for h in plan["hosts"]}
    assert sum(guests.values()) == 1000 and all(n <= 300 for n in guests.values())
    assert [s["segment"] for s in plan["spanning"]] == ["lan"]
    assert plan["spanning"][0]["hosts"] == ["node1", "node2", "node3", "node4"]
    # Deterministic: the same inputs give the same placement.
    again = megafleet_json("plan", str(REPO / "examples" / "lan1000.fleet"), "--hosts", str(inv))
    assert again == plan


def test_campus_and_isp_plans():
    campus = megafleet_json("plan", str(REPO / "examples" / "campus-ospf.fleet"))
    assert campus["hosts"][0]["containers"] == 204 and campus["spanning"] == []
    isp = megafleet_json("plan", str(REPO / "examples" / "isp.fleet"))
    assert isp["hosts"][0]["namespaces"] == 17     # 5 routers, 12 hosts


def test_plan_table_and_errors(tmp_path):
    text = megafleet("plan", str(REPO / "examples" / "campus-ospf.fleet")).stdout
    assert "HOST" in text and "local" in text and "204" in text
    bad = tmp_path / "bad.fleet"
    bad.write_text("switch s\nvm v image nope on s\n")
    r = megafleet("plan", str(bad), check=False)
    assert r.returncode != 0 and "bad.fleet:2" in r.stderr
    missing = megafleet("up", str(tmp_path / "missing.fleet"), check=False)
    assert missing.returncode != 0 and "missing.fleet" in missing.stderr
