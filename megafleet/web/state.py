"""What the dashboard and the API show, read from the same places as the CLI.

Testbeds come from the controller's record (`up.deployments`), the topology from
compiling the testbed's own source file (cached by modification time), node
states from the hosts' status (`up.status`, the function behind `megafleet
status`), telemetry from the store (`collect.queries`, as `megafleet telemetry`).
Nothing here keeps state of its own beyond caches: the CLI and the web answer the
same question the same way.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

# What `megafleet link set` changes at run time (its records' settings).
from megafleet.experiment.refs import IMPAIRMENTS

if TYPE_CHECKING:
    from megafleet.experiment.hostside import ChangedLink
    from megafleet.up import HostAnswer

# Above this many nodes the guests of one group on one switch are drawn as one
# node (their count and worst state): 10,000 single dots tell a person less than
# 40 labelled clusters, and a click on a cluster expands it.
COLLAPSE_ABOVE = 2000

# Node states as `megafleet status` names them, and the colour class of each. A
# guest that is stopped (`node stop`, `vm kill`) is down where it should run: red.
HEALTH = {"running": "ok", "up": "ok", "planned": "off", "booting": "busy", "starting": "busy", "stopped": "bad",
          "failed": "bad", "exited": "bad", "missing": "bad", "killed": "bad"}


class NotFound(LookupError):
    """An unknown testbed or node: the API answers 404 with the field named."""

    def __init__(self, field_name: str, value: str):
        super().__init__(f"{field_name} {value!r} not found")
        self.field = field_name


@dataclass(frozen=True)
class TestbedInfo:
    """One testbed the controller brought up."""

    name: str
    source: str
    defines: dict[str, str]
    hosts: list[str]
    started: float | None
    summary: dict[str, Any] | None
    planned: bool = False


@dataclass
class NodeInfo:
    """One vertex of the topology: a node (host, router, vm) or a switch.
    `count` > 1 for a collapsed cluster of guests; `states` then counts them."""

    id: str
    name: str
    kind: str
    host: str | None = None
    state: str = "up"
    group: str | None = None
    addresses: list[str] = field(default_factory=list)
    count: int = 1
    states: dict[str, int] = field(default_factory=dict)
    x: float = 0.0
    y: float = 0.0


@dataclass
class LinkInfo:
    """One edge: a node's port on a switch, a point-to-point link or a switch
    link, with its state and `props`: its impairments (delay_us, jitter_us,
    loss_pct, rate_bit) as the link runs now, the description's mtu."""

    id: str
    a: str
    b: str
    kind: str
    iface: str | None = None
    props: dict[str, Any] = field(default_factory=dict)
    state: str = "up"
    count: int = 1
    traffic_bps: float | None = None


@dataclass
class Topology:
    testbed: str
    nodes: list[NodeInfo]
    links: list[LinkInfo]
    collapsed: bool
    total_nodes: int

    def to_json(self) -> dict[str, Any]:
        return {"testbed": self.testbed, "collapsed": self.collapsed, "total_nodes": self.total_nodes,
                "nodes": [asdict(n) for n in self.nodes], "links": [asdict(link) for link in self.links]}


# ---------------------------------------------------------------------------
# Testbeds and their compiled networks
# ---------------------------------------------------------------------------

# Descriptions shown as planned, not up (`megafleet web --preview FILE`): name -> info.
PREVIEWS: dict[str, TestbedInfo] = {}


def add_preview(path: Path, defines: dict[str, str]) -> TestbedInfo:
    """Show a description that is not up (its nodes are 'planned'): to look at a
    topology before `up`. Raises UpError for a file that does not compile."""
    from megafleet.up import testbed_name

    name = testbed_name(path, None)
    info = TestbedInfo(name, str(path.resolve()), defines, [], None, None, planned=True)
    compiled(info)
    PREVIEWS[name] = info
    return info


