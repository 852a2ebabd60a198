"""The description is the contract (issue 13): what `net check` accepts a host
builds exactly; what it cannot build, check refuses with file:line. Each test is
one of the issue's examples (or its kind), compiled and planned without root."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from megafleet import names
from megafleet.netlang import frr, limits
from megafleet.netlang.compiler import compile_text
from megafleet.netlang.errors import CompileError


def errors(text: str, **kw) -> list[str]:
    with pytest.raises(CompileError) as info:
        compile_text(text, **kw)
    return [f"{d.loc.line}: {d.message}" if d.loc else d.message for d in info.value.diagnostics.items]


# -- 1. generated names never collide -----------------------------------------

def test_hashed_names_of_many_guests_never_collide():
    alloc = names.IfNames("testbed1")
    got = [alloc(f"guest{i}", "0") for i in range(1, 20001)]
    assert len(set(got)) == len(got)
    assert all(len(n.encode()) <= 15 and n.startswith("testbed1") for n in got)
    # The pair the issue found: distinct, and the same again when asked again.
    a, b = alloc("guest4416", "0"), alloc("guest6765", "0")
    assert a != b and alloc("guest4416", "0") == a


def test_separators_cannot_make_two_things_one_name():
    alloc = names.IfNames("tb")
    port = alloc("b-x", "0")         # node b-x's first port
    bridge = alloc("b", "x-0")       # switch x-0's bridge
    assert port != bridge
    # Without the allocator the two read the same: that is the clash it resolves.
    assert names.ifname("tb", "b-x", "0") == names.ifname("tb", "b", "x-0")


def test_check_ifnames_refuses_long_and_repeated_names():
    names.check_ifnames(["a", "b"])
    with pytest.raises(names.InvalidName, match="twice"):
        names.check_ifnames(["a", "a"])
    with pytest.raises(names.InvalidName, match="15 bytes"):
        names.check_ifnames(["x" * 16])


def test_testbed_names_of_files_that_start_alike_differ_and_up_and_net_up_agree():
    from megafleet.netlang.cli import _default_name
    from megafleet.up import testbed_name

    a = names.testbed_name("campus-ospf-a.fleet")
    b = names.testbed_name("campus-ospf-b.fleet")
    assert a != b and len(a) <= 8 and len(b) <= 8
    for f in ("campus-ospf-a.fleet", "x/lan1000.fleet", "x/1000.fleet"):
        from pathlib import Path
        assert _default_name(f, None) == testbed_name(Path(f), None) == names.testbed_name(f)
    assert names.testbed_name("x.fleet", "lab1") == "lab1"
    with pytest.raises(names.InvalidName):
        names.testbed_name("x.fleet", "toolongname")


def test_a_testbed_belongs_to_its_description_file_by_absolute_path(tmp_path, monkeypatch):
    """What `up` and `net up` record as a testbed's description: the file's
    absolute path, however it was spelled; an imported file's own path (it is
    compiled as PATH.fleet); a description from text keeps its name."""
    (tmp_path / "d").mkdir()
    a = tmp_path / "d" / "a.fleet"
    a.write_text("switch s\n")
    (tmp_path / "lab.clab.yml").write_text("name: x\n")
    monkeypatch.chdir(tmp_path)
    assert names.description_id("d/a.fleet") == names.description_id(a) == str(a.resolve())
    assert names.description_id("d/../d/a.fleet") == str(a.resolve())
    assert names.description_id("lab.clab.yml.fleet") == str((tmp_path / "lab.clab.yml").resolve())
    assert names.description_id("<text>.fleet") == "<text>.fleet"
    b = str((tmp_path / "b.fleet").resolve())
    assert names.same_description(str(a.resolve()), names.description_id("d/a.fleet"))
    assert not names.same_description(str(a.resolve()), b)
    assert names.same_description("", b) and names.same_description(b, None)   # unrecorded: no refusal


def test_a_vlan_listed_twice_on_a_trunk_is_refused_with_its_line():
    assert errors("switch s1\nswitch s2\nlink s1 -- s2 vlan 10,10\n") == \
        ["3: VLAN 10 is listed twice in '10,10'"]


# -- 3. no traceback after a clean check ------------------------------------------

def test_an_empty_vlan_on_a_trunk_is_a_bridge_on_both_sides():
    net = compile_text("switch s1\nswitch s2\nhost a on s1 vlan 10\nhost b on s2 vlan 10\n"
                       "link s1 -- s2 vlan 10,20\n")
    assert net.switches["s1"].vlans == net.switches["s2"].vlans == {10, 20}


def test_net_draw_into_a_missing_directory_is_a_clean_error(tmp_path):
    from megafleet.netlang.cli import net

    f = tmp_path / "t.fleet"
    f.write_text("switch s\nhost h on s\n")
    result = CliRunner().invoke(net, ["draw", str(f), "-o", str(tmp_path / "missing" / "x.dot")])
    assert result.exit_code == 1 and "cannot write" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# -- 4. a reachable that holds on paper holds on the wire -----------------------

BGP_V6 = """pool six fd00::/48
switch a
switch b
switch c
router r1 on a on b bgp 1
router r2 on b on c bgp 2
host h1 on a
host h2 on c
reachable h1 h2
"""


def test_bgp_on_ipv6_only_links_peers_over_ipv6_and_announces():
    net = compile_text(BGP_V6)
    conf = frr.configs(net, "r1")["bgpd"]
    peer = net.node("r2").ifaces[0][2][6].split("/")[0]
    assert f" neighbor {peer} remote-as 2" in conf
    v6 = conf[conf.index("address-family ipv6 unicast"):]
    assert "redistribute connected" in v6 and f"neighbor {peer} activate" in v6


def test_bgp_on_dual_stack_links_has_sessions_and_families_for_both():
    net = compile_text("pool four 10.0.0.0/16\n" + BGP_V6)
    conf = frr.configs(net, "r1")["bgpd"]
    v4 = net.node("r2").ifaces[0][2][4].split("/")[0]
    v6 = net.node("r2").ifaces[0][2][6].split("/")[0]
    assert f"neighbor {v4} activate" in conf.split("address-family ipv6")[0]
    assert f"neighbor {v6} activate" in conf.split("address-family ipv6")[1]


def test_ipv6_bgp_is_never_left_to_bird():
    """BIRD runs OSPF only here (bird.py writes no BGP), so no BGP route may
    depend on it: `daemon bird` on a BGP router is refused with its line;
    where BIRD is chosen by count, BGP routers keep FRR with their IPv6
    sessions; a path from BIRD's OSPF into BGP is unprovable with its line."""
    from megafleet.netlang import bird
    from tests.netlang.test_routers import ring

    (got,) = errors("pool six fd00::/48\nswitch a\nrouter r1 on a bgp 1 ospf daemon bird\n")
    assert got.startswith("3: router r1: 'ospf daemon bird' is for namespace routers without bgp")

    net = compile_text(ring(bird.BIRD_AUTO_MIN, ipv6=True) + "router b1 bgp 65001 ospf\n"
                       "router b2 bgp 65002 ospf\nlink b1 -- r3\nlink b1 -- b2\n")
    assert bird.runs_bird(net, "r3") and not bird.runs_bird(net, "b1")
    conf = frr.configs(net, "b1")["bgpd"]
    peer = next(a[6] for _, i, a in net.node("b2").ifaces if i.peer == "b1").split("/")[0]
    assert f"neighbor {peer} activate" in conf.split("address-family ipv6 unicast")[1]

    (got,) = errors("pool six fd00::/48\nswitch a\nswitch b\nswitch c\nswitch d\n"
                    "router r1 on a on b bgp 1\nrouter r2 on b on c bgp 2\nrouter o on c on d ospf daemon bird\n"
                    "host h1 on a\nhost h4 on d\nreachable h1 h4\n")
    assert got.startswith("11: reachable h1 h4 cannot hold: megafleet cannot prove IPv6 routing")
    assert "o (ospf)" in got and "(bgp)" in got


