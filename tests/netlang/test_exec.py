"""Startup commands (`exec "CMD"` on hosts and routers), without root: parsing
into argv (shlex, one-line and block forms, group defaults), errors with their
lines, the typed plan item (`hostplan.NsExec`) with its JSON round trip, its
place in `diff`, and its share per host. Live runs: test_exec_live.py."""

from __future__ import annotations

import json

import pytest

from megafleet import manifest, placement
from megafleet.experiment.reconcile import diff_rows
from megafleet.netlang import hostplan, live, nsexec
from megafleet.netlang.compiler import compile_text
from megafleet.netlang.errors import CompileError
from megafleet.netlang.export import to_json

TEXT = """\
switch lan
router r on lan exec "ip addr add 192.0.2.1/32 dev lo" exec "sysctl -w net.ipv4.ip_forward=1"
host h1 {
  iface lan
  exec "sh -c 'echo $$ > /dev/null'"
  exec "sleep 1"
}
group web exec "true" {
  host w[1..2] on lan
}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(CompileError) as info:
        compile_text(text)
    return [f"{d.loc.line}:{d.loc.col}: {d.message}" for d in info.value.diagnostics.items]


def argvs(net, node: str) -> list[tuple[str, ...]]:
    return [argv for argv, _ in net.groups[net.index[node][0]].props.get("exec", [])]


def test_exec_is_split_into_argv_in_both_forms_repeatable_and_a_group_default():
    net = compile_text('switch lan\nrouter r on lan exec "ip addr add 192.0.2.1/32 dev lo" '
                       'exec "sysctl -w net.ipv4.ip_forward=1"\n'
                       "host h1 {\n  iface lan\n  exec \"sh -c 'echo a  b > /dev/null'\"\n  exec \"sleep 1\"\n}\n"
                       'group web exec "true" {\n  host w[1..2] on lan exec "echo w"\n  host x on lan\n}\n')
    assert argvs(net, "r") == [("ip", "addr", "add", "192.0.2.1/32", "dev", "lo"),
                               ("sysctl", "-w", "net.ipv4.ip_forward=1")]
    # shlex: single quotes keep a word whole (no shell ever runs it: argv[0] is sh here
    # because the description asked for it).
    assert argvs(net, "h1") == [("sh", "-c", "echo a  b > /dev/null"), ("sleep", "1")]
    # The group's command first, then the member's own; siblings do not share lists.
    assert argvs(net, "w1") == [("true",), ("echo", "w")] and argvs(net, "x") == [("true",)]
    # Each command knows its statement's line.
    locs = [loc for _, loc in net.groups[net.index["h1"][0]].props["exec"]]
    assert [(loc.line, loc.col) for loc in locs] == [(5, 3), (6, 3)]
    # `net export` carries them as JSON.
    node = next(n for n in to_json(net)["nodes"] if n["name"] == "h1")
    assert node["props"]["exec"][1] == {"argv": ["sleep", "1"], "at": "<text>.fleet:6:3"}
    json.dumps(to_json(net))


def test_bad_exec_statements_are_errors_with_their_lines():
    out = errors('switch lan\nhost a on lan exec ip\nhost b on lan exec "echo \'x"\nhost c on lan exec ""\n'
                 'image img from "x.toml"\nvm v image img on lan exec "true"\n'
                 'router r image img on lan exec "true"\nhost d on lan exec\n')
    assert any(e.startswith("2:20: expected a quoted command line after exec") for e in out), out
    assert any(e.startswith("3:20: invalid command line") and "No closing quotation" in e for e in out), out
    assert any(e.startswith("4:20: empty command line after exec") for e in out), out
    assert any(e.startswith("6:23: exec is for hosts and routers") for e in out), out
    assert any(e.startswith("7:27: router r: exec runs a command in a namespace router; this one has an image")
               for e in out), out
    assert any(e.startswith("8:15: missing a quoted command line") for e in out), out


def test_the_plan_carries_the_commands_per_namespace_and_round_trips_through_json():
    p = live.plan(compile_text(TEXT), "tb")
    assert p.ns_exec["tb-r"] == [hostplan.NsExec("r", ("ip", "addr", "add", "192.0.2.1/32", "dev", "lo")),
                                 hostplan.NsExec("r", ("sysctl", "-w", "net.ipv4.ip_forward=1"))]
    assert [c.argv for c in p.ns_exec["tb-h1"]] == [("sh", "-c", "echo $$ > /dev/null"), ("sleep", "1")]
    assert set(p.ns_exec) == {"tb-r", "tb-h1", "tb-w1", "tb-w2"}
    back = hostplan.Plan.from_json(json.loads(json.dumps(p.to_json())))
    assert back == p and back.compute_digest() == p.digest
    assert isinstance(back.ns_exec["tb-r"][0], hostplan.NsExec)
    with pytest.raises(hostplan.PlanError, match="malformed startup command"):
        hostplan.NsExec.from_json({"node": "r", "argv": []})
    with pytest.raises(hostplan.PlanError, match="malformed startup command"):
        hostplan.NsExec.from_json({"argv": ["true"]})


def test_diff_shows_changed_commands_and_ignores_moved_lines():
    old = live.plan(compile_text(TEXT), "tb")
    # A comment above moves every line: the plan (and its digest) stays the same.
    moved = live.plan(compile_text("# a comment\n\n" + TEXT), "tb")
    assert not hostplan.diff(old, moved) and moved.digest == old.digest
    new = live.plan(compile_text(TEXT.replace('exec "sleep 1"', 'exec "sleep 2"')
                                 .replace(' exec "sysctl -w net.ipv4.ip_forward=1"', '')), "tb")
    d = hostplan.diff(old, new)
    changed = {o.name: (o.value, n.value) for o, n in d.changed if o.kind == "ns-exec"}
    assert set(changed) == {"tb-h1", "tb-r"} and not d.added and not d.removed
    assert changed["tb-h1"][1][1] == hostplan.NsExec("h1", ("sleep", "2"))
    assert new.digest != old.digest
    # A node that loses all its commands: its ns-exec item is removed.
    none = live.plan(compile_text(TEXT.replace('group web exec "true" {', "group web {")), "tb")
    assert {x.name for x in hostplan.diff(old, none).removed if x.kind == "ns-exec"} == {"tb-w1", "tb-w2"}
    rows = diff_rows(old.to_json(), new.to_json(), compile_text(TEXT))
    assert {"change": "~", "kind": "ns-exec", "name": "h1 (startup commands)", "loc": "<text>.fleet:3"} in rows


def test_each_host_gets_the_commands_of_its_namespaces():
    net = compile_text("switch lan\nhost a[1..4] on lan exec \"true\"\n")
    p = live.plan(net, "tb")
    placed = placement.place(manifest.demands(net, p), [placement.HostOffer("h0", 2, 100_000),
                                                        placement.HostOffer("h1", 2, 100_000)])
    ms = manifest.split(p, placed, addresses={"h0": "192.0.2.1", "h1": "192.0.2.2"})
    seen = {}
    for host, m in ms.items():
        sub = manifest.plan_from_json(m.net)
        assert set(sub.ns_exec) == set(sub.netns.values())
        seen.update(sub.ns_exec)
    assert seen == p.ns_exec


def test_the_wait_for_a_command_is_set_by_the_environment(monkeypatch):
    monkeypatch.delenv(nsexec.WAIT_ENV, raising=False)
    assert nsexec.wait_s() == nsexec.WAIT_S
    monkeypatch.setenv(nsexec.WAIT_ENV, "0.5")
    assert nsexec.wait_s() == 0.5
    for bad in ("soon", "0", "-1", "7200"):
        monkeypatch.setenv(nsexec.WAIT_ENV, bad)
        with pytest.raises(ValueError, match=nsexec.WAIT_ENV):
            nsexec.wait_s()


def test_a_failure_names_node_command_and_the_statement():
    net = compile_text(TEXT)
    exc = nsexec.ExecFailed("h1", 1, ("sleep", "1"), 2, "sleep: invalid time")
    assert str(exc) == "node h1: startup command 'sleep 1' exited 2: sleep: invalid time"
    assert nsexec.statement_loc(net, exc) == "<text>.fleet:6"
    assert nsexec.statement_loc(net, nsexec.ExecFailed("nobody", 0, ("x",), 1, "")) == "?"


def test_a_plan_without_commands_keeps_the_json_and_digest_it_had_before_them():
    p = live.plan(compile_text("switch lan\nhost a on lan\n"), "tb")
    assert "ns_exec" not in p.to_json()
    back = hostplan.Plan.from_json(p.to_json())
    assert back == p and back.compute_digest() == p.digest
    with_cmd = live.plan(compile_text('switch lan\nhost a on lan exec "true"\n'), "tb")
    assert with_cmd.to_json()["ns_exec"] == {"tb-a": [{"node": "a", "argv": ["true"]}]}
