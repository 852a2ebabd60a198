"""The HTTP API against a real testbed and a real server: every endpoint answers
its documented schema; tokens and scopes; errors name the field; SSE clients;
node and link writes change the testbed."""

from __future__ import annotations

import json
import socket
import time

import httpx
import jsonschema
import pytest

from .conftest import TESTBED, WebServer, free_port, megafleet_json

pytestmark = [pytest.mark.root, pytest.mark.qemu]


# The guest and link the write tests change (and put back): no other test here
# looks at them, and neither is a router, so OSPF and `verify` are not disturbed
# once they are back.
GUEST, SWITCH = "pc2_3", "staff2"

# Every write of the OpenAPI document with a request that would succeed, and the
# scope it needs.
WRITES = [("/api/v1/exec", "/api/v1/exec", {"testbed": TESTBED, "pattern": GUEST, "argv": ["hostname"]}, "exec"),
          *[("/api/v1/nodes/{name}/{action}", f"/api/v1/nodes/{GUEST}/{action}?testbed={TESTBED}", None, "control")
            for action in ("stop", "start", "restart", "kill")],
          ("/api/v1/links/{action}", "/api/v1/links/set",
           {"testbed": TESTBED, "a": GUEST, "b": SWITCH, "delay": "5ms"}, "control"),
          ("/api/v1/links/{action}", "/api/v1/links/down", {"testbed": TESTBED, "a": GUEST, "b": SWITCH}, "control"),
          ("/api/v1/links/{action}", "/api/v1/links/up", {"testbed": TESTBED, "a": GUEST, "b": SWITCH}, "control"),
          ("/api/v1/verify", "/api/v1/verify", {"testbed": TESTBED}, "control")]


def schema_of(doc: dict, path: str, method: str = "get") -> dict:
    ref = doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    return {**doc["components"]["schemas"][ref.rsplit("/", 1)[1]], "$defs": doc["components"]["schemas"]}


