"""Pure parts of the web package: tokens and scopes, the topology's grouping of
guests and its layout, the CLI's --listen parsing."""

from __future__ import annotations

import click
import pytest

from megafleet.experiment.hostside import ChangedLink
from megafleet.experiment.refs import LinkSettings
from megafleet.web import state
from megafleet.web.auth import Auth, AuthError
from megafleet.web.cli import _expand, is_loopback, parse_listen

from tests.up.conftest import REPO


def test_scopes_and_tokens():
    auth = Auth(loopback=False)
    read = auth.add_token({"read"})
    full = auth.add_token({"read", "control", "exec"})
    with pytest.raises(AuthError) as e:
        auth.check("read", None, None)
    assert e.value.status == 401
    auth.check("read", f"Bearer {read}", None)
    with pytest.raises(AuthError) as e:
        auth.check("control", f"Bearer {read}", None)
    assert e.value.status == 403
    auth.check("exec", f"Bearer {full}", None)
    with pytest.raises(AuthError):
        auth.check("read", "Bearer nope", None)
    with pytest.raises(AuthError):
        auth.check("read", f"Basic {read}", None)
    code = auth.add_login_link({"read"})
    session = auth.spend_login(code)
    auth.check("read", None, session)
    with pytest.raises(AuthError):
        auth.spend_login(code)                      # one time only
    with pytest.raises(ValueError):
        auth.add_token({"root"})
    # Loopback: reads are open; every write needs a token (403, not 401: the
    # request was understood, it is not allowed without one).
    local = Auth(loopback=True)
    local.check("read", None, None)
    for need in ("control", "exec"):
        with pytest.raises(AuthError) as e:
            local.check(need, None, None)
        assert e.value.status == 403 and need in str(e.value)
    control = local.add_token({"read", "control"})
    local.check("control", f"Bearer {control}", None)
    with pytest.raises(AuthError) as e:
        local.check("exec", f"Bearer {control}", None)
    assert e.value.status == 403
    local.check("exec", None, local.spend_login(local.add_login_link({"read", "control", "exec"})))


def test_listen_and_scope_expansion():
    assert parse_listen("127.0.0.1:8470") == ("127.0.0.1", 8470)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("8470", "host:", "h:99999"):
        with pytest.raises(click.BadParameter):
            parse_listen(bad)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert _expand("exec") == {"read", "control", "exec"} and _expand("read") == {"read"}


def test_topology_groups_guests_of_a_switch_and_expands_on_request(tmp_path, monkeypatch):
    path = tmp_path / "wide.fleet"
    path.write_text(f'image tiny from "{REPO}/examples/images/tiny.toml"\npool p 10.0.0.0/8 per /20\n'
                    "switch core\nswitch a[1..3]\nrouter r { iface core auto\n iface a[1..3] auto }\n"
                    "vm x[1..900] image tiny driver container mem 64M on a1\n"
                    "vm y[1..900] image tiny driver container mem 64M on a2\n"
                    "vm z[1..300] image tiny driver container mem 64M on a3\nhost h on core\n")
    monkeypatch.setattr(state, "PREVIEWS", {})
    info = state.add_preview(path, {})
    full = state.topology(info, {}, collapse=False)
    assert full.total_nodes == 2100 + 2 + 4 and len(full.nodes) == full.total_nodes and not full.collapsed
    grouped = state.topology(info, {"x5": "failed"})          # over 2,000 nodes: grouped
    clusters = {n.id: n for n in grouped.nodes if n.kind == "cluster"}
    assert grouped.collapsed and set(clusters) == {"x1..x900@a1", "y1..y900@a2", "z1..z300@a3"}
    assert clusters["x1..x900@a1"].count == 900 and clusters["x1..x900@a1"].state == "failed"
    assert clusters["x1..x900@a1"].states == {"failed": 1, "planned": 899}
    assert {"r", "h", "core"} <= {n.id for n in grouped.nodes}
    # One link per cluster, counting the ports it stands for.
    (link,) = [k for k in grouped.links if k.a == "x1..x900@a1"]
    assert link.b == "a1" and link.count == 900
    opened = state.topology(info, {}, expand=frozenset({"z1..z300@a3"}))
    assert "z17" in {n.id for n in opened.nodes} and "x1..x900@a1" in {n.id for n in opened.nodes}
    # Every node has a place, and no two share one.
    assert len({(round(n.x, 6), round(n.y, 6)) for n in full.nodes}) == len(full.nodes)