def testbeds() -> list[TestbedInfo]:
    """The testbeds the controller's ledger records, then previews, by name."""
    from megafleet.up import deployments

    out = []
    for name, d in sorted(deployments().items()):
        out.append(TestbedInfo(name, d.get("source", ""), dict(d.get("defines") or {}),
                               list(d.get("hosts") or []), d.get("started"), d.get("summary")))
    known = {t.name for t in out}
    return out + [t for name, t in sorted(PREVIEWS.items()) if name not in known]


def testbed(name: str) -> TestbedInfo:
    for t in testbeds():
        if t.name == name:
            return t
    raise NotFound("testbed", name)


_compiled: dict[str, tuple[tuple[float, str], Any]] = {}


def compiled(t: TestbedInfo):
    """The testbed's compiled Net (with the -D values `up` was given),
    recompiled only when its source or those values changed."""
    from megafleet.up import compile_testbed

    path = Path(t.source)
    try:
        key = (path.stat().st_mtime, repr(sorted(t.defines.items())))
    except OSError:
        raise NotFound("source", t.source) from None
    hit = _compiled.get(t.name)
    if hit is None or hit[0] != key:
        hit = (key, compile_testbed(path, t.defines))
        _compiled[t.name] = hit
    return hit[1]


def placement_of(t: TestbedInfo, net) -> dict[str, str]:
    """node -> host. One host: every node is local; several: the placement
    `up` computed (it is deterministic for the same net and inventory)."""
    from megafleet.up import LOCAL, Target, deployments, make_plan

    record = deployments().get(t.name, {})
    target = Target.from_json(record.get("target") or {})
    if t.planned:
        return {}
    if target.embedded:
        return {n: LOCAL for _, _, n in net.iter_nodes()}
    _, placed = make_plan(net, t.name, target)
    return {n: h for h, nodes in placed.hosts.items() for n in nodes}


# ---------------------------------------------------------------------------
# Node states
# ---------------------------------------------------------------------------

async def host_status(name: str | None) -> dict[str, HostAnswer]:
    """What `megafleet status` shows for one testbed (or all): host -> its answer."""
    from megafleet.up import Output, status

    return await status(name, None, Output(quiet=True))


def node_states(status_hosts: dict[str, HostAnswer], testbed_name: str) -> tuple[dict[str, str], dict[str, dict]]:
    """From `status` output: the state of every node that is not healthy, and
    per host {state: count} of the testbed's nodes. Healthy nodes are not listed
    one by one by `status` (at 10,000 guests that is the point)."""
    bad: dict[str, str] = {}
    per_host: dict[str, dict] = {}
    for h, r in status_hosts.items():
        if not r.ok:
            per_host[h] = {"error": r.error or r.status}
            continue
        for b in r.value["testbeds"]:
            if b["testbed"] != testbed_name:
                continue
            per_host[h] = {"nodes": b["nodes"], "complete": b["complete"], "telemetry": b["telemetry"]}
            for f in b["failures"]:
                bad[f["node"]] = f["state"]
    return bad, per_host


def hosts_view(status_hosts: dict[str, HostAnswer]) -> list[dict[str, Any]]:
    """Rows of the hosts table: nodes by state, KSM saving, telemetry health."""
    rows: list[dict[str, Any]] = []
    for h, r in sorted(status_hosts.items()):
        if not r.ok:
            rows.append({"host": h, "status": r.status, "error": r.error, "testbeds": []})
            continue
        v = r.value
        rows.append({"host": h, "status": "ok", "ksm": v["ksm"], "memory": memory_mb(),
                     "testbeds": [{"testbed": b["testbed"], "nodes": b["nodes"], "complete": b["complete"],
                                   "telemetry": b["telemetry"], "failed": len(b["failures"])}
                                  for b in v["testbeds"]]})
    return rows