def test_every_read_answers_its_documented_schema(server, campus):
    doc = httpx.get(f"{server.base}/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    checked = []
    for path, url in [("/api/v1/testbeds", "/api/v1/testbeds"),
                      ("/api/v1/testbeds/{testbed}/graph", f"/api/v1/testbeds/{TESTBED}/graph"),
                      ("/api/v1/hosts", "/api/v1/hosts"),
                      ("/api/v1/nodes", f"/api/v1/nodes?testbed={TESTBED}"),
                      ("/api/v1/nodes/{name}", f"/api/v1/nodes/q1?testbed={TESTBED}"),
                      ("/api/v1/links", f"/api/v1/links?testbed={TESTBED}"),
                      ("/api/v1/telemetry/{kind}", "/api/v1/telemetry/boot-times"),
                      ("/api/v1/events", "/api/v1/events")]:
        r = httpx.get(server.base + url, timeout=30)
        assert r.status_code == 200, (url, r.text)
        jsonschema.validate(r.json(), schema_of(doc, path))
        checked.append(path)
    assert len(checked) == len([p for p in doc["paths"] if "get" in doc["paths"][p]]) - 1  # all but the SSE stream

    nodes = httpx.get(f"{server.base}/api/v1/nodes?testbed={TESTBED}").json()["nodes"]
    summary = campus["summary"]
    assert len([n for n in nodes if n["kind"] == "vm"]) == summary["guests"]
    assert {n["state"] for n in nodes if n["kind"] == "vm"} == {"running"}
    q1 = httpx.get(f"{server.base}/api/v1/nodes/q1?testbed={TESTBED}").json()
    assert q1["kind"] == "vm" and q1["ifaces"][0]["addresses"] and "MEGAFLEET-READY" in q1["console_tail"]
    boots = httpx.get(f"{server.base}/api/v1/telemetry/boot-times").json()["rows"]
    assert sum(r["boots"] for r in boots) >= summary["guests"]
    # Traffic per link from telemetry (OSPF hellos at least): the collector samples
    # every 5 s and a rate needs two samples.
    deadline = time.monotonic() + 30
    while True:
        links = httpx.get(f"{server.base}/api/v1/links?testbed={TESTBED}").json()["links"]
        if any(link["traffic_bps"] for link in links) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert any(link["traffic_bps"] for link in links)
    only_pcs = httpx.get(f"{server.base}/api/v1/nodes?testbed={TESTBED}&pattern=pc1_*").json()["nodes"]
    assert sorted(n["name"] for n in only_pcs) == ["pc1_1", "pc1_2", "pc1_3"]

    # The other telemetry queries, each against the document's schema and with
    # this testbed's data in it (its guests' boots; their CPU samples, which the
    # collector has taken by now: the traffic above needed two of its passes).
    rows = {}
    for kind in ("boot-cdf", "ksm", "top-cpu", "top-mem", "net", "events"):
        r = httpx.get(f"{server.base}/api/v1/telemetry/{kind}?limit=0", timeout=30)
        assert r.status_code == 200, (kind, r.text)
        jsonschema.validate(r.json(), schema_of(doc, "/api/v1/telemetry/{kind}"))
        assert r.json()["query"] == kind
        rows[kind] = r.json()["rows"]
    cdf = rows["boot-cdf"]
    assert isinstance(cdf, dict) and sum(len(v) for v in cdf.values()) >= summary["guests"]
    # Non-negative, not positive: a guest whose engine stopped before its ready
    # line is timed by its own uptime at that line (host.settle_guests), which a
    # container may print within /proc/uptime's 10 ms: 0.0.
    assert all(v == sorted(v) and all(d >= 0 for d in v) for v in cdf.values())
    names = {n["name"] for n in nodes if n["kind"] == "vm"}
    busy = [row for row in rows["top-cpu"] if row["guest"] in names]
    assert busy and all(row["cpu_pct"] >= 0 for row in busy), rows["top-cpu"][:5]
    assert {row["guest"] for row in rows["top-mem"]} & names
    assert rows["net"] and all({"host", "iface", "mean_bps"} <= set(row) for row in rows["net"])


def test_bad_input_names_the_field(server):
    cases = [(f"/api/v1/nodes?testbed={TESTBED}&pattern=a/b", 400, "pattern"),
             (f"/api/v1/nodes?testbed={TESTBED}&state=dancing", 400, "state"),
             (f"/api/v1/nodes/nosuchnode?testbed={TESTBED}", 404, "node"),
             ("/api/v1/nodes?testbed=nosuchbed", 404, "testbed"),
             ("/api/v1/telemetry/nosuchquery", 404, "query"),
             ("/api/v1/telemetry/ksm?window=-1", 400, "window")]
    for url, status, field in cases:
        r = httpx.get(server.base + url)
        assert (r.status_code, r.json()["field"]) == (status, field), (url, r.text)
    r = httpx.post(f"{server.base}/api/v1/exec", content=b"not json",
                   headers={"Authorization": f"Bearer {server.info['tokens']['exec']}"})
    assert (r.status_code, r.json()["field"]) == (400, "body")
    r = httpx.post(f"{server.base}/api/v1/exec", json={"pattern": "pc1_1", "argv": "hostname"},
                   headers={"Authorization": f"Bearer {server.info['tokens']['exec']}"})
    assert (r.status_code, r.json()["field"]) == (400, "argv")


def test_every_write_needs_a_token_with_its_scope_on_loopback(server):
    """On loopback reads are open, but no write is: without a token, or with one
    whose scopes do not include the write's, each answers 403 naming the
    authorization, and changes nothing."""
    doc = httpx.get(f"{server.base}/api/v1/openapi.json").json()
    posts = {p: op["post"]["x-scope"] for p, op in doc["paths"].items() if "post" in op}
    assert {(path, scope) for path, _, _, scope in WRITES} == set(posts.items())
    (before,) = megafleet_json("vm", "ls", GUEST)
    assert before["state"] == "running"
    for _, url, body, scope in WRITES:
        refused = [None, "read"] + (["control"] if scope == "exec" else [])
        for level in refused:
            r = httpx.post(server.base + url, json=body, headers=server.bearer(level) if level else {})
            assert (r.status_code, r.json()["field"]) == (403, "authorization"), (url, level, r.text)
            assert scope in r.json()["error"]
    (after,) = megafleet_json("vm", "ls", GUEST)
    assert (after["state"], after["pid"]) == ("running", before["pid"])
    link = [row for row in megafleet_json("link", "show", TESTBED) if row["link"] == f"{GUEST} -- {SWITCH}"]
    assert [(row["state"], row["changed"]) for row in link] == [("up", False)]
    # Reads need nothing; the exec token runs commands.
    assert httpx.get(f"{server.base}/api/v1/hosts").status_code == 200
    r = httpx.post(f"{server.base}/api/v1/exec", json=WRITES[0][2], headers=server.bearer("exec"), timeout=60)
    assert r.status_code == 200 and r.json()["nodes"][0]["stdout"].strip() == GUEST
    jsonschema.validate(r.json(), schema_of(doc, "/api/v1/exec", "post"))
    # A token the server does not know is not anonymous: 401.
    assert httpx.get(f"{server.base}/api/v1/hosts", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_non_loopback_bind_needs_a_token(campus):
    port = free_port()
    web = WebServer("--listen", f"0.0.0.0:{port}")        # every address: not loopback-only
    try:
        assert web.info["loopback"] is False
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/api/v1/testbeds").status_code == 401
        assert httpx.post(f"{base}/api/v1/verify", json={"testbed": TESTBED}).status_code == 401
        read = {"Authorization": f"Bearer {web.info['tokens']['read']}"}
        assert httpx.get(f"{base}/api/v1/testbeds", headers=read).status_code == 200
        r = httpx.post(f"{base}/api/v1/verify", json={"testbed": TESTBED}, headers=read)
        assert r.status_code == 403
        # The one-time login link gives a session cookie, once.
        login = web.info["login"].replace(f"0.0.0.0:{port}", f"127.0.0.1:{port}")
        with httpx.Client() as client:
            r = client.get(login, follow_redirects=False)
            assert r.status_code == 303
            assert client.get(f"{base}/api/v1/testbeds").status_code == 200
        assert httpx.get(login, follow_redirects=False).status_code == 401
    finally:
        web.stop()


def test_a_thousand_sse_clients_are_held(server):
    """1,000 clients open the stream at once; each gets the stream's first frame,
    and a change published afterwards reaches them all."""
    host, port = "127.0.0.1", int(server.base.rsplit(":", 1)[1])
    request = (f"GET /api/v1/events/stream HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n").encode()
    socks = []
    try:
        for _ in range(1000):
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(request)
            socks.append(s)
        held = 0
        for s in socks:
            data = b""
            while b"megafleet events" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            held += b"200" in data.split(b"\r\n", 1)[0] and b"megafleet events" in data
        assert held == 1000
        # One exec publishes one event: every client sees it.
        r = httpx.post(f"{server.base}/api/v1/exec", timeout=60,
                       json={"testbed": TESTBED, "pattern": "pc1_1", "argv": ["true"]},
                       headers={"Authorization": f"Bearer {server.info['tokens']['exec']}"})
        assert r.status_code == 200
        got = 0
        for s in socks:
            data = b""
            s.settimeout(10)
            while b"event: exec" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            got += b"event: exec" in data
        assert got == 1000
    finally:
        for s in socks:
            s.close()


def test_bad_writes_name_the_field_and_verify_passes(server):
    base, control = server.base, server.bearer("control")
    # Bad references and values: 400 with the field, nothing changed.
    r = httpx.post(f"{base}/api/v1/links/set", json={"testbed": TESTBED, "a": "dist1", "b": "nosuch",
                                                     "delay": "5ms"}, headers=control, timeout=60)
    assert (r.status_code, r.json()["field"]) == (400, "link"), r.text
    r = httpx.post(f"{base}/api/v1/links/set", json={"testbed": TESTBED, "a": "dist1", "b": "core",
                                                     "delay": "-5ms"}, headers=control, timeout=60)
    assert (r.status_code, r.json()["field"]) == (400, "delay"), r.text
    r = httpx.post(f"{base}/api/v1/nodes/nosuch/restart?testbed={TESTBED}", headers=control, timeout=60)
    assert (r.status_code, r.json()["field"]) == (400, "node"), r.text
    assert httpx.post(f"{base}/api/v1/nodes/www1/explode?testbed={TESTBED}", headers=control).status_code == 404
    links = httpx.get(f"{base}/api/v1/links?testbed={TESTBED}").json()["links"]
    assert all(link["state"] == "up" for link in links)
    # verify: the description's reachable assertions, live.
    r = httpx.post(f"{base}/api/v1/verify", json={"testbed": TESTBED}, headers=control, timeout=120)
    assert r.status_code == 200, r.text
    doc = httpx.get(f"{base}/api/v1/openapi.json").json()
    jsonschema.validate(r.json(), schema_of(doc, "/api/v1/verify", "post"))
    result = r.json()["result"]
    assert result["ok"] and result["checks"] > 0 and result["passed"] == result["checks"], result


def test_node_writes_stop_start_restart_and_kill_the_guest(server):
    """Each node action through the API, with a control token, does to the guest
    what `megafleet node` does: `vm ls` (which checks /proc) sees it stopped,
    running again under a new process, and so on; the API's own view follows."""
    doc = httpx.get(f"{server.base}/api/v1/openapi.json").json()
    schema = schema_of(doc, "/api/v1/nodes/{name}/{action}", "post")
    control = server.bearer("control")

    def act(action: str) -> dict:
        r = httpx.post(f"{server.base}/api/v1/nodes/{GUEST}/{action}?testbed={TESTBED}", headers=control,
                       timeout=120)
        assert r.status_code == 200, (action, r.text)
        jsonschema.validate(r.json(), schema)
        assert [(row["node"], row["action"]) for row in r.json()["result"]] == [(GUEST, action)]
        (row,) = megafleet_json("vm", "ls", GUEST)
        return row

    def api_state_becomes(wanted: set[str]) -> str:
        # The API answers from the broker's poll (every 0.5 s here).
        deadline = time.monotonic() + 10
        while True:
            got = httpx.get(f"{server.base}/api/v1/nodes/{GUEST}?testbed={TESTBED}").json()["state"]
            if got in wanted or time.monotonic() > deadline:
                return got
            time.sleep(0.3)

    (first,) = megafleet_json("vm", "ls", GUEST)
    assert first["state"] == "running" and first["pid"]
    try:
        stopped = act("stop")
        assert stopped["state"] != "running" and stopped["pid"] is None, stopped
        assert api_state_becomes({"stopped", "exited"}) in ("stopped", "exited")
        started = act("start")
        assert started["state"] == "running" and started["pid"] not in (None, first["pid"]), started
        assert api_state_becomes({"running"}) == "running"
        restarted = act("restart")
        assert restarted["state"] == "running" and restarted["pid"] not in (None, started["pid"]), restarted
        killed = act("kill")
        assert killed["state"] != "running" and killed["pid"] is None, killed
        assert api_state_becomes({"exited", "failed", "stopped"}) in ("exited", "failed", "stopped")
    finally:
        (row,) = megafleet_json("vm", "ls", GUEST)
        if row["state"] != "running":
            act("start")
    assert api_state_becomes({"running"}) == "running"


def test_link_writes_set_down_and_up_the_link(server):
    """link set, down and up through the API, with a control token: `megafleet
    link show` sees the settings and the cable's state, and so does the API's
    /links (the settings the link runs with, not the description's); cleared,
    the settings go again and /links shows the description's."""
    doc = httpx.get(f"{server.base}/api/v1/openapi.json").json()
    schema = schema_of(doc, "/api/v1/links/{action}", "post")
    control = server.bearer("control")
    label = f"{GUEST} -- {SWITCH}"

    def act(action: str, **props: str) -> dict:
        r = httpx.post(f"{server.base}/api/v1/links/{action}", headers=control, timeout=60,
                       json={"testbed": TESTBED, "a": GUEST, "b": SWITCH, **props})
        assert r.status_code == 200, (action, r.text)
        jsonschema.validate(r.json(), schema)
        assert [row["link"] for row in r.json()["result"]] == [label]
        return r.json()["result"][0]

    def shown() -> dict:
        (row,) = [row for row in megafleet_json("link", "show", TESTBED) if row["link"] == label]
        return row

    def api_link() -> dict:
        r = httpx.get(f"{server.base}/api/v1/links?testbed={TESTBED}", timeout=30)
        jsonschema.validate(r.json(), schema_of(doc, "/api/v1/links"))
        (link,) = [link for link in r.json()["links"] if (link["a"], link["b"]) == (GUEST, SWITCH)]
        return link

    assert shown()["settings"] == {} and not shown()["changed"]
    described = api_link()["props"]
    assert not {"delay_us", "jitter_us", "loss_pct", "rate_bit"} & set(described), described
    new = {"delay_us": 20000, "loss_pct": 1.0, "rate_bit": 10_000_000}
    try:
        assert act("set", delay="20ms", loss="1%", rate="10mbit")["settings"] == new
        row = shown()
        assert row["changed"] and row["settings"] == new, row
        assert api_link()["props"] == {**described, **new}
        assert act("down")["state"] == "down"
        assert shown()["state"] == "down"
        assert (api_link()["state"], api_link()["props"]) == ("down", {**described, **new})
        assert act("up")["state"] == "up"
        assert shown()["state"] == "up"
    finally:
        act("set", delay="none", loss="none", rate="none")
    assert shown()["settings"] == {}
    link = api_link()
    assert (link["state"], link["props"]) == ("up", described), link
    # Traffic crosses the link again: the guest reaches www1 (verify pings it).
    r = httpx.post(f"{server.base}/api/v1/verify", json={"testbed": TESTBED}, headers=control, timeout=120)
    assert r.status_code == 200 and r.json()["result"]["ok"], r.text