def test_links_show_their_running_settings_over_the_description(tmp_path, monkeypatch):
    """A link with a run-time record (`megafleet link set`, `link down`) shows
    the record's settings and state, whole: a setting cleared at run time is
    gone even where the description declared it; others show the description's.
    The node page's links say the same."""
    path = tmp_path / "small.fleet"
    path.write_text("pool p 10.0.0.0/16\nswitch s\nhost a on s delay 10ms loss 1%\nhost b on s\n"
                    "router r { iface s auto }\nhost c\nlink r -- c delay 5ms rate 10mbit\n")
    monkeypatch.setattr(state, "PREVIEWS", {})
    info = state.add_preview(path, {})

    def props(topo) -> dict[tuple[str, str], tuple[dict, str]]:
        return {tuple(sorted((k.a, k.b))): (k.props, k.state) for k in topo.links}

    declared = props(state.topology(info, {}))
    assert declared[("a", "s")] == ({"delay_us": 10000, "loss_pct": 1.0}, "up")
    assert declared[("b", "s")] == ({}, "up")
    assert declared[("c", "r")] == ({"delay_us": 5000, "rate_bit": 10_000_000}, "up")
    runtime = {("a", "s"): ChangedLink("a", "s", "up", LinkSettings(delay_us=50000)),   # loss cleared, delay set
               ("b", "s"): ChangedLink("b", "s", "down", LinkSettings()),              # pulled, nothing set
               ("c", "r"): ChangedLink("r", "c", "up", LinkSettings(delay_us=5000, jitter_us=2000,
                                                                    rate_bit=10_000_000))}
    assert runtime[("c", "r")].ends == ("c", "r")
    running = props(state.topology(info, {}, runtime=runtime))
    assert running[("a", "s")] == ({"delay_us": 50000}, "up")
    assert running[("b", "s")] == ({}, "down")
    assert running[("c", "r")] == ({"delay_us": 5000, "jitter_us": 2000, "rate_bit": 10_000_000}, "up")
    (iface,) = state.node_detail(info, "a", {}, runtime)["ifaces"]
    assert iface["switch"] == "s" and iface["link"] == {"delay_us": 50000}
    (iface,) = state.node_detail(info, "a", {})["ifaces"]
    assert iface["link"] == {"delay_us": 10000, "loss_pct": 1.0}


def test_faults_in_the_store_reach_a_waiting_client_once_under_their_testbed(tmp_path, monkeypatch):
    """Faults as `megafleet link set` or `node restart` record them in the
    telemetry store (the testbed a field of their own, stamped when the command
    began) reach a client waiting on the stream, once each, under their
    testbed: also one stored after an event stamped later had been read. Each
    of the three used to stop the store's events from reaching open pages."""
    import time
    from types import SimpleNamespace

    import trio
    import trio.testing

    from megafleet.experiment.hostside import record_fault
    from megafleet.web.events import Broker

    uri = f"sqlite:{tmp_path / 'telemetry.db'}"
    monkeypatch.setenv("MEGAFLEET_TELEMETRY", uri)
    testbed = SimpleNamespace(telemetry=uri, testbed="tb1")

    async def main() -> list:
        broker = Broker()
        send, receive = broker.subscribe()
        got = []

        async def listen() -> None:
            async for e in receive:
                got.append((e.kind, e.testbed, e.data["message"]))

        await broker.poll_store()                 # the baseline: only later events are news
        await trio.sleep(0.01)                    # events are stamped to the millisecond
        began = int(time.time() * 1000)
        await trio.sleep(0.01)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await trio.testing.wait_all_tasks_blocked()
            record_fault(testbed, "local", "node pc1 restart", "cli")
            await broker.poll_store()
            record_fault(testbed, "local", "link a -- s delay 50ms", "cli", time_ms=began, action="link set")
            await broker.poll_store()
            await broker.poll_store()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        return got

    assert trio.run(main) == [("fault", "tb1", "node pc1 restart"), ("fault", "tb1", "link a -- s delay 50ms")]
