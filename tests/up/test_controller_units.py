"""Unit tests of the controller's pure helpers: testbed names, -D parsing,
per-host directories, tables and the summary of a partly failed `up`."""

from __future__ import annotations

from pathlib import Path

import pytest

from megafleet import placement, up
from megafleet.netlang import compile_text, live


def test_testbed_name_from_file_and_checks():
    # A long stem keeps 5 characters and adds 3 of a hash of the whole stem.
    name = up.testbed_name(Path("examples/campus-ospf.fleet"), None)
    assert name.startswith("campu") and len(name) == 8
    assert up.testbed_name(Path("x/lan1000.fleet"), None) == "lan1000"
    assert up.testbed_name(Path("x/1000.fleet"), None) == "t1000"
    assert up.testbed_name(Path("x.fleet"), "lab1") == "lab1"
    with pytest.raises(up.UpError, match="longer than 8"):
        up.testbed_name(Path("x.fleet"), "toolongname")
    with pytest.raises(up.UpError, match="invalid testbed name"):
        up.testbed_name(Path("x.fleet"), "bad/name")


def test_defines():
    assert up.parse_defines(("a=1", "b=x=y")) == {"a": "1", "b": "x=y"}
    with pytest.raises(up.UpError, match="expected NAME=VALUE"):
        up.parse_defines(("novalue",))


def test_target_dirs_and_round_trip():
    t = up.Target("hosts.toml", ["h1"], 4096, "/tmp/x/{host}", 0.5)
    assert t.dirs("h1") == {"state_dir": "/tmp/x/h1/state", "run_dir": "/tmp/x/h1/run",
                            "cache_dir": "/tmp/x/h1/cache"}
    assert up.Target.from_json(t.to_json()) == t
    assert up.Target().dirs("local") == {"state_dir": None, "run_dir": None, "cache_dir": None}
    assert up.Target().embedded and not t.embedded


def test_table_aligns_columns():
    text = up.table([["a", 1], ["bbb", None]], ["NAME", "N"])
    lines = text.splitlines()
    assert lines[0] == "NAME  N" and lines[1] == "----  -" and lines[3] == "bbb"


def test_summary_reports_a_failed_host_and_failed_guests():
    net = compile_text("pool p 10.9.0.0/16\nswitch s\nhost a[1..2] on s\n")
    plan = live.plan(net, "tb")
    placed = placement.Plan(hosts={"h0": ["a1"], "h1": ["a2"]}, node_host={"a1": "h0", "a2": "h1"},
                            segment_hosts={"s": ["h0", "h1"]}, vnis={"s": 10000})
    results = {"h0": {"ready": 0, "failed": [], "phases": {"net": 0.5, "vm": 0.0}, "seconds": 0.6}}
    s = up.summarize("tb", placed, plan, results, {"h1": "unreachable: refused"}, {"compile": 0.1}, 1.0)
    assert not s.ok
    assert s.failed == [up.FailedNode("a2", "h1", "host failed: unreachable: refused")]
    assert {h.host: h.status for h in s.hosts} == {"h0": "ok", "h1": "failed"}
    assert s.phases["host_net"] == 0.5
    # As `up --json` prints it: a host that answered has its seconds and
    # phases, one that did not its error; no "interrupted" key on a whole run.
    d = s.to_json()
    assert d["failed"] == [{"node": "a2", "host": "h1", "reason": "host failed: unreachable: refused"}]
    assert d["hosts"] == [
        {"host": "h0", "status": "ok", "nodes": 1, "guests": 0, "ready": 0, "failed": 0, "seconds": 0.6,
         "phases": {"net": 0.5, "vm": 0.0}},
        {"host": "h1", "status": "failed", "nodes": 1, "guests": 0, "ready": 0, "failed": 1,
         "error": "unreachable: refused"}]
    assert d["ok"] is False and "interrupted" not in d and "verify" not in d


def test_exec_results_travel_as_json_and_fail_on_any_node_or_host():
    from megafleet.host import NodeExec

    ran = NodeExec("pc1", 0, "web1\n", "", None)
    wire = ran.to_json()
    assert wire == {"node": "pc1", "rc": 0, "stdout": "web1\n", "stderr": "", "error": None}
    on_host = NodeExec.from_json(wire, host="h0")
    assert on_host.to_json() == {**wire, "host": "h0"}
    assert up.ExecResult([on_host], {}).ok
    assert not up.ExecResult([], {}).ok                                      # nothing matched
    assert not up.ExecResult([on_host], {"h1": "unreachable"}).ok
    assert not up.ExecResult([on_host, NodeExec("pc2", 1, "", "no", None, "h0")], {}).ok
    assert not up.ExecResult([NodeExec("pc3", None, "", "", "guest is not running", "h0")], {}).ok
