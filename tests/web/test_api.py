"""The HTTP API against a real testbed and a real server: every endpoint answers
its documented schema; tokens and scopes; errors name the field; SSE clients."""

from __future__ import annotations

import json
import socket
import time

import httpx
import jsonschema
import pytest

from .conftest import TESTBED, WebServer, free_port

pytestmark = [pytest.mark.root, pytest.mark.qemu]


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


def test_scopes_on_loopback(server):
    tokens = server.info["tokens"]
    body = {"testbed": TESTBED, "pattern": "pc1_1", "argv": ["hostname"]}
    # exec always needs a token that allows it; read-only and control tokens get 403.
    assert httpx.post(f"{server.base}/api/v1/exec", json=body).status_code == 403
    for level in ("read", "control"):
        r = httpx.post(f"{server.base}/api/v1/exec", json=body, headers={"Authorization": f"Bearer {tokens[level]}"})
        assert r.status_code == 403, level
    r = httpx.post(f"{server.base}/api/v1/exec", json=body, headers={"Authorization": f"Bearer {tokens['exec']}"},
                   timeout=60)
    assert r.status_code == 200 and r.json()["nodes"][0]["stdout"].strip() == "pc1_1"
    # A read-only token may not control either.
    r = httpx.post(f"{server.base}/api/v1/verify", json={"testbed": TESTBED},
                   headers={"Authorization": f"Bearer {tokens['read']}"})
    assert r.status_code == 403 and r.json()["field"] == "authorization"
    assert httpx.get(f"{server.base}/api/v1/hosts", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_non_loopback_bind_needs_a_token(campus):
    port = free_port()
    web = WebServer("--listen", f"0.0.0.0:{port}")        # every address: not loopback-only
    try:
        assert web.info["loopback"] is False
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/api/v1/testbeds").status_code == 401
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


def test_writes_change_the_testbed_and_bad_ones_name_the_field(server):
    base = server.base
    # Bad references and values: 400 with the field, nothing changed.
    r = httpx.post(f"{base}/api/v1/links/set", json={"testbed": TESTBED, "a": "dist1", "b": "nosuch",
                                                     "delay": "5ms"}, timeout=60)
    assert (r.status_code, r.json()["field"]) == (400, "link"), r.text
    r = httpx.post(f"{base}/api/v1/links/set", json={"testbed": TESTBED, "a": "dist1", "b": "core",
                                                     "delay": "-5ms"}, timeout=60)
    assert (r.status_code, r.json()["field"]) == (400, "delay"), r.text
    r = httpx.post(f"{base}/api/v1/nodes/nosuch/restart?testbed={TESTBED}", timeout=60)
    assert (r.status_code, r.json()["field"]) == (400, "node"), r.text
    assert httpx.post(f"{base}/api/v1/nodes/www1/explode?testbed={TESTBED}").status_code == 404
    links = httpx.get(f"{base}/api/v1/links?testbed={TESTBED}").json()["links"]
    assert all(link["state"] == "up" for link in links)
    # verify: the description's reachable assertions, live.
    r = httpx.post(f"{base}/api/v1/verify", json={"testbed": TESTBED}, timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["ok"] and result["checks"] > 0 and result["passed"] == result["checks"], result
