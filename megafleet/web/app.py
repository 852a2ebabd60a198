"""The dashboard's HTTP API and pages: a Starlette app (ASGI), served on trio by
Hypercorn (`megafleet web`).

Every read answers from `state` (the functions behind `megafleet status` and
`megafleet telemetry`) and the broker's latest poll; every write calls the same
function the CLI command calls. Errors are JSON: {"error": MESSAGE, "field": NAME}
with 400 (bad input), 401/403 (auth), 404 (unknown testbed, node, query).
The document at /api/v1/openapi.json describes every endpoint and its schema.
"""

from __future__ import annotations

import fnmatch
import json
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from megafleet.web import state
from megafleet.web.auth import COOKIE, Auth, AuthError
from megafleet.web.events import Broker
from megafleet.web.openapi import document

if TYPE_CHECKING:
    from megafleet.experiment.hostside import ChangedLink

STATIC = resources.files("megafleet.web") / "static"
PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,128}$")
NODE_ACTIONS = ("stop", "start", "restart", "kill")
LINK_ACTIONS = ("set", "down", "up")


class BadRequest(Exception):
    def __init__(self, field_name: str, message: str, status: int = 400):
        super().__init__(message)
        self.field = field_name
        self.status = status


def error(status: int, message: str, field_name: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field_name}, status_code=status)