def memory_mb() -> dict[str, int]:
    """This machine's memory (MB): total and available, from /proc/meminfo."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) // 1024
    return {"total_mb": values.get("MemTotal", 0), "available_mb": values.get("MemAvailable", 0)}


# ---------------------------------------------------------------------------
# Topology, laid out for drawing
# ---------------------------------------------------------------------------

def running_props(declared: dict[str, Any], runtime: ChangedLink | None) -> dict[str, Any]:
    """A link's props as it runs: with a run-time record (`runtime`, as
    `megafleet link show` reads it), its settings replace the description's
    impairments whole, since a record holds every setting in force (a cleared
    one is absent); without one, the description's."""
    if runtime is None:
        return declared
    return {**{k: v for k, v in declared.items() if k not in IMPAIRMENTS},
            **{k: v for k, v in runtime.settings.to_json().items() if k in IMPAIRMENTS}}

def link_traffic(testbed_name: str, window_s: float = 60.0) -> dict[tuple[str, str], float]:
    """Mean bytes/s (rx + tx) per link over the window, by sorted ends, for the
    links whose host side is on this machine: the host-side interface that
    `megafleet link show` names, matched with its samples in telemetry."""
    from megafleet.collect import queries
    from megafleet.experiment.hostside import host_links
    from megafleet.host import load_manifest

    m = load_manifest(testbed_name)
    if m is None:
        return {}
    by_iface = {o.key: tuple(sorted((o.ref.a, o.ref.b))) for o in host_links(m.net)}
    try:
        with open_telemetry() as store:
            rows = queries.net(store, since(window_s), limit=0)
    except Exception:        # telemetry is best effort: no traffic shown
        return {}
    out: dict[tuple[str, str], float] = {}
    for r in rows:
        ends = by_iface.get(r["iface"])
        if ends is not None:
            out[(ends[0], ends[1])] = out.get((ends[0], ends[1]), 0.0) + r["mean_bps"]
    return out


def topology(t: TestbedInfo, bad: dict[str, str], *, collapse: bool | None = None,
             runtime: dict[tuple[str, str], ChangedLink] | None = None,
             traffic: dict[tuple[str, str], float] | None = None,
             expand: frozenset[str] = frozenset()) -> Topology:
    """The testbed's graph with positions and states. `collapse` None means
    automatic (above COLLAPSE_ABOVE nodes); `expand` names clusters drawn node by
    node all the same (a click on a cluster). `runtime` maps sorted (a, b) of
    the links changed at run time to their record (`writes.runtime_links`):
    their state and impairments are those."""
    net = compiled(t)
    where = placement_of(t, net)
    runtime = runtime or {}
    kinds: dict[str, str] = {}
    group_of: dict[str, str] = {}
    for gi, grp in enumerate(net.groups):
        label = grp.names[0] if len(grp.names) == 1 else f"{grp.names[0]}..{grp.names[-1]}"
        for n in grp.names:
            kinds[n] = grp.kind
            group_of[n] = label
    total = len(kinds) + len(net.switches)
    if collapse is None:
        collapse = total > COLLAPSE_ABOVE

    def healthy(kind: str) -> str:
        if t.planned:
            return "planned"
        return "running" if kind == "vm" else "up"

    nodes: dict[str, NodeInfo] = {s: NodeInfo(s, s, "switch") for s in net.switches}
    links: list[LinkInfo] = []
    attach: dict[str, list[str]] = defaultdict(list)     # node -> what it is wired to
    edges: list[tuple[str, str, str, str | None, dict[str, Any]]] = []
    for name, kind in kinds.items():
        view = net.node(name)
        for ifname, iface, addrs in view.ifaces:
            other = iface.switch or iface.peer
            if other is None:
                continue
            attach[name].append(other)
            edge_kind = "port" if iface.switch else "p2p"
            if edge_kind == "p2p" and name > other:
                continue                                 # one edge per link, from its first end
            edges.append((name, other, edge_kind, ifname, iface.props.to_json()))
    for link in net.switch_links:
        edges.append((link.a, link.b, "switch-link", None, link.props.to_json()))

    # Clusters: guests of one group whose only wire is one switch.
    cluster_of: dict[str, str] = {}
    if collapse:
        for name, kind in kinds.items():
            if kind == "vm" and len(attach[name]) == 1 and attach[name][0] in net.switches:
                cid = f"{group_of[name]}@{attach[name][0]}"
                if cid not in expand:
                    cluster_of[name] = cid
    for name, kind in kinds.items():
        state = bad.get(name, healthy(kind))
        member_of = cluster_of.get(name)
        if member_of is None:
            addresses = [a for _, _, addrs in net.node(name).ifaces for a in addrs.values()]
            nodes[name] = NodeInfo(name, name, kind, where.get(name), state, group_of[name], addresses)
            continue
        c = nodes.get(member_of)
        if c is None:
            c = nodes[member_of] = NodeInfo(member_of, group_of[name], "cluster", where.get(name), state,
                                            group_of[name])
            c.count = 0
        c.count += 1
        c.states[state] = c.states.get(state, 0) + 1
        if HEALTH.get(state) == "bad" or (HEALTH.get(c.state) == "ok" and state != c.state):
            c.state = state
    seen_cluster_edges: dict[tuple[str, str], LinkInfo] = {}
    for a, b, kind, ifname, props in edges:
        a2, b2 = cluster_of.get(a, a), cluster_of.get(b, b)
        first, second = sorted((a, b))
        ends = (first, second)
        changed = runtime.get(ends)
        state = changed.state if changed else "up"
        props = running_props(props, changed)
        rate = traffic.get(ends) if traffic else None
        if a2 != a or b2 != b:
            key = (a2, b2)
            if key in seen_cluster_edges:
                grouped = seen_cluster_edges[key]
                grouped.count += 1
                if rate is not None:
                    grouped.traffic_bps = (grouped.traffic_bps or 0.0) + rate
                continue
            link = seen_cluster_edges[key] = LinkInfo(f"{a2}--{b2}", a2, b2, kind, None, props, state,
                                                      traffic_bps=rate)
        else:
            link = LinkInfo(f"{a}:{ifname}--{b}" if ifname else f"{a}--{b}", a, b, kind, ifname, props, state,
                            traffic_bps=rate)
        links.append(link)
    _layout(nodes, links)
    return Topology(t.name, list(nodes.values()), links, bool(cluster_of), total)


