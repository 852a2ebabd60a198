"""The OpenAPI 3.1 document of the API (/api/v1/openapi.json). The schemas are
JSON Schema; the API tests validate every answer against them."""

from __future__ import annotations

from typing import Any

ERROR = {"type": "object", "required": ["error", "field"],
         "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}}}
STR_LIST = {"type": "array", "items": {"type": "string"}}
NODE = {"type": "object", "required": ["name", "kind", "host", "state", "addresses"],
        "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                       "host": {"type": ["string", "null"]}, "state": {"type": "string"},
                       "group": {"type": ["string", "null"]}, "addresses": STR_LIST}}
GRAPH_NODE = {"type": "object", "required": ["id", "name", "kind", "state", "count", "x", "y"],
              "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "kind": {"type": "string"},
                             "host": {"type": ["string", "null"]}, "state": {"type": "string"},
                             "count": {"type": "integer", "minimum": 1}, "states": {"type": "object"},
                             "x": {"type": "number"}, "y": {"type": "number"}}}
# A link's impairments as it runs now: `megafleet link set` (CLI or API) over the
# description's; a setting cleared at run time is absent. mtu: the description's.
LINK_PROPS = {"type": "object", "description": "impairments in force (as `megafleet link show`), else as declared",
              "properties": {"delay_us": {"type": "integer", "minimum": 0},
                             "jitter_us": {"type": "integer", "minimum": 0},
                             "loss_pct": {"type": "number", "minimum": 0, "maximum": 100},
                             "rate_bit": {"type": "integer", "minimum": 0}, "mtu": {"type": "integer"}}}
LINK = {"type": "object", "required": ["a", "b", "kind", "state", "props"],
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}, "kind": {"type": "string"},
                       "iface": {"type": ["string", "null"]}, "props": LINK_PROPS,
                       "state": {"type": "string"}, "traffic_bps": {"type": ["number", "null"]}}}
EVENT = {"type": "object", "required": ["id", "time", "kind", "testbed", "data"],
         "properties": {"id": {"type": "integer"}, "time": {"type": "number"}, "kind": {"type": "string"},
                        "testbed": {"type": ["string", "null"]}, "data": {"type": "object"}}}

