"""The dashboard in a real headless Chromium (Debian's, driven by Playwright):
the graph shows every node, a killed guest turns red with no reload, the
boot-time plot draws. Each test saves a screenshot in its temporary directory."""

from __future__ import annotations

import os

import httpx
import pytest

from .conftest import CHROMIUM, CHROMIUM_ARGS, TESTBED, megafleet

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.browser]


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


@pytest.fixture
def page(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{server.base}/?testbed={TESTBED}")
    page.wait_for_function("window.megafleet && window.megafleet.drawnAt !== null", timeout=30000)
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


def test_killed_guest_turns_failed_without_reload(page, tmp_path):
    colour = "window.megafleet.graph.getNodeAttribute('www2', 'color')"
    assert page.evaluate(colour) == "#2e9e44"
    page.evaluate("window.__marker = 1")                     # gone if the page reloaded
    megafleet("vm", "kill", "www2")
    # How fast is bench/web.py's figure (event to screen); here only that it
    # arrives by the event stream, with room for a loaded CI machine.
    page.wait_for_function(f"{colour} === '#d0312d'", timeout=30000)
    assert page.evaluate("window.__marker") == 1
    assert page.evaluate("window.megafleet.graph.getNodeAttribute('www2', 'state')") in ("exited", "failed", "stopped")
    page.screenshot(path=str(tmp_path / "killed.png"))


def test_boot_time_plot_draws(page, tmp_path):
    page.click("a[data-tab=plots]")
    page.wait_for_selector("#plot-boot canvas", timeout=10000)
    assert page.evaluate("window.megafleet.plots").count("plot-boot") == 1
    page.screenshot(path=str(tmp_path / "plots.png"))


def test_link_down_from_the_api_shows_on_the_graph(page, server, tmp_path):
    """dist1's core link taken down through the API turns red on the open page;
    up again, it is grey again."""
    edge = ("window.megafleet.graph.edges('dist1', 'core')"
            ".map(e => window.megafleet.graph.getEdgeAttribute(e, 'color'))")
    assert page.evaluate(edge) == ["#c4c4c4"]
    body = {"testbed": TESTBED, "a": "dist1", "b": "core"}
    try:
        r = httpx.post(f"{server.base}/api/v1/links/down", json=body, timeout=60)
        assert r.status_code == 200, r.text
        page.wait_for_function(f"{edge}[0] === '#d0312d'", timeout=30000)
        page.screenshot(path=str(tmp_path / "link-down.png"))
    finally:
        r = httpx.post(f"{server.base}/api/v1/links/up", json=body, timeout=60)
    assert r.status_code == 200, r.text
    page.wait_for_function(f"{edge}[0] === '#c4c4c4'", timeout=30000)
