"""Pure logic of experiments: references, link settings, fault schedules,
verification checks; and wirefilter's management socket on real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from megafleet.experiment import refs as R
from megafleet.experiment import hostside, schedule, verify
from megafleet.experiment.cli import _link_words
from megafleet.experiment.control import message, parse_capture_target
from megafleet.netlang import CompileError, compile_text

NET = """
pool p 10.40.0.0/16
pool p6 fd00:40::/48
switch core subnet 10.40.0.0/24
switch lan[1..2]
router r1 {
  iface core 10.40.0.1
  iface lan1 auto
}
router r2 {
  iface core 10.40.0.2
  iface lan2 auto
}
group pcs {
  host pc[1..3] on lan1
}
host srv on lan2
host a
host b
link a -- b
link lan1 -- lan2
reachable @pcs srv
reachable pc1 r2
at +30s link r1 -- core down
at +60s link r1 -- core up
at +45s node pc[1..2] restart
every 20s for 1m link lan* loss 5%
"""


@pytest.fixture(scope="module")
def net():
    return compile_text(NET, "units.fleet", graph=False)


def test_resolve_names_ranges_globs_groups(net):
    assert R.resolve(net, "r1") == ["r1"]
    assert R.resolve(net, "pc[1..2]") == ["pc1", "pc2"]
    assert sorted(R.resolve(net, "lan*")) == ["lan1", "lan2"]
    assert R.resolve(net, "@pcs") == ["pc1", "pc2", "pc3"]
    with pytest.raises(R.RefError, match="unknown node or switch 'nope'"):
        R.resolve(net, "nope")
    with pytest.raises(R.RefError, match="unknown group 'nogroup'"):
        R.resolve(net, "@nogroup")
    with pytest.raises(R.RefError, match=r"'pc4' in 'pc\[1..9\]'"):
        R.resolve(net, "pc[1..9]")
    with pytest.raises(R.RefError, match="is a switch, not a node"):
        R.nodes(net, "core")


def test_links_between_references(net):
    assert R.links(net, "r1", "core") == [R.LinkRef("port", "r1", "core")]
    assert R.links(net, "core", "r1") == [R.LinkRef("port", "r1", "core")]
    assert R.links(net, "b", "a") == [R.LinkRef("p2p", "a", "b")]
    assert R.links(net, "lan1", "lan2") == [R.LinkRef("swlink", "lan1", "lan2")]
    assert {r.a for r in R.links(net, "@pcs", "lan1")} == {"pc1", "pc2", "pc3"}
    # A alone: every link with an end in A.
    assert set(R.links(net, "r1", None)) == {R.LinkRef("port", "r1", "core"), R.LinkRef("port", "r1", "lan1")}
    with pytest.raises(R.RefError, match="no link r1 -- lan2"):
        R.links(net, "r1", "lan2")


def test_parse_settings_and_errors():
    s = R.parse_settings(["delay", "50ms", "jitter", "5ms", "loss", "1.5%", "rate", "10mbit"])
    assert (s.delay_us, s.jitter_us, s.loss_pct, s.rate_bit) == (50_000, 5_000, 1.5, 10_000_000)
    assert R.parse_settings(["delay", "none", "loss", "0"]).clear == ["delay", "loss"]
    for words, why in ((["delay", "-5ms"], "cannot be negative"), (["loss", "120%"], "invalid percentage"),
                       (["speed", "1"], "unknown link setting 'speed'"), (["delay"], "needs a value"),
                       ([], "nothing to set")):
        with pytest.raises(R.RefError, match=why):
            R.parse_settings(words)
    assert R.LinkSettings.from_json(s.to_json()) == s


def test_clear_others_removes_every_setting_not_given():
    assert R.clear_others(R.LinkSettings()).clear == ["delay", "jitter", "loss", "rate"]
    s = R.clear_others(R.parse_settings(["delay", "5ms"]))
    assert s.delay_us == 5000 and s.clear == ["jitter", "loss", "rate"]
    assert hostside.effective({"delay_us": 1, "loss_pct": 2.0, "rate_bit": 8}, s) == {"delay_us": 5000}


def test_effective_settings_and_wirefilter_lines():
    cur = {"delay_us": 20_000, "loss_pct": 1.0}
    new = hostside.effective(cur, R.parse_settings(["delay", "50ms", "loss", "none", "rate", "8mbit"]))
    assert new == {"delay_us": 50_000, "rate_bit": 8_000_000}
    assert hostside.wf_lines(new) == ["delay 50", "loss 0", "bandwidth 1000000"]
    assert hostside.wf_lines({"delay_us": 10_000, "jitter_us": 2_000}) == ["delay 10+2", "loss 0", "bandwidth 0"]


def test_cli_link_words_without_the_double_dash():
    # click drops the first `--` of a command line.
    assert _link_words(("r1", "core", "delay", "5ms")) == ("r1", "core", ["delay", "5ms"])
    assert _link_words(("r1", "--", "core")) == ("r1", "core", [])
    assert _link_words(("core*", "loss", "5%")) == ("core*", None, ["loss", "5%"])
    assert message("set", "r1 -- core", R.parse_settings(["delay", "50ms", "loss", "none"])) == \
        "link r1 -- core delay 50ms loss none"


def test_cli_link_down_and_up_are_one_command_for_two_states():
    from click.testing import CliRunner

    from megafleet.experiment.cli import link

    runner = CliRunner()
    for word in ("down", "up"):
        cmd = link.commands[word]
        assert [p.name for p in cmd.params] == ["words", "testbed", "json_mode"]
        r = runner.invoke(link, [word, "r1", "--", "core", "extra"])
        assert r.exit_code == 2 and "unexpected 'extra' after the link" in r.output
    assert "pull the cable" in link.commands["down"].help and "plug the cable" in link.commands["up"].help


def test_fault_schedule_compiles_to_steps(net):
    texts = [(s.at_s, s.text) for s in schedule.steps(net.faults)]
    assert texts == [(0.0, "link lan* loss 5%"), (20.0, "link lan* loss 5%"), (30.0, "link r1 -- core down"),
                     (40.0, "link lan* loss 5%"), (45.0, "node pc[1..2] restart"), (60.0, "link r1 -- core up")]
    f = net.faults[0]
    assert f.to_json()["loc"] == "units.fleet:24"


def test_fault_schedule_errors_name_file_and_line():
    with pytest.raises(CompileError) as info:
        compile_text(NET + "at +5s link r1 -- lan2 down\n", "bad.fleet", graph=False)
    assert "bad.fleet:28:" in str(info.value) and "no link r1 -- lan2" in str(info.value)


def test_verify_checks_one_ping_per_source_destination_family(net):
    checks = verify.checks(net)
    srv = [c for c in checks if c.dst == "srv"]
    assert {c.src for c in srv} == {"pc1", "pc2", "pc3"}
    assert {c.family for c in srv} == {4, 6} and len(srv) == 6      # dual-stack: both families
    assert all(c.loc == "units.fleet:22" and c.assertion == "reachable @pcs srv" for c in srv)
    r2 = [c for c in checks if c.dst == "r2"]
    assert [c.addr for c in r2 if c.family == 4] == ["10.40.0.2"]
    failed = verify.VerifyResult(4, 3, None, 60.0, [verify.FailedCheck(srv[0], "100% packet loss")])
    lines = verify.summary_lines(failed)
    assert lines[0] == "verify: 1 of 4 reachability checks FAILED (checked for 60.0 s)"
    assert lines[1].startswith("  units.fleet:22: reachable @pcs srv: ") and lines[1].endswith(": 100% packet loss")
    assert failed.to_json()["failed"] == [{**srv[0].to_json(), "error": "100% packet loss"}]
    # As `up` reports them: after routing had time, skipped, or not checkable.
    passed = verify.VerifyResult(4, 4, 2.5, 2.6)
    assert verify.summary_lines(verify.UpVerify(result=passed)) == [
        "verify: 4 reachability checks pass (all true after 2.5 s of waiting for routing)"]
    assert verify.summary_lines(passed) == ["verify: 4 reachability checks pass (all true after 2.5 s)"]
    assert verify.summary_lines(verify.UpVerify(skipped="--no-verify")) == ["verify: skipped (--no-verify)"]
    gone = verify.UpVerify(error="host h1: agent gone")
    assert not gone.ok and gone.to_json() == {"ok": False, "error": "host h1: agent gone", "after_up": True}
    assert verify.UpVerify(skipped="no reachable assertions").ok


def test_capture_targets(net):
    assert parse_capture_target(net, "r1") == {"node": "r1", "iface": None}
    assert parse_capture_target(net, "r1:eth1") == {"node": "r1", "iface": "eth1"}
    assert parse_capture_target(net, "core") == {"switch": "core"}
    assert parse_capture_target(net, "r1 -- core") == {"link": ["port", "r1", "core"]}
    for text, why in (("ghost", "unknown node or switch 'ghost'"), ("r1:eth7", "no interface 'eth7'"),
                      ("core:eth0", "capture it whole")):
        with pytest.raises(R.RefError, match=why):
            parse_capture_target(net, text)


@pytest.mark.skipif(not shutil.which("wirefilter"), reason="needs vde2's wirefilter")
def test_wirefilter_management_socket_changes_settings_live():
    """Two real vde_switch processes joined by a wirefilter with a management
    socket: settings change at runtime and showinfo reports them."""
    d = Path(tempfile.mkdtemp(prefix="mfx-"))
    pids = []
    try:
        for n in ("a", "b"):
            subprocess.run(["vde_switch", "-s", str(d / n), "-d", "-p", str(d / f"{n}.pid")], check=True)
        subprocess.run(["wirefilter", "-v", f"{d / 'a'}:{d / 'b'}", "--daemon", "--pidfile", str(d / "wf.pid"),
                        "-M", str(d / "mgmt")], check=True)
        for n in ("a.pid", "b.pid", "wf.pid"):
            deadline = time.monotonic() + 5
            while not (d / n).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            pids.append(int((d / n).read_text()))
        deadline = time.monotonic() + 5
        while not (d / "mgmt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        hostside.wf_command(d / "mgmt", hostside.wf_lines({"delay_us": 50_000, "loss_pct": 100.0}))
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(hostside.ExperimentError, match="refused"):
            hostside.wf_command(d / "mgmt", ["nonsense 1"])
    finally:
        for pid in pids:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        shutil.rmtree(d, ignore_errors=True)
    time.sleep(0.2)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_host_links_find_each_links_kernel_objects_in_a_typed_plan(net):
    from megafleet.netlang import live

    p = live.plan(net, "mfxu")
    objs = {o.ref: o for o in hostside.host_links(p.to_json())}
    assert set(objs) == set(R.all_links(net))
    port = objs[R.LinkRef("port", "r1", "core")]
    assert port.host_ifs and port.splice == (port.host_ifs[0], p.bridge("core", None).ifname)
    p2p = objs[R.LinkRef("p2p", "a", "b")]
    assert p2p.splice is None and {ns for ns, _ in p2p.ns_ifs} == {"mfxu-a", "mfxu-b"}
    trunk = objs[R.LinkRef("swlink", "lan1", "lan2")]
    assert len(trunk.host_ifs) == 2 and trunk.splice[1] == p.bridge("lan2", None).ifname
    # A delayed link in the description is a wire: found with its ends.
    wired = compile_text(NET.replace("link a -- b", "link a -- b delay 5ms"), "w.fleet", graph=False)
    objs = {o.ref: o for o in hostside.host_links(live.plan(wired, "mfxu").to_json())}
    w = objs[R.LinkRef("p2p", "a", "b")]
    assert w.wire is not None and w.props == {"delay_us": 5000} and len(w.ns_ifs) == 2


def test_reconcile_changes_link_properties_in_place_and_knows_what_a_remade_interface_needs():
    from megafleet.experiment import reconcile
    from megafleet.netlang import netlink
    from megafleet.netlang.hostplan import Named, VethPort
    from megafleet.netlang.model import LinkProps

    port = VethPort("a", "s1", None, "br", 1500, LinkProps(rate_bit=10_000_000), "mfxa-0", ns="mfx-a", eth="eth0")
    faster = VethPort(**{**port.__dict__, "props": LinkProps(rate_bit=20_000_000)})
    moved = VethPort(**{**port.__dict__, "bridge": "br2"})
    router = (Named("router", "r1", [("ospfd", "a")]), Named("router", "r1", [("ospfd", "b")]))
    same, rest = reconcile.in_place([(port, faster), (port, moved), router])
    assert same == [(port, faster)] and rest == [(port, moved), router]

    ip = lambda text: int.from_bytes(bytes(int(x) for x in text.split(".")), "big")  # noqa: E731
    ops = [netlink.LinkUp("eth0"), netlink.LinkUp("eth1"),
           netlink.AddrAdd("eth0", 4, ip("10.0.0.1"), 30), netlink.AddrAdd("eth1", 4, ip("10.0.1.1"), 24),
           netlink.RouteAdd(4, 0, 0, ip("10.0.0.2")), netlink.RouteAdd(4, ip("10.9.0.0"), 16, ip("10.0.1.254"))]
    # eth0 made again: its link up, its address, and the default route through its subnet.
    assert reconcile.ops_of(ops, {"eth0"}) == [ops[0], ops[2], ops[4]]
    assert reconcile.ops_of(ops, set()) == []


def test_fault_events_in_the_same_millisecond_are_all_kept(tmp_path):
    """A schedule's actions due at the same time start within a millisecond:
    each is its own event in the (real, SQLite) store; the same event recorded
    twice stays one."""
    from types import SimpleNamespace

    from megafleet.collect import docs as D
    from megafleet.collect.stores import SqliteStore

    db = tmp_path / "t.db"
    m = SimpleNamespace(telemetry=f"sqlite:{db}", testbed="tb")
    at = 1_700_000_000_123
    hostside.record_fault(m, "h1", "link a -- lanA delay 5ms", "schedule", at, action="link set")
    hostside.record_fault(m, "h1", "node c1 restart", "schedule", at, action="node restart")
    hostside.record_fault(m, "h1", "node c1 restart", "schedule", at, action="node restart")
    store = SqliteStore(db)
    try:
        got = store.find(D.EVENTS, {"event": "fault"})
    finally:
        store.close()
    assert sorted(e["message"] for e in got) == ["link a -- lanA delay 5ms", "node c1 restart"]
    assert all(D.datetime_to_ms(e["time"]) == at and e["testbed"] == "tb" for e in got)