def _layout(nodes: dict[str, NodeInfo], links: list[LinkInfo]) -> None:
    """Positions in place. The core (switches, routers, clusters and anything
    wired to more than one thing) is laid out by breadth-first rings from its
    best-connected vertex (O(n), readable for trees, rings and meshes); a leaf
    (one wire) sits on a sunflower spiral around what it is wired to."""
    neighbours: dict[str, list[str]] = defaultdict(list)
    for link in links:
        neighbours[link.a].append(link.b)
        neighbours[link.b].append(link.a)
    leaves = {n for n, nb in neighbours.items() if len(nb) == 1 and nodes[n].kind in ("vm", "host")}
    core = [n for n in nodes if n not in leaves]
    placed: dict[str, tuple[float, float]] = {}
    ring_gap = 10.0
    remaining = sorted(core, key=lambda n: (-len(neighbours[n]), n))
    offset = 0.0
    while remaining:
        start = remaining[0]
        rings = [[start]]
        seen = {start}
        while True:
            nxt = []
            for n in rings[-1]:
                for m in sorted(neighbours[n]):
                    if m not in seen and m not in leaves:
                        seen.add(m)
                        nxt.append(m)
            if not nxt:
                break
            rings.append(nxt)
        for depth, ring in enumerate(rings):
            for i, n in enumerate(ring):
                angle = 2 * math.pi * i / len(ring) + depth * 0.3
                placed[n] = (offset + depth * ring_gap * math.cos(angle), depth * ring_gap * math.sin(angle))
        remaining = [n for n in remaining if n not in seen]
        offset += (len(rings) + 1) * ring_gap * 2
    by_anchor: dict[str, list[str]] = defaultdict(list)
    for n in sorted(leaves):
        by_anchor[neighbours[n][0]].append(n)
    golden = math.pi * (3 - math.sqrt(5))
    for anchor, members in by_anchor.items():
        ax, ay = placed.get(anchor, (0.0, 0.0))
        scale = 1.2
        for i, n in enumerate(members):
            r = scale * math.sqrt(i + 4)
            placed[n] = (ax + r * math.cos(i * golden), ay + r * math.sin(i * golden))
    for n, info in nodes.items():
        info.x, info.y = placed.get(n, (0.0, 0.0))