def create_app(auth: Auth, broker: Broker) -> Starlette:
    """The ASGI app. The caller runs `broker.run()` beside the server."""

    def guarded(need: str, fn):
        async def endpoint(request: Request) -> Response:
            try:
                auth.check(need, request.headers.get("authorization"), request.cookies.get(COOKIE))
                return await fn(request)
            except AuthError as exc:
                return error(exc.status, str(exc), "authorization")
            except BadRequest as exc:
                return error(exc.status, str(exc), exc.field)
            except state.NotFound as exc:
                return error(404, str(exc), exc.field)
        return endpoint

    def read(path: str, fn) -> Route:
        return Route(path, guarded("read", fn), methods=["GET"])

    def write(path: str, need: str, fn) -> Route:
        return Route(path, guarded(need, fn), methods=["POST"])

    # -- helpers ---------------------------------------------------------------

    async def testbed_of(request: Request) -> state.TestbedInfo:
        name = request.path_params.get("testbed") or request.query_params.get("testbed")
        beds = await trio.to_thread.run_sync(state.testbeds)
        if name:
            for t in beds:
                if t.name == name:
                    return t
            raise state.NotFound("testbed", name)
        if len(beds) == 1:
            return beds[0]
        raise BadRequest("testbed", "name the testbed (?testbed=NAME): "
                         + (f"{len(beds)} are up" if beds else "none is up"))

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("body", "the body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("body", "the body must be a JSON object")
        return data

    def pattern_of(value: Any, field_name: str = "pattern") -> str:
        if not isinstance(value, str) or not PATTERN_RE.match(value):
            raise BadRequest(field_name, f"{field_name} {value!r}: a glob of letters, digits, _ . - * ? [ ] !")
        return value

    async def snapshot() -> Any:
        return await broker.wait_fresh()

    # -- reads -----------------------------------------------------------------

    async def testbeds(request: Request) -> Response:
        beds = await trio.to_thread.run_sync(state.testbeds)
        return JSONResponse([{"name": t.name, "source": t.source, "hosts": t.hosts, "started": t.started,
                              "summary": t.summary} for t in beds])

    async def graph(request: Request) -> Response:
        t = await testbed_of(request)
        choices: dict[str, bool | None] = {"auto": None, "yes": True, "no": False}
        wanted = request.query_params.get("collapse", "auto")
        if wanted not in choices:
            raise BadRequest("collapse", "collapse: one of auto, yes, no")
        collapse = choices[wanted]
        expand = frozenset(x for x in request.query_params.get("expand", "").split(",") if x)
        snap = await snapshot()
        topo = await trio.to_thread.run_sync(
            lambda: state.topology(t, snap.bad.get(t.name, {}), collapse=collapse,
                                   runtime=_runtime_links(t.name), expand=expand,
                                   traffic=None if t.planned else state.link_traffic(t.name)))
        return JSONResponse(topo.to_json())

    async def hosts(request: Request) -> Response:
        snap = await snapshot()
        return JSONResponse(await trio.to_thread.run_sync(state.hosts_view, snap.hosts))

    async def nodes(request: Request) -> Response:
        t = await testbed_of(request)
        pattern = pattern_of(request.query_params.get("pattern", "*"))
        wanted_state = request.query_params.get("state")
        if wanted_state is not None and wanted_state not in state.HEALTH:
            raise BadRequest("state", f"state {wanted_state!r}: one of {', '.join(state.HEALTH)}")
        snap = await snapshot()
        topo = await trio.to_thread.run_sync(
            lambda: state.topology(t, snap.bad.get(t.name, {}), collapse=False))
        rows = [{"name": n.name, "kind": n.kind, "host": n.host, "state": n.state, "group": n.group,
                 "addresses": n.addresses} for n in topo.nodes
                if n.kind != "switch" and fnmatch.fnmatchcase(n.name, pattern)
                and (wanted_state is None or n.state == wanted_state)]
        return JSONResponse({"testbed": t.name, "nodes": rows})

    async def node(request: Request) -> Response:
        t = await testbed_of(request)
        name = pattern_of(request.path_params["name"], "node")
        snap = await snapshot()
        detail = await trio.to_thread.run_sync(
            lambda: state.node_detail(t, name, snap.bad.get(t.name, {}), _runtime_links(t.name)))
        return JSONResponse(detail)

    async def links(request: Request) -> Response:
        t = await testbed_of(request)
        snap = await snapshot()
        topo = await trio.to_thread.run_sync(
            lambda: state.topology(t, snap.bad.get(t.name, {}), collapse=False,
                                   runtime=_runtime_links(t.name),
                                   traffic=None if t.planned else state.link_traffic(t.name)))
        return JSONResponse({"testbed": t.name, "links": [
            {"a": link.a, "b": link.b, "kind": link.kind, "iface": link.iface, "props": link.props,
             "state": link.state, "traffic_bps": link.traffic_bps} for link in topo.links]})

    async def telemetry(request: Request) -> Response:
        kind = request.path_params["kind"]
        if kind not in state.TELEMETRY_KINDS:
            raise state.NotFound("query", kind)
        try:
            window = float(request.query_params.get("window", "3600"))
            limit = int(request.query_params.get("limit", "10"))
        except ValueError:
            raise BadRequest("window", "window (seconds) and limit must be numbers") from None
        if window <= 0 or limit < 0:
            raise BadRequest("window", "window must be > 0 and limit >= 0")
        rows = await trio.to_thread.run_sync(state.telemetry_query, kind, window, limit)
        return JSONResponse({"query": kind, "window_s": window, "rows": rows})

    async def events(request: Request) -> Response:
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            raise BadRequest("after", "after: an event id (integer)") from None
        return JSONResponse({"events": [e.to_json() for e in broker.history if e.id > after]})

    async def stream(request: Request) -> Response:
        send, receive = broker.subscribe()
        try:
            after = int(request.headers.get("last-event-id") or request.query_params.get("after") or 0)
        except ValueError:
            after = 0

        async def frames():
            try:
                yield ": megafleet events\nretry: 1000\n\n"
                for e in list(broker.history):
                    if after and e.id > after:
                        yield _sse(e)
                async with receive:
                    while True:
                        with trio.move_on_after(15) as idle:
                            e = await receive.receive()
                        if idle.cancelled_caught:
                            yield ": keep-alive\n\n"     # proxies close silent streams
                            continue
                        yield _sse(e)
            finally:
                broker.unsubscribe(send)
        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(document())

    # -- writes ----------------------------------------------------------------

    async def exec_(request: Request) -> Response:
        data = await body(request)
        pattern = pattern_of(data.get("pattern"))
        argv = data.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise BadRequest("argv", "argv: a non-empty list of strings (the command, word by word)")
        timeout = data.get("timeout", 30)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
            raise BadRequest("timeout", "timeout: seconds, more than 0 and at most 3600")
        t = await testbed_of(request) if data.get("testbed") is None else state.testbed(data["testbed"])
        from megafleet.up import Output, exec_on

        result = await exec_on(pattern, argv, t.name, None, Output(quiet=True), float(timeout))
        if not result.nodes and not result.host_errors:
            raise state.NotFound("pattern", pattern)
        broker.publish("exec", t.name, pattern=pattern, argv=argv, nodes=len(result.nodes))
        return JSONResponse(result.to_json())

    async def node_action(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in NODE_ACTIONS:
            raise state.NotFound("action", action)
        t = await testbed_of(request)
        pattern = pattern_of(request.path_params["name"], "node")
        try:
            result = await _control().node_action(t.name, action, pattern)
        except ValueError as exc:
            raise BadRequest(getattr(exc, "field", "node"), str(exc)) from None
        broker.publish("fault", t.name, action=f"node {action}", target=pattern)
        return JSONResponse({"testbed": t.name, "action": action, "pattern": pattern, "result": result})

    async def link_action(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in LINK_ACTIONS:
            raise state.NotFound("action", action)
        data = await body(request)
        t = await testbed_of(request) if data.get("testbed") is None else state.testbed(data["testbed"])
        a, b = data.get("a"), data.get("b")
        for f, v in (("a", a), ("b", b)):
            if not isinstance(v, str) or not v:
                raise BadRequest(f, f"{f}: a node, switch or pattern as in the language")
        props = {k: v for k, v in data.items() if k in ("delay", "jitter", "loss", "rate")}
        try:
            result = await _control().link_action(t.name, action, a, b, props)
        except ValueError as exc:
            raise BadRequest(getattr(exc, "field", "link"), str(exc)) from None
        broker.publish("link", t.name, action=action, a=a, b=b, **props)
        return JSONResponse({"testbed": t.name, "action": action, "a": a, "b": b, "result": result})

    async def verify(request: Request) -> Response:
        data = await body(request)
        t = await testbed_of(request) if data.get("testbed") is None else state.testbed(data["testbed"])
        try:
            result = await _control().verify(t.name)
        except ValueError as exc:
            raise BadRequest(getattr(exc, "field", "testbed"), str(exc)) from None
        return JSONResponse({"testbed": t.name, "result": result})

    # -- pages -----------------------------------------------------------------

    async def index(request: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    async def login(request: Request) -> Response:
        try:
            session = auth.spend_login(request.query_params.get("once", ""))
        except AuthError as exc:
            return error(exc.status, str(exc), "once")
        response = RedirectResponse("/", status_code=303)
        # Over HTTPS the session never goes back over plain HTTP.
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/login", login, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
        Route("/api/v1/openapi.json", openapi, methods=["GET"]),
        read("/api/v1/testbeds", testbeds),
        read("/api/v1/testbeds/{testbed}/graph", graph),
        read("/api/v1/hosts", hosts),
        read("/api/v1/nodes", nodes),
        read("/api/v1/nodes/{name}", node),
        read("/api/v1/links", links),
        read("/api/v1/telemetry/{kind}", telemetry),
        read("/api/v1/events", events),
        read("/api/v1/events/stream", stream),
        write("/api/v1/exec", "exec", exec_),
        write("/api/v1/nodes/{name}/{action}", "control", node_action),
        write("/api/v1/links/{action}", "control", link_action),
        write("/api/v1/verify", "control", verify),
    ]
    app = Starlette(routes=routes)
    app.state.broker = broker
    app.state.auth = auth
    return app


def _sse(e) -> str:
    return f"id: {e.id}\nevent: {e.kind}\ndata: {json.dumps(e.to_json())}\n\n"


def _control():
    """The experiment-control functions the `link`, `node` and `verify` commands call."""
    from megafleet.web import writes

    return writes


def _runtime_links(testbed: str) -> dict[tuple[str, str], ChangedLink]:
    """The links `megafleet link set/down/up` changed: what they run with now."""
    from megafleet.web import writes

    return writes.runtime_links(testbed)