def test_reachable_across_routers_of_different_kinds_is_unprovable_with_its_line():
    text = ("pool p 10.0.0.0/16\nswitch a\nswitch b\nswitch c\n"
            "router r1 on a on b ospf\nrouter r2 on b on c\nhost h1 on a\nhost h2 on c\nreachable h1 h2\n")
    (got,) = errors(text)
    assert got.startswith("9: reachable h1 h2 cannot hold: megafleet cannot prove IPv4 routing")
    assert "r1 (ospf)" in got and "r2 (static)" in got


def test_reachable_through_a_shared_as_among_three_bgp_routers_is_unprovable():
    text = ("pool p 10.0.0.0/16\nswitch a\nswitch b\nswitch c\nswitch d\n"
            "router r1 on a on b bgp 1\nrouter r2 on b on c bgp 2\nrouter r3 on c on d bgp 1\n"
            "host h1 on a\nhost h2 on d\nreachable h1 h2\n")
    (got,) = errors(text)
    assert got.startswith("11: ") and "share AS 1" in got


def test_reachable_needs_one_family_on_both_ends():
    text = ("pool four 10.0.0.0/16\npool six fd00::/48\nswitch a subnet 10.0.0.0/24\n"
            "switch c subnet fd00:1::/64\nrouter r on a on c\nhost h1 on a\nhost h2 on c\n"
            "reachable h1 h2\n")
    (got,) = errors(text)
    assert got.startswith("8: reachable h1 h2 cannot hold")


# -- 5. inputs are bounded ----------------------------------------------------------

def test_a_huge_count_is_refused_with_its_line_and_the_limit(monkeypatch):
    text = "param n = 3\nswitch s\nhost h[1..$n] on s\n"
    (got,) = errors(text, defines={"n": "99999999999"})
    assert got.startswith("3: too many names") and "1,000,000" in got and limits.MAX_NAMES_ENV in got
    monkeypatch.setenv(limits.MAX_NAMES_ENV, "2")
    (got,) = errors(text)
    assert "limit of 2 names" in got
    monkeypatch.setenv(limits.MAX_NAMES_ENV, "10")
    assert compile_text(text).counts()["host"] == 3


def test_the_language_reference_states_each_limit():
    import megafleet.netlang as reference

    doc = reference.__doc__
    for text in (f"{limits.DEFAULT_MAX_NAMES:,} names", limits.MAX_NAMES_ENV, f"at most {limits.TESTBED_NAME_MAX}",
                 f"at most {limits.IFNAME_MAX} bytes", f"{limits.VLAN_MIN}-{limits.VLAN_MAX}",
                 f"{limits.MTU_MIN}-{limits.MTU_MAX}", f"at most {limits.BRIDGE_PORTS:,}",
                 f"{limits.LEAF_PORTS:,} ports", f"{limits.SWITCH_PORTS_MAX:,} ports"):
        assert text in doc, text