SCHEMAS: dict[str, Any] = {
    "Error": ERROR,
    "Testbeds": {"type": "array", "items": {
        "type": "object", "required": ["name", "source", "hosts"],
        "properties": {"name": {"type": "string"}, "source": {"type": "string"}, "hosts": STR_LIST,
                       "started": {"type": ["number", "null"]}, "summary": {"type": ["object", "null"]}}}},
    "Graph": {"type": "object", "required": ["testbed", "nodes", "links", "collapsed", "total_nodes"],
              "properties": {"testbed": {"type": "string"}, "collapsed": {"type": "boolean"},
                             "total_nodes": {"type": "integer"}, "nodes": {"type": "array", "items": GRAPH_NODE},
                             "links": {"type": "array", "items": LINK}}},
    "Hosts": {"type": "array", "items": {
        "type": "object", "required": ["host", "status", "testbeds"],
        "properties": {"host": {"type": "string"}, "status": {"type": "string"},
                       "ksm": {"type": "object"}, "memory": {"type": "object"},
                       "testbeds": {"type": "array"}}}},
    "Nodes": {"type": "object", "required": ["testbed", "nodes"],
              "properties": {"testbed": {"type": "string"}, "nodes": {"type": "array", "items": NODE}}},
    "NodeDetail": {"type": "object", "required": ["name", "kind", "testbed", "host", "state", "ifaces"],
                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                  "testbed": {"type": "string"}, "host": {"type": ["string", "null"]},
                                  "state": {"type": "string"}, "ifaces": {"type": "array"},
                                  "console_tail": {"type": ["string", "null"]},
                                  "agent": {"type": ["object", "null"]}}},
    "Links": {"type": "object", "required": ["testbed", "links"],
              "properties": {"testbed": {"type": "string"}, "links": {"type": "array", "items": LINK}}},
    "Telemetry": {"type": "object", "required": ["query", "window_s", "rows"],
                  "properties": {"query": {"type": "string"}, "window_s": {"type": "number"},
                                 "rows": {"type": ["array", "object"]}}},
    "Events": {"type": "object", "required": ["events"],
               "properties": {"events": {"type": "array", "items": EVENT}}},
    "ExecResult": {"type": "object", "required": ["nodes", "host_errors"],
                   "properties": {"nodes": {"type": "array", "items": {
                       "type": "object", "required": ["node", "host", "rc", "stdout", "stderr"]}},
                       "host_errors": {"type": "object"}}},
    "NodeActionResult": {
        "type": "object", "required": ["testbed", "action", "pattern", "result"],
        "properties": {"testbed": {"type": "string"}, "action": {"enum": ["stop", "start", "restart", "kill"]},
                       "pattern": {"type": "string"}, "result": {"type": "array", "items": {
                           "type": "object", "required": ["node", "host", "action", "seconds"],
                           "properties": {"node": {"type": "string"}, "host": {"type": "string"},
                                          "action": {"type": "string"}, "seconds": {"type": "number"}}}}}},
    "LinkActionResult": {
        "type": "object", "required": ["testbed", "action", "a", "b", "result"],
        "properties": {"testbed": {"type": "string"}, "action": {"enum": ["set", "down", "up"]},
                       "a": {"type": "string"}, "b": {"type": "string"}, "result": {"type": "array", "items": {
                           "type": "object", "required": ["link", "host"],
                           "properties": {"link": {"type": "string"}, "host": {"type": "string"},
                                          "iface": {"type": "string"}, "state": {"enum": ["up", "down"]},
                                          "settings": {"type": "object"}}}}}},
    "VerifyResult": {
        "type": "object", "required": ["testbed", "result"],
        "properties": {"testbed": {"type": "string"}, "result": {
            "type": "object", "required": ["ok", "checks", "passed", "converge_s", "seconds", "failed"],
            "properties": {"ok": {"type": "boolean"}, "checks": {"type": "integer", "minimum": 0},
                           "passed": {"type": "integer", "minimum": 0},
                           "converge_s": {"type": ["number", "null"]}, "seconds": {"type": "number"},
                           "failed": {"type": "array", "items": {"type": "object"}}}}}},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, schema: str, params: list[dict[str, Any]] | None = None,
        scope: str = "read", body: dict[str, Any] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "ok", "content": {"application/json": {"schema": _ref(schema)}}}}
    for code, text in (("400", "bad input: `field` names it"), ("401", "a token is needed"),
                       ("403", f"the token lacks scope '{scope}'"), ("404", "unknown testbed, node or query")):
        responses[code] = {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
    op: dict[str, Any] = {"summary": summary, "parameters": params or [], "responses": responses,
                          "x-scope": scope}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _q(name: str, text: str, type_: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": text, "schema": {"type": type_}}


def _p(name: str, text: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": text, "schema": {"type": "string"}}


TESTBED_Q = _q("testbed", "the testbed (optional when exactly one is up)")


def document() -> dict[str, Any]:
    """The OpenAPI document: paths, their parameters, scopes and schemas."""
    link_body = {"type": "object", "required": ["a", "b"],
                 "properties": {"testbed": {"type": "string"}, "a": {"type": "string"}, "b": {"type": "string"},
                                "delay": {"type": "string"}, "jitter": {"type": "string"},
                                "loss": {"type": "string"}, "rate": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "megafleet", "version": "1",
                 "description": "The fleet's state, telemetry, events and live control. Scopes: read < "
                                "control < exec; see `megafleet web --help`. On a loopback bind reads "
                                "need no token and writes answer 403 without one; on any other address "
                                "every request answers 401 without one."},
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/testbeds": {"get": _op("Testbeds the controller brought up", "Testbeds")},
            "/api/v1/testbeds/{testbed}/graph": {"get": _op(
                "The topology with positions and states", "Graph",
                [_p("testbed", "the testbed"), _q("collapse", "auto | yes | no: guests of a switch as one node"),
                 _q("expand", "comma-separated cluster ids drawn node by node")])},
            "/api/v1/hosts": {"get": _op("Hosts: nodes by state, memory, KSM saving, telemetry health", "Hosts")},
            "/api/v1/nodes": {"get": _op("Nodes, filtered by glob and state", "Nodes",
                                         [TESTBED_Q, _q("pattern", "a glob of node names"),
                                          _q("state", "running, up, failed, exited, missing, ...")])},
            "/api/v1/nodes/{name}": {"get": _op("One node: addresses, links, console tail, agent line",
                                                "NodeDetail", [_p("name", "node name"), TESTBED_Q])},
            "/api/v1/links": {"get": _op("Links with their impairments and state as they run now, "
                                         "and traffic", "Links", [TESTBED_Q])},
            "/api/v1/telemetry/{kind}": {"get": _op(
                "A telemetry query: boot-times, boot-cdf, ksm, top-cpu, top-mem, net, events", "Telemetry",
                [_p("kind", "the query"), _q("window", "seconds back", "number"), _q("limit", "rows", "integer")])},
            "/api/v1/events": {"get": _op("Recent events (also as Server-Sent Events at /events/stream)",
                                          "Events", [_q("after", "only events with a larger id", "integer")])},
            "/api/v1/events/stream": {"get": {
                "summary": "Server-Sent Events: node, boot, failure, fault, link, testbed, exec",
                "responses": {"200": {"description": "text/event-stream; data is an Event",
                                      "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
                "x-scope": "read", "x-event-schema": EVENT}},
            "/api/v1/exec": {"post": _op("Run a command inside nodes (as `megafleet exec`)", "ExecResult",
                                         scope="exec", body={
                                             "type": "object", "required": ["pattern", "argv"],
                                             "properties": {"testbed": {"type": "string"},
                                                            "pattern": {"type": "string"}, "argv": STR_LIST,
                                                            "timeout": {"type": "number"}}})},
            "/api/v1/nodes/{name}/{action}": {"post": _op(
                "stop, start, restart or kill nodes (as `megafleet node`)", "NodeActionResult",
                [_p("name", "node name or glob"), _p("action", "stop | start | restart | kill"), TESTBED_Q],
                scope="control")},
            "/api/v1/links/{action}": {"post": _op("set, down or up a link (as `megafleet link`)", "LinkActionResult",
                                                   [_p("action", "set | down | up")], scope="control",
                                                   body=link_body)},
            "/api/v1/verify": {"post": _op("Check the testbed's reachable assertions live", "VerifyResult",
                                           scope="control", body={"type": "object",
                                                                  "properties": {"testbed": {"type": "string"}}})},
        },
    }
