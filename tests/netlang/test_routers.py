"""Routers at scale: OSPF timers in the language and scaled by router count,
BIRD configuration and the automatic daemon choice (pure), and admission-
controlled starting of real FRR and BIRD routers that converge (root).

Live tests create namespaces and daemons under the prefix `mfn` and assert that
nothing is left: no namespace, no link, no process, no ledger record."""

from __future__ import annotations

import re

import pytest
import trio

from megafleet import proc
from megafleet.ledger import Ledger
from megafleet.netlang import bird, frr, live, ospftimers, routers
from megafleet.netlang.compiler import compile_text
from megafleet.netlang.errors import CompileError


def ring(n: int, extra: str = "", ipv6: bool = False) -> str:
    """n OSPF routers in a ring (plus chords to the opposite router from every
    fourth one), a host LAN at r1 and one at the opposite router."""
    far = n // 2 + 1
    lines = ["pool core 10.66.0.0/16", "pool lans 10.67.0.0/16"]
    if ipv6:
        lines.append("pool core6 fd66::/48")
    lines += [f"router r[1..{n}] ospf area 0 {extra}".rstrip(), "switch lana", "switch lanb",
              "host ha on lana", "host hb on lanb", "link r1 -- lana", f"link r{far} -- lanb"]
    lines += [f"link r{i} -- r{i % n + 1}" for i in range(1, n + 1)]
    lines += [f"link r{i} -- r{(i + n // 2 - 1) % n + 1}" for i in range(1, n // 2, 4)]
    return "\n".join(lines) + "\n"


# -- timers -----------------------------------------------------------------

def test_small_testbeds_keep_fast_timers_and_the_daemon_defaults():
    net = compile_text(ring(6))
    conf = frr.configs(net, "r2")["ospfd"]
    assert " ip ospf hello-interval 1\n ip ospf dead-interval 4\n" in conf
    assert "timers throttle" not in conf and "min-arrival" not in conf


def test_host_lans_are_passive_and_shared_lans_are_not():
    net = compile_text(ring(6, ipv6=True) + "switch core\nlink r2 -- core\nlink r3 -- core\n")
    lan = next(e for e, i, _ in net.node("r1").ifaces if i.switch == "lana")
    c = frr.configs(net, "r1")
    assert f"interface {lan}\n ip ospf area 0\n ip ospf passive\n" in c["ospfd"]
    assert f"interface {lan}\n ipv6 ospf6 area 0\n ipv6 ospf6 passive\n" in c["ospf6d"]
    assert c["ospfd"].count("passive") == 1          # not on the links
    assert "passive" not in frr.configs(net, "r2")["ospfd"]      # core has r2 and r3


def test_timers_scale_with_the_router_count():
    assert ospftimers.scaled(50) == ospftimers.OspfTimers()
    t = ospftimers.scaled(750)
    assert (t.hello_s, t.dead_s, t.spf_delay_ms, t.spf_hold_ms, t.spf_max_ms, t.lsa_ms) == \
        (10, 40, 750, 3750, 10000, 1000)
    assert ospftimers.scaled(100).hello_s == 2 and ospftimers.scaled(100).dead_s == 8
    # Scaled values reach the generated FRR configuration.
    net = compile_text(ring(100, "daemon frr"))
    conf = frr.configs(net, "r7")["ospfd"]
    assert " ip ospf hello-interval 2\n ip ospf dead-interval 8\n" in conf
    assert " timers throttle spf 100 500 10000\n" in conf
    assert " timers throttle lsa all 1000\n timers lsa min-arrival 1000\n" in conf


def test_explicit_timers_compile_into_the_config_and_win_over_scaled_ones():
    net = compile_text(ring(100, "daemon frr hello 3 spf 50ms 2s 20s lsa 200ms", ipv6=True))
    c = frr.configs(net, "r5")
    assert " ip ospf hello-interval 3\n ip ospf dead-interval 12\n" in c["ospfd"]
    assert " timers throttle spf 50 2000 20000\n timers throttle lsa all 200\n" \
           " timers lsa min-arrival 200\n" in c["ospfd"]
    # ospf6d: the same timers; it has no `throttle lsa` command.
    assert " ipv6 ospf6 hello-interval 3\n ipv6 ospf6 dead-interval 12\n" in c["ospf6d"]
    assert " timers throttle spf 50 2000 20000\n timers lsa min-arrival 200\n" in c["ospf6d"]
    assert "throttle lsa" not in c["ospf6d"]
    # Only a dead interval: the hello is a quarter of it; the rest stays scaled.
    net = compile_text(ring(100, "daemon frr dead 20s"))
    conf = frr.configs(net, "r5")["ospfd"]
    assert " ip ospf hello-interval 5\n ip ospf dead-interval 20\n" in conf
    assert " timers throttle spf 100 500 10000\n" in conf
    # Explicit values on a small testbed too.
    net = compile_text(ring(4, "hello 2"))
    assert " ip ospf dead-interval 8\n" in frr.configs(net, "r1")["ospfd"]


@pytest.mark.parametrize("words, at, message", [
    ("hello 0", "0", "invalid OSPF hello interval (seconds) '0' (a whole number from 1 to 65535)"),
    ("hello 10 dead 10", "ospf", "OSPF dead interval 10 s must be longer than the hello interval 10 s"),
    ("dead 1", "ospf", "OSPF dead interval 1 s is too short (at least 2 s: it must exceed a hello of 1 s)"),
    ("spf 1s 100ms 2s", "ospf", "OSPF spf timers 1000ms 100ms 2000ms: expected delay <= hold <= max "
                                "(e.g. spf 200ms 1s 10s)"),
    ("spf 1s 2s", "2s", "missing the SPF maximum hold time (spf DELAY HOLD MAX) after '2s'"),
    ("spf 1.5ms 2s 3s", "1.5ms", "invalid OSPF spf time '1.5ms' (whole milliseconds from 0 to 600000ms)"),
    ("lsa 6s", "6s", "invalid OSPF lsa interval '6s' (whole milliseconds from 0 to 5000ms)"),
    ("hello soon", "soon", "invalid OSPF hello interval (seconds) 'soon' (a whole number from 1 to 65535)"),
    ("daemon quagga", "quagga", "unknown OSPF daemon 'quagga' (use frr, bird, auto)"),
])
def test_bad_timer_values_are_refused_with_file_and_line(words, at, message):
    line = f"router r[1..3] ospf {words}"
    with pytest.raises(CompileError) as info:
        compile_text(f"pool p 10.0.0.0/16\n{line}\n", name="t.fleet")
    got = [f"{d.loc.file}:{d.loc.line}:{d.loc.col}: {d.message}" for d in info.value.diagnostics.items]
    col = (line + " ").index(f" {at} ") + 2
    assert got == [f"t.fleet:2:{col}: {message}"]


def test_bird_is_refused_where_it_cannot_run():
    with pytest.raises(CompileError, match=r"t.fleet:2:8: .*'ospf daemon bird' is for namespace routers "
                                           r"without bgp \(this one has bgp\)"):
        compile_text("pool p 10.0.0.0/16\nrouter r1 bgp 65000 ospf daemon bird\n", name="t.fleet")
    with pytest.raises(CompileError, match=r"this one has an image"):
        compile_text('image i from "x.toml"\nrouter r1 image i ospf daemon bird\n', name="t.fleet")


# -- BIRD -----------------------------------------------------------------

def test_bird_configuration():
    net = compile_text(ring(6, "daemon bird cost 7 hello 2", ipv6=True))
    c = frr.configs(net, "r1")
    assert list(c) == ["bird"]
    conf = c["bird"]
    rid = frr.router_id(net, "r1")
    assert f"router id {rid};\n" in conf
    # OSPFv2 and OSPFv3, each exporting to its kernel table.
    assert "protocol ospf v2 ospf4 {\n    ipv4 { import all; export none; };\n" in conf
    assert "protocol ospf v3 ospf6 {\n    ipv6 { import all; export none; };\n" in conf
    assert "protocol kernel kernel4 {\n    ipv4 { import none; export all; };\n    merge paths on;" in conf
    assert "protocol kernel kernel6 {" in conf
    # Every addressed interface, point-to-point on links; the host LAN (no
    # other router on it) is a stub: advertised, no hellos.
    view = net.node("r1")
    for eth, iface, _ in view.ifaces:
        kind = "stub yes; " if iface.switch else "type ptp; "
        assert conf.count(f'        interface "{eth}" {{ {kind}hello 2; dead 8; cost 7; }};\n') == 2
    assert conf.count("    tick 1;\n") == 2 and conf.count("    area 0 {\n") == 2
    # An IPv4-only router has no OSPFv3.
    v4 = frr.configs(compile_text(ring(6, "daemon bird")), "r2")["bird"]
    assert "ospf v3" not in v4 and "kernel6" not in v4


def test_bird_configuration_parses(tmp_path):
    """BIRD itself accepts the generated file (`bird -p` parses and exits)."""
    conf = tmp_path / "bird.conf"
    conf.write_text(frr.configs(compile_text(ring(6, "daemon bird spf 1s 3s 9s", ipv6=True)), "r3")["bird"])
    assert "tick 3;" in conf.read_text()
    r = proc.run(["bird", "-p", "-c", str(conf)], check=False)
    assert r.returncode == 0, r.stderr


def test_the_daemon_is_chosen_by_count_unless_given():
    small, big = compile_text(ring(10)), compile_text(ring(bird.BIRD_AUTO_MIN))
    assert not bird.runs_bird(small, "r1") and "zebra" in frr.configs(small, "r1")
    assert bird.runs_bird(big, "r1") and list(frr.configs(big, "r1")) == ["bird"]
    assert not bird.runs_bird(compile_text(ring(bird.BIRD_AUTO_MIN, "daemon frr")), "r1")
    assert bird.runs_bird(compile_text(ring(4, "daemon bird")), "r1")
    # A BGP router among many stays on FRR.
    mixed = compile_text(ring(bird.BIRD_AUTO_MIN) + "router b bgp 65001 ospf\nlink b -- r3\n")
    assert not bird.runs_bird(mixed, "b") and bird.runs_bird(mixed, "r3")


def test_runnable_reads_the_host_load():
    assert routers.runnable() >= 1        # this test is running
    assert routers.Admission(window=3).slots() == 3


# -- live -------------------------------------------------------------------

def _leftovers(testbed: str) -> dict:
    out = proc.run(["ip", "-o", "link", "show"]).stdout
    namespaces = sorted(n for n in live.existing_netns() if n.startswith(testbed + "-"))
    return {
        "netns": namespaces,
        "links": [m for m in re.findall(r"^\d+: ([^:@]+)", out, re.M) if m.startswith(testbed)],
        "ledger": [r.key for r in Ledger().list(live.OWNER) if r.key == testbed or r.key.startswith(testbed + "/")],
    }


def _ping_within(ns: str, addr: str, seconds: float, family: int = 4) -> bool:
    import time

    deadline = time.monotonic() + seconds
    argv = ["ip", "netns", "exec", ns, "ping", f"-{family}", "-n", "-q", "-c1", "-W1", addr]
    while proc.run(argv, check=False).returncode != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _addr(net, node: str, family: int = 4) -> str:
    return net.node(node).ifaces[0][2][family].split("/")[0]


@pytest.fixture
def testbed(root_only):
    names = []
    yield names.append
    for name in names:
        live.down(name)
        assert _leftovers(name) == {"netns": [], "links": [], "ledger": []}


@pytest.mark.root
def test_thirty_frr_routers_start_under_admission_control_and_converge(testbed):
    name = "mfnadm"
    testbed(name)
    net = compile_text(ring(30))
    p = live.plan(net, name)
    lines: list[str] = []
    ledger = Ledger()

    async def main() -> routers.StartReport:
        await trio.to_thread.run_sync(live._create_host_side, p, ledger, lines.append)
        for ns, ops in p.ns_ops.items():
            live.netlink.apply(str(live.NETNS_DIR / ns), ops, p.ns_sysctls.get(ns))
        # A window of 3 and a tight load limit: the admission path is exercised
        # on any host; progress at every check.
        return await routers.start(p, ledger, lines.append,
                                   routers.Admission(window=3, runnable_per_cpu=0.5, progress_s=0))

    report = trio.run(main)
    assert report.routers == 30 and report.daemons == 60         # zebra + ospfd each
    assert any(re.fullmatch(r"routers: \d+/30 up, [0-3] starting, \d+ runnable, [\d.]+ s", x) for x in lines)
    assert lines[-1].startswith("routers: 30/30 up, 0 starting")
    recorded = [r for r in ledger.list(live.OWNER, "process") if r.key.startswith(name + "/frr/")]
    assert len(recorded) == 60 and all("pid" in r.data for r in recorded)
    assert _ping_within(f"{name}-ha", _addr(net, "hb"), 90), "OSPF did not converge across 30 routers"
    live.down(name)
    assert not any(proc.RecordedProcess(r.data["pid"], r.data["start"]).alive() for r in recorded)


@pytest.mark.root
def test_bird_routers_converge_on_ipv4_and_ipv6_through_net_up(testbed):
    name = "mfnbird"
    testbed(name)
    net = compile_text(ring(12, "daemon bird", ipv6=True))
    lines: list[str] = []
    live.up(net, name, lines.append)
    assert any(x.startswith("started 12 routing daemons on 12 routers") for x in lines)
    recorded = [r for r in Ledger().list(live.OWNER, "process") if r.key.startswith(name + "/frr/")]
    assert sorted(r.key.rsplit("/", 2)[1] for r in recorded) == sorted(f"r{i}" for i in range(1, 13))
    assert all(r.key.endswith("/bird") for r in recorded)
    assert _ping_within(f"{name}-ha", _addr(net, "hb"), 60), "BIRD OSPFv2 did not converge"
    assert _ping_within(f"{name}-ha", _addr(net, "hb", 6), 60, family=6), "BIRD OSPFv3 did not converge"
    assert "proto bird" in proc.run(["ip", "-n", f"{name}-r2", "route"]).stdout
    live.down(name)
    assert not any(proc.RecordedProcess(r.data["pid"], r.data["start"]).alive() for r in recorded)
