"""The dashboard in a real headless Chromium (Debian's, driven by Playwright),
logged in as a user is: by opening the one-time login link `megafleet web`
printed at start. The graph shows every node; the hosts, events and node pages
show their data; the node page's exec form runs a command only with the exec
scope; the boot-time plot draws; a link taken down or given a delay through
the API and a killed guest show with no reload. Each test saves a screenshot
in its temporary directory."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from .conftest import CHROMIUM, CHROMIUM_ARGS, TESTBED, megafleet

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.browser]

VIEWPORT = {"width": 1280, "height": 800}
GREEN, RED = "#2e9e44", "#d0312d"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no /usr/bin/chromium (scripts/setup installs it)")
    import asyncio

    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs its own asyncio loop. trio_asyncio (the SSH
    # transport's adapter, imported by other tests in this process) replaces
    # asyncio's loop policy with one whose loops cannot be driven that way, so
    # the browser gets the default policy while it runs.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield b
            b.close()
    finally:
        asyncio.set_event_loop_policy(policy)


@pytest.fixture(scope="module")
def session(browser, server):
    """A browser context that opened the login link: it lands on the dashboard
    with a session cookie (every scope), and the link is spent."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    response = page.goto(server.info["login"])
    assert response is not None and response.ok
    assert page.url == f"{server.base}/"
    (cookie,) = [c for c in context.cookies() if c["name"] == "megafleet_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.close()
    r = httpx.get(server.info["login"], follow_redirects=False)
    assert (r.status_code, r.json()["field"]) == (401, "once")
    yield context
    context.close()


def open_dashboard(context, server):
    page = context.new_page()
    page.goto(f"{server.base}/?testbed={TESTBED}")
    page.wait_for_function("window.megafleet && window.megafleet.drawnAt !== null", timeout=30000)
    return page


@pytest.fixture
def page(session, server, tmp_path):
    page = open_dashboard(session, server)
    yield page
    page.screenshot(path=str(tmp_path / "page.png"))
    page.close()


def test_graph_shows_every_node(page, server):
    topo = httpx.get(f"{server.base}/api/v1/testbeds/{TESTBED}/graph").json()
    assert topo["collapsed"] is False
    shown = set(page.evaluate("window.megafleet.graph.nodes()"))
    assert shown == {n["id"] for n in topo["nodes"]}
    assert {"core", "dist1", "edge", "q1", "pc1_1", "www1", "monitor"} <= shown
    assert page.evaluate("window.megafleet.graph.size") == len(topo["links"])


ROWS = "[...document.querySelectorAll('{table} tr')].map(tr => [...tr.cells].map(td => td.textContent))"


def test_hosts_page_shows_nodes_by_state(page, server, tmp_path):
    """The testbed's row on the hosts page: its host, its nodes by state and
    failures as the API gives them, this machine's memory."""
    page.click("a[data-tab=hosts]")
    rows = ROWS.format(table="#hosts-table")
    page.wait_for_function(f"{rows}.some(r => r[1] === {json.dumps(TESTBED)})", timeout=15000)
    (shown,) = [r for r in page.evaluate(rows) if len(r) > 1 and r[1] == TESTBED]
    page.screenshot(path=str(tmp_path / "hosts.png"))
    (host,) = [h for h in httpx.get(f"{server.base}/api/v1/hosts").json()
               if any(b["testbed"] == TESTBED for b in h["testbeds"])]
    (bed,) = [b for b in host["testbeds"] if b["testbed"] == TESTBED]
    assert shown[0] == host["host"]
    counts = {state: int(n) for n, state in (part.split(" ", 1) for part in shown[2].split(", "))}
    assert counts == bed["nodes"]
    guests = len([n for n in httpx.get(f"{server.base}/api/v1/nodes?testbed={TESTBED}").json()["nodes"]
                  if n["kind"] == "vm"])
    assert bed["nodes"].get("running", 0) >= guests
    assert shown[3] == str(bed["failed"])
    assert shown[4].endswith(" MB") and "/" in shown[4]


def test_events_page_shows_a_new_event(page, server, tmp_path):
    """An exec through the API is an event: it appears on the open events page."""
    page.click("a[data-tab=events]")
    marker = f"mark{time.time_ns()}"
    r = httpx.post(f"{server.base}/api/v1/exec", headers=server.bearer("exec"), timeout=60,
                   json={"testbed": TESTBED, "pattern": "pc1_2", "argv": ["echo", marker]})
    assert r.status_code == 200, r.text
    rows = ROWS.format(table="#events-table tbody")
    page.wait_for_function(f"{rows}.some(r => r[4].includes({json.dumps(marker)}))", timeout=5000)
    (row,) = [r for r in page.evaluate(rows) if marker in r[4]]
    page.screenshot(path=str(tmp_path / "events.png"))
    (event,) = [e for e in httpx.get(f"{server.base}/api/v1/events").json()["events"]
                if marker in e["data"].get("argv", [])]
    assert row[0] == str(event["id"]) and row[2:4] == ["exec", TESTBED]
    assert "pattern=pc1_2" in row[4]


def show_node(page, name: str) -> None:
    """Open a node's page as a user does: type its name in the find box."""
    page.fill("#find", name)
    page.press("#find", "Enter")
    page.wait_for_function(f"document.getElementById('node-name').textContent.startsWith({json.dumps(name + ' ')})",
                           timeout=10000)
    assert page.is_visible("#node")


def run_exec(page, command: str, token: str = "") -> str:
    """The node page's exec form, filled in and submitted; what it shows."""
    page.fill("#exec-cmd", command)
    page.fill("#exec-token", token)
    page.evaluate("document.getElementById('exec-out').textContent = ''")
    page.click("#exec-form button[type=submit]")
    page.wait_for_function("document.getElementById('exec-out').textContent !== ''", timeout=60000)
    return page.inner_text("#exec-out")


def test_node_page_shows_addresses_console_and_runs_exec(page, browser, server, tmp_path):
    """q1's page: its addresses and console tail as the API has them; its exec
    form runs `hostname` with the exec scope (a typed exec token, or the login
    link's session) and is refused with a read token or with neither."""
    detail = httpx.get(f"{server.base}/api/v1/nodes/q1?testbed={TESTBED}").json()
    addresses = [a for iface in detail["ifaces"] for a in iface["addresses"]]
    assert addresses
    show_node(page, "q1")
    assert page.inner_text("#node-name") == "q1 (vm)"
    body = page.inner_text("#node-body")
    assert all(a in body for a in addresses), (addresses, body)
    console = page.inner_text("#node-body pre").strip()
    # The tail may have grown since the API was asked: the page's last line is
    # still in the API's tail of now.
    later = httpx.get(f"{server.base}/api/v1/nodes/q1?testbed={TESTBED}").json()["console_tail"]
    assert "MEGAFLEET-READY" in console and console.splitlines()[-1] in later
    page.screenshot(path=str(tmp_path / "node.png"))

    out = run_exec(page, "hostname", server.info["tokens"]["exec"])
    assert out.split("\n")[:2] == ["exit 0", "q1"], out
    out = run_exec(page, "hostname", server.info["tokens"]["read"])       # the typed token wins
    assert out.startswith("Error: 403") and "exec" in out, out
    out = run_exec(page, "hostname")                                     # the session allows exec
    assert out.split("\n")[:2] == ["exit 0", "q1"], out
    page.screenshot(path=str(tmp_path / "exec.png"))

    # A browser that never opened the login link reads, but cannot exec.
    anonymous = browser.new_context(viewport=VIEWPORT)
    try:
        other = open_dashboard(anonymous, server)
        show_node(other, "q1")
        out = run_exec(other, "hostname")
        assert out.startswith("Error: 403") and "exec" in out, out
        other.screenshot(path=str(tmp_path / "exec-refused.png"))
    finally:
        anonymous.close()


def test_boot_time_plot_draws(page, tmp_path):
    page.click("a[data-tab=plots]")
    page.wait_for_selector("#plot-boot canvas", timeout=10000)
    assert page.evaluate("window.megafleet.plots").count("plot-boot") == 1
    page.screenshot(path=str(tmp_path / "plots.png"))


def test_link_down_from_the_api_shows_on_the_graph(page, server, tmp_path):
    """dist1's core link taken down through the API (with a control token)
    turns red on the open page; up again, it is grey again."""
    edge = ("window.megafleet.graph.edges('dist1', 'core')"
            ".map(e => window.megafleet.graph.getEdgeAttribute(e, 'color'))")
    assert page.evaluate(edge) == ["#c4c4c4"]
    body = {"testbed": TESTBED, "a": "dist1", "b": "core"}
    control = server.bearer("control")
    try:
        r = httpx.post(f"{server.base}/api/v1/links/down", json=body, headers=control, timeout=60)
        assert r.status_code == 200, r.text
        page.wait_for_function(f"{edge}[0] === '{RED}'", timeout=30000)
        page.screenshot(path=str(tmp_path / "link-down.png"))
    finally:
        r = httpx.post(f"{server.base}/api/v1/links/up", json=body, headers=control, timeout=60)
    assert r.status_code == 200, r.text
    page.wait_for_function(f"{edge}[0] === '#c4c4c4'", timeout=30000)


def test_link_set_shows_its_delay_within_2_s(page, server, tmp_path):
    """`link set pc1_3 -- staff1 delay 50ms` through the API: within 2 s of its
    answer (the link runs with it by then), with no reload, the open page labels
    the link with the new delay and draws it impaired, and pc1_3's open node
    page shows it in its links. Cleared by `megafleet link set ... delay none`
    (the CLI: the page hears of it from the telemetry store's fault event), both
    go back to the description's within 2 s of the command's end. The stream
    stayed live all along."""
    edge = ("window.megafleet.graph.edges('pc1_3', 'staff1')"
            ".map(e => window.megafleet.graph.getEdgeAttributes(e))")
    (before,) = page.evaluate(edge)
    assert "delay" not in before["label"] and before["color"] == "#c4c4c4", before
    show_node(page, "pc1_3")
    assert "delay" not in page.inner_text("#node-body")
    page.evaluate("window.__marker = 1")                     # gone if the page reloaded
    shows = (f"{edge}.some(a => a.label.includes('delay 50ms') && a.color === '#e08000')"
             " && document.getElementById('node-body').textContent.includes('delay 50ms')")
    cleared = (f"{edge}.every(a => !a.label.includes('delay') && a.color === '#c4c4c4')"
               " && !document.getElementById('node-body').textContent.includes('delay')")

    def within_2_s(condition: str, since: float, name: str) -> None:
        try:
            page.wait_for_function(condition, timeout=2000)
        except Exception:
            page.screenshot(path=str(tmp_path / f"{name}-late.png"))
            raise AssertionError(f"{name}: 2 s on the page shows {page.evaluate(edge)}") from None
        took = time.monotonic() - since
        assert took <= 2.0, (name, took)
        page.screenshot(path=str(tmp_path / f"{name}.png"))

    body = {"testbed": TESTBED, "a": "pc1_3", "b": "staff1", "delay": "50ms"}
    r = httpx.post(f"{server.base}/api/v1/links/set", json=body, headers=server.bearer("control"), timeout=60)
    try:
        assert r.status_code == 200, r.text
        within_2_s(shows, time.monotonic(), "link-set")
    finally:
        megafleet("link", "set", "pc1_3", "--", "staff1", "delay", "none", "-t", TESTBED)
    within_2_s(cleared, time.monotonic(), "link-cleared")
    assert page.evaluate("window.__marker") == 1
    assert page.inner_text("#live") == "● live"


# Last in the file: www2 stays dead until the testbed goes down.
def test_killed_guest_turns_failed_within_5_s_without_reload(page, tmp_path):
    """`megafleet node kill www2`, as a user runs it: on the open page www2 is
    red within 5 s of the command's start, and the page was not reloaded."""
    colour = "window.megafleet.graph.getNodeAttribute('www2', 'color')"
    assert page.evaluate(colour) == GREEN
    page.evaluate("window.__marker = 1")                     # gone if the page reloaded
    start = time.monotonic()
    megafleet("node", "kill", "www2", "-t", TESTBED)
    left = 5.0 - (time.monotonic() - start)
    assert left > 0, f"megafleet node kill alone took {5.0 - left:.1f} s"
    try:
        page.wait_for_function(f"{colour} === '{RED}'", timeout=left * 1000)
    except Exception:
        page.screenshot(path=str(tmp_path / "killed-late.png"))
        raise AssertionError(f"www2 is {page.evaluate(colour)} {time.monotonic() - start:.1f} s after the kill, "
                             f"not {RED}") from None
    took = time.monotonic() - start
    assert took <= 5.0, took
    assert page.evaluate("window.__marker") == 1
    assert page.evaluate("window.megafleet.graph.getNodeAttribute('www2', 'state')") in ("exited", "failed",
                                                                                           "stopped", "killed")
    page.screenshot(path=str(tmp_path / "killed.png"))