# ---------------------------------------------------------------------------
# One node
# ---------------------------------------------------------------------------

def node_detail(t: TestbedInfo, name: str, bad: dict[str, str],
                runtime: dict[tuple[str, str], ChangedLink] | None = None) -> dict[str, Any]:
    """A node's page: kind, host, state, addresses, links (each iface's `link`:
    its impairments as running, see `topology`'s `runtime`), console tail and
    last agent line (guests on this machine)."""
    net = compiled(t)
    if name not in net.index:
        raise NotFound("node", name)
    view = net.node(name)
    where = placement_of(t, net)
    state = bad.get(name, "running" if view.kind == "vm" else "up")
    detail: dict[str, Any] = {"testbed": t.name, "host": where.get(name), "state": state, **view.to_json()}
    for iface in detail["ifaces"]:
        other = iface["switch"] or iface["peer"]
        if runtime and other is not None:
            first, second = sorted((name, other))
            iface["link"] = running_props(iface["link"], runtime.get((first, second)))
    detail["console_tail"] = None
    detail["agent"] = None
    if view.kind == "vm":
        from megafleet.up import LOCAL
        if where.get(name) == LOCAL:
            detail["console_tail"] = _console_tail(name)
        detail["agent"] = _last_agent_sample(name)
    return detail


def _console_tail(name: str) -> str | None:
    from megafleet.vm.engine import console_tail, guests_dir

    path = guests_dir() / name / "console.log"
    return console_tail(path) if path.exists() else None


def _last_agent_sample(name: str) -> dict[str, Any] | None:
    try:
        with open_telemetry() as store:
            from megafleet.collect.queries import latest_guests

            since = datetime.now(timezone.utc) - timedelta(minutes=10)
            found = [d for d in latest_guests(store, since) if d["meta"].get("guest") == name]
    except Exception:       # telemetry is best effort: the page shows what it has
        return None
    return _plain(found[-1]) if found else None


# ---------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------

class open_telemetry:
    """The telemetry store `megafleet telemetry` reads: $MEGAFLEET_TELEMETRY
    (set by `megafleet web --telemetry`), else the SQLite store in the state dir."""

    def __enter__(self):
        from megafleet.collect.stores import open_store

        self.store = open_store(os.environ.get("MEGAFLEET_TELEMETRY") or None, timeout_ms=2000)
        return self.store

    def __exit__(self, *exc) -> None:
        self.store.close()


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "_id"}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def since(window_s: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(seconds=window_s)


def telemetry_query(kind: str, window_s: float, limit: int = 10) -> Any:
    """The data behind `megafleet telemetry KIND` (and its `--plot`): kind is one
    of boot-times, boot-cdf, ksm, top-cpu, top-mem, net, events."""
    from megafleet.collect import queries

    with open_telemetry() as store:
        start = since(window_s)
        if kind == "boot-times":
            rows: Any = queries.boot_times(store, start)
        elif kind == "boot-cdf":
            rows = queries.boot_durations(store, start)
        elif kind == "ksm":
            rows = queries.ksm(store, start)
        elif kind == "top-cpu":
            rows = queries.top(store, "cpu", start, limit)
        elif kind == "top-mem":
            rows = queries.top(store, "mem", start, limit)
        elif kind == "net":
            rows = queries.net(store, start, limit)
        elif kind == "events":
            rows = queries.events(store, start, limit=limit)
        else:
            raise NotFound("query", kind)
    return _plain(rows)


TELEMETRY_KINDS = ("boot-times", "boot-cdf", "ksm", "top-cpu", "top-mem", "net", "events")
