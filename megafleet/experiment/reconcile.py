"""Changing a running testbed by its description: the difference between the
plan a host runs and the plan of the edited file, applied in place.

`diff_rows` says what differs (item by item, `netlang.hostplan.diff`), with the
description's file:line of each item still in it. `reconcile` (host side,
called by `host.apply` when a testbed is already up from another version of its
description) removes what went away and creates what is new, and leaves
everything else alone: running guests keep their pids, namespaces their
routing daemons. Then `host.apply` carries on as for an unchanged testbed: the
network is found intact, the vm engine boots only the guests that are not
running (the new ones).

What is done per kind of change:
- removed guests: torn down (vm engine); removed routers: their daemons stopped;
  removed ports, links, trunks, wires, tunnels, bridges: their host-side
  interfaces deleted (the veth's far end goes with it) and their processes
  stopped; removed namespaces deleted; all forgotten in the ledger;
- added items: created from their own `ip_lines` (recorded first), new
  namespaces configured, new wires and VDE plugs started, new routers' daemons
  started; added guests are booted by `host.apply` afterwards;
- changed link properties only (a port's, a link's or a trunk's rate, a
  declared wire's delay, jitter, loss): changed where they run (tc, the wire's
  filter), nothing made again;
- other changed items (same identity, other content): removed, then added
  (an interface made again inside a namespace that stays gets its addresses
  and the routes through it again; a guest whose NIC's host side is made
  again boots again); a changed
  namespace configuration gets its new operations (addresses, routes) added,
  changed startup commands (`exec`) run those not in the old list;
  a router whose configuration changed takes it in place where it can
  (BIRD reads it again; FRR restarts only the daemons whose configuration
  changed, zebra keeping the interfaces), else has its daemons restarted; a
  changed guest is torn down and booted again.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import trio

from megafleet import proc
from megafleet.ledger import Ledger

NET = "net"


def _label(item) -> str:
    k = getattr(item, "kind", "")
    if k in ("netns", "ns-config", "ns-exec", "router", "guest"):
        return item.name
    if k == "bridge":
        return item.switch + ("" if item.vlan is None else f"/{item.vlan}") + (" (leaf)" if item.root else "")
    if k == "vde-switch":
        return item.switch
    if k == "p2p":
        return f"{item.node_a} -- {item.node_b}"
    if k == "trunk":
        return f"{item.switch_a} -- {item.switch_b}" + ("" if item.vlan is None else f" vlan {item.vlan}")
    if k == "wire":
        ends = [e.node or e.where for e in item.ends]
        return " -- ".join(ends)
    if k == "vxlan":
        return f"{item.segment} vni {item.vni}"
    if hasattr(item, "node") and hasattr(item, "switch"):
        return f"{item.node} -- {item.switch}" + ("" if item.vlan is None else f" vlan {item.vlan}")
    return str(item.identity())


def _kind(item) -> str:
    k = getattr(item, "kind", "")
    return {"veth": "port", "tap": "port", "cveth": "port", "vde": "port", "guest-vde": "port",
            "wire": "wire", "p2p": "link", "trunk": "link"}.get(k, k)


def locate(net, item) -> str | None:
    """file:line of the statement an item of the plan comes from (None when the
    description does not have it: a removed item)."""
    if net is None:
        return None

    def node_loc(name: str):
        if name in net.index:
            return net.groups[net.index[name][0]].loc
        return None

    k = getattr(item, "kind", "")
    loc = None
    if k in ("guest", "router", "netns"):
        loc = node_loc(item.name)
    elif k in ("ns-config", "ns-exec"):
        node = item.name.split("-", 1)[1] if "-" in item.name else item.name
        loc = node_loc(node)
    elif k in ("bridge", "vde-switch") and item.switch in net.switches:
        loc = net.switches[item.switch].loc
    elif k == "trunk":
        loc = next((sl.loc for sl in net.switch_links if {sl.a, sl.b} == {item.switch_a, item.switch_b}), None)
    elif k == "p2p" and item.node_a in net.index:
        loc = next((i.loc for _, i, _ in net.node(item.node_a).ifaces if i.peer == item.node_b), None)
    elif hasattr(item, "node") and hasattr(item, "switch") and item.node in net.index:
        loc = next((i.loc for _, i, _ in net.node(item.node).ifaces if i.switch == item.switch), None)
    elif k == "wire":
        loc = next((node_loc(e.node) for e in item.ends if e.kind == "ns" and e.node), None)
    return None if loc is None else f"{loc.file}:{loc.line}"


def diff_rows(old_net_json: dict | None, new_net_json: dict | None, net=None) -> list[dict[str, Any]]:
    """What differs between a host's running plan and the new one: rows of
    {change: "+"|"-"|"~", kind, name, loc}."""
    from megafleet.netlang.hostplan import diff_json

    empty = {"name": (new_net_json or old_net_json or {}).get("name", "")}
    new = new_net_json or empty
    d = diff_json(old_net_json or empty, new)
    rows = []
    for change, items in (("-", d.removed), ("+", d.added), ("~", [b for _, b in d.changed])):
        for item in items:
            label = _label(item)
            if getattr(item, "kind", "") == "ns-config":
                label = label.removeprefix(new["name"] + "-") + " (addresses, routes)"
            elif getattr(item, "kind", "") == "ns-exec":
                label = label.removeprefix(new["name"] + "-") + " (startup commands)"
            rows.append({"change": change, "kind": _kind(item), "name": label,
                         "loc": locate(net, item) if change != "-" else None})
    order = {"-": 0, "~": 1, "+": 2}
    return sorted(rows, key=lambda r: (order[r["change"]], r["kind"], r["name"]))


# ---------------------------------------------------------------------------
# Host side: applying the difference
# ---------------------------------------------------------------------------

async def reconcile(old_m, new_m, ledger: Ledger, progress: Callable[[str], None]) -> dict[str, Any]:
    """Bring this host's share of a running testbed from `old_m` (the stored
    HostManifest) to `new_m` in place. Returns counts of what changed."""
    from megafleet.netlang.hostplan import counts_json, diff_json

    t0 = time.monotonic()
    # The plans stay JSON: only what differs is built as typed items (a big
    # testbed's plan parsed twice was most of a small change's time).
    old, new = old_m.net, new_m.net
    t = new["name"]
    d = diff_json(old, new)
    # Link properties (rate, a declared wire's delay, jitter, loss) change in
    # place; everything else that changed is removed and made again.
    props_only, remade = in_place(d.changed)
    # A router whose namespace stays takes its new configuration in place
    # where its daemons allow (netlang.routers.reconfigurable).
    from megafleet.netlang import routers as R
    remade_ns = {x.name for x in d.removed + [a for a, _ in d.changed] if getattr(x, "kind", "") == "netns"}
    reconf = [(a, b) for a, b in remade if getattr(a, "kind", "") == "router" and a.name not in remade_ns
              and a.name in new.get("netns", {}) and R.reconfigurable(dict(a.value), dict(b.value))]
    remade = [pair for pair in remade if pair not in reconf]
    gone = list(d.removed) + [a for a, _ in remade]
    come = list(d.added) + [b for _, b in remade]
    by_kind = lambda items, k: [x for x in items if getattr(x, "kind", "") == k]  # noqa: E731

    # Guests first (they sit on the ports that go). A guest whose NIC's host
    # side is made again boots again too (a QEMU tap or a container veth cannot
    # be handed to a running guest).
    guests_gone = {x.name for x in by_kind(gone, "guest")} | {
        a.node for a, _ in remade if getattr(a, "kind", "") in ("tap", "cveth", "guest-vde")}
    if guests_gone:
        from megafleet.vm.engine import Engine
        await Engine(ledger=ledger)._remove(guests_gone)
        progress(f"removed {len(guests_gone)} guests")
    await trio.to_thread.run_sync(_remove_net, t, gone, [x for _, x in remade], ledger)
    if props_only:
        await trio.to_thread.run_sync(apply_props, t, props_only, ledger)
        progress(f"changed the properties of {len(props_only)} links in place")
    from megafleet.netlang.nsexec import ExecFailed, located
    try:
        added = await _add_net(t, new, old, come, ledger, progress)
    except ExecFailed as exc:
        from megafleet.host import HostError
        # The new description's file:line of the statement, as a first `up` says it.
        raise HostError(located(exc, new_m.exec_locs)) from None
    for a, b in reconf:
        done = await trio.to_thread.run_sync(R.reconfigure, t, new["netns"][b.name], b.name, dict(a.value),
                                             dict(b.value), ledger)
        progress(f"router {b.name}: new configuration in place ({', '.join(done) or 'nothing'} "
                 f"{'reconfigured' if done == ['bird'] else 'restarted'})")
    from megafleet.netlang import live
    live_record = next((r.data for r in ledger.list(live.OWNER, "testbed") if r.key == t), {})
    ledger.record(live.OWNER, "testbed", t, **{**live_record, "digest": new_m.digest(), "complete": True,
                                               "counts": counts_json(new)})
    ledger.record(live.OWNER, "vms", t, names=[v["name"] for v in new.get("vms", [])])
    result = {"removed": len(d.removed), "added": len(d.added), "changed": len(d.changed),
              "routers_reconfigured": len(reconf),
              "guests_removed": len(guests_gone), "seconds": round(time.monotonic() - t0, 3), **added}
    progress(f"reconciled: {len(d.removed)} removed, {len(d.added)} added, {len(d.changed)} changed "
             f"({result['seconds']:.1f} s); running guests untouched")
    return result


def _stop_keys(ledger: Ledger, keys: set[str]) -> None:
    recs = [r for r in ledger.list(NET, "process") if r.key in keys]
    for r in recs:
        if "pid" in r.data:
            proc.RecordedProcess(r.data["pid"], r.data["start"]).stop(grace=3)
    ledger.forget_many(NET, "process", [r.key for r in recs])


def _remove_net(t: str, gone: list, changed_new: list, ledger: Ledger) -> None:
    from megafleet.netlang import live

    # Routers whose configuration went or changed: their daemons stop.
    routers = {x.name for x in gone if getattr(x, "kind", "") == "router"}
    _stop_keys(ledger, {r.key for r in ledger.list(NET, "process")
                        if any(r.key.startswith(f"{t}/frr/{name}/") for name in routers)})
    # Wires and VDE plugs: their processes.
    keys = set()
    for x in gone:
        k = getattr(x, "kind", "")
        if k == "wire":
            keys |= {f"{t}/wire/{x.key}.0", f"{t}/wire/{x.key}.1", f"{t}/wire/{x.key}.wf"}
        elif k == "vde":
            keys.add(f"{t}/plug/{x.host_if}")
        elif k == "vde-switch":
            keys.add(f"{t}/vde/{x.switch}")
    _stop_keys(ledger, keys)
    # Host-side interfaces (a veth's far end goes with it); p2p veths from inside.
    links = [n for x in gone if hasattr(x, "links") for n in x.links()]
    present = live.existing_links()
    live.run_batch(["ip"], [f"link del {n}" for n in links if n in present], force=True)
    ledger.forget_many(NET, "link", [f"{t}/{n}" for n in links])
    for x in gone:
        if getattr(x, "kind", "") == "p2p":
            proc.run(["ip", "-n", x.ns_a, "link", "del", x.eth_a], check=False)
    # Namespaces that went: whatever still runs in them, then the namespace.
    nss = [x.value for x in gone if getattr(x, "kind", "") == "netns"]
    nss = [ns for ns in nss if ns not in {y.value for y in changed_new if getattr(y, "kind", "") == "netns"}]
    for pid in live.pids_in_netns(nss):
        try:
            proc.RecordedProcess.of(pid).stop(grace=3)
        except ProcessLookupError:
            pass
    present_ns = live.existing_netns()
    live.run_batch(["ip"], [f"netns del {ns}" for ns in nss if ns in present_ns], force=True)
    ledger.forget_many(NET, "netns", [f"{t}/{ns}" for ns in nss])


def in_place(changed: list[tuple[Any, Any]]) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
    """Split a diff's changed pairs into those that differ in their link
    properties alone (`apply_props` changes them where they run) and the rest
    (removed and made again)."""
    same, rest = [], []
    for a, b in changed:
        if type(a) is type(b) and hasattr(b, "props") and dataclasses.replace(a, props=b.props) == b:
            same.append((a, b))
        else:
            rest.append((a, b))
    return same, rest


def apply_props(t: str, pairs: list[tuple[Any, Any]], ledger: Ledger) -> None:
    """New link properties on running links (pairs of old and new item): rate
    as tc tbf on the interfaces `up` shapes (replaced, or deleted when the new
    item has none); a declared wire's delay, jitter and loss on its wirefilter,
    restarted with a management socket (its vde_switches and taps stay). The
    nodes' interfaces, addresses and routing daemons are untouched."""
    from megafleet.experiment import hostside
    from megafleet.netlang import live

    shape: list[tuple[str | None, str, Any]] = []       # (namespace or None for the host, dev, props)
    for a, b in pairs:
        k = b.kind
        if k == "veth":
            shape += [(None, b.host_if, b.props), (b.ns, b.eth, b.props)]
        elif k in ("tap", "cveth"):
            shape.append((None, b.host_if, b.props))
        elif k == "vde":
            shape.append((b.ns, b.eth, b.props))
        elif k == "p2p":
            shape += [(b.ns_a, b.eth_a, b.props), (b.ns_b, b.eth_b, b.props)]
        elif k == "trunk":
            shape += [(None, b.if_a, b.props), (None, b.if_b, b.props)]
        elif k == "wire":
            shape += [(e.where if e.kind == "ns" else None, e.ifname, b.props)
                      for e in b.ends if e.kind in ("ns", "bridge") and e.ifname]
            impair = lambda p: (p.delay_us, p.jitter_us, p.loss_pct)  # noqa: E731
            if impair(a.props) != impair(b.props):
                (obj,) = hostside.host_links({"name": t, "wires": [b.to_json()]})
                mgmt = hostside.rewire_declared(t, obj, ledger)
                hostside.wf_command(mgmt, hostside.wf_lines(
                    {f: v for f in ("delay_us", "jitter_us", "loss_pct") if (v := getattr(b.props, f)) is not None}))
        # "wired" and "guest-vde" ports: their wire or switch carries the properties.
    by_ns: dict[str | None, tuple[list[str], list[str]]] = {}
    for ns, dev, props in shape:
        lines = live.tbf_lines(dev, props)
        put, drop = by_ns.setdefault(ns, ([], []))
        if lines:
            put.extend(lines)
        else:
            drop.append(f"qdisc del dev {dev} root")
    for ns, (put, drop) in by_ns.items():
        tc = ["tc"] if ns is None else ["tc", "-n", ns]
        live.run_batch(tc, put)
        live.run_batch(tc, drop, force=True)        # no qdisc there (never shaped): nothing to delete


def ops_of(ops: list, devs: set[str]) -> list:
    """The operations of a namespace that a re-made interface in `devs` needs
    again: its link up and addresses, and the routes through a gateway on one
    of its subnets (the kernel dropped them with the old interface)."""
    from megafleet.netlang import netlink
    from megafleet.netlang.ipam import BITS

    nets = [(op.family, op.addr >> (BITS[op.family] - op.plen), op.plen) for op in ops
            if isinstance(op, netlink.AddrAdd) and op.dev in devs]
    out: list[netlink.Op] = []
    for op in ops:
        if isinstance(op, (netlink.LinkUp, netlink.AddrAdd)):
            if op.dev in devs:
                out.append(op)
        elif isinstance(op, netlink.RouteAdd):
            if any(op.family == fam and op.via >> (BITS[fam] - plen) == prefix for fam, prefix, plen in nets):
                out.append(op)
    return out


def _remade_ifaces(items: list) -> dict[str, set[str]]:
    """namespace -> the interfaces `items` create in it."""
    out: dict[str, set[str]] = {}
    for x in items:
        k = getattr(x, "kind", "")
        pairs = []
        if k in ("veth", "vde", "wired"):
            pairs = [(x.ns, x.eth)]
        elif k == "p2p":
            pairs = [(x.ns_a, x.eth_a), (x.ns_b, x.eth_b)]
        elif k == "wire":
            pairs = [(e.where, e.ifname) for e in x.ends if e.kind == "ns" and e.ifname]
        for ns, dev in pairs:
            out.setdefault(ns, set()).add(dev)
    return out


async def _add_net(t: str, new: dict[str, Any], old: dict[str, Any], come: list, ledger: Ledger,
                   progress: Callable[[str], None]) -> dict:
    """Create the items `come` (typed, from diff_json) of plan `new` (JSON; `old`
    is the running one's), each list in the plan's order (roots before leaves).
    An interface they make in a namespace that stays (a changed item made
    again, a wire that became a veth) gets its addresses and routes again, not
    only the operations the new plan adds."""
    from megafleet.netlang import live, netlink
    from megafleet.netlang.hostplan import ITEM_LISTS, Named, NsExec, Plan, op_from_json, item_identity

    kinds = lambda k: [x for x in come if getattr(x, "kind", "") == k]  # noqa: E731
    new_ns = {x.name: x.value for x in kinds("netns")}
    items = {x.identity(): x for x in come if not isinstance(x, Named)}
    # Each list in the new plan's order: only identities are computed for the rest.
    lists: dict[str, Any] = {name: [items[k] for k in map(item_identity, new.get(name, [])) if k in items]
                                    if items else [] for name in ITEM_LISTS}
    sub = Plan(name=t, netns=new_ns, **lists,
               frr={x.name: new["frr"][x.name] for x in kinds("router") if x.name in new.get("frr", {})})
    sub.digest = new.get("digest", "")
    await live.create_items(sub, ledger, progress)
    # Namespace configuration: all of a new namespace's; only the new operations
    # of one whose configuration changed (the rest is in place).
    configs = {x.name for x in kinds("ns-config")}
    again = {ns: devs for ns, devs in _remade_ifaces(come).items() if ns not in new_ns.values()}
    configs |= set(again)

    def configure() -> int:
        n = 0
        for ns in sorted(configs):
            ops = [op_from_json(op) for op in new.get("ns_ops", {}).get(ns, [])]
            if ns not in new_ns.values():
                had = {repr(op_from_json(op)) for op in old.get("ns_ops", {}).get(ns, [])}
                needed = {repr(op) for op in ops_of(ops, again.get(ns, set()))}
                ops = [op for op in ops if repr(op) not in had or repr(op) in needed]
            if ops or ns in new_ns.values():
                netlink.apply(str(live.NETNS_DIR / ns), ops, new.get("ns_sysctls", {}).get(ns))
                n += 1
        return n

    configured = await trio.to_thread.run_sync(configure)
    await trio.to_thread.run_sync(live.shape_and_route, sub)
    if sub.frr:
        sub.netns = {r: new["netns"][r] for r in sub.frr}
        await live.start_routers(sub, ledger, progress)
    # Startup commands: all of a new namespace's; of one whose commands changed,
    # those not in its old list (the others ran when it was built).
    cmds = lambda p, ns: [NsExec.from_json(c) for c in p.get("ns_exec", {}).get(ns, [])]  # noqa: E731
    only: dict[str, set[int]] = {}
    for ns in {x.name for x in kinds("ns-exec")}:
        had = set() if ns in new_ns.values() else set(cmds(old, ns))
        only[ns] = {i for i, c in enumerate(cmds(new, ns)) if c not in had}
    if any(only.values()):
        from megafleet.netlang import nsexec
        sub.ns_exec = {ns: cmds(new, ns) for ns in only}
        await nsexec.run_all(sub, ledger, progress, only=only)
    return {"namespaces_added": len(new_ns), "namespaces_configured": configured,
            "interfaces_added": len(sub.host_links()), "routers_started": len(sub.frr),
            "startup_commands": sum(len(v) for v in only.values())}


# ---------------------------------------------------------------------------
# Controller side: `megafleet diff FILE`
# ---------------------------------------------------------------------------

async def diff_file(path, name: str | None, defines: dict[str, str], *, wait: bool = True,
                    on_wait: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What `up` of `path` would change in the running testbed of that name:
    {"testbed", "up": bool, "rows": [{change, kind, name, host, loc}]}. Compiles
    and places as `up` does (images from the cache), then compares each host's
    plan item by item with the one it runs (its stored manifest).

    Holds the testbed's lock (megafleet.locks) while it reads, so it never
    compares with an `up`, `down` or live change half done: busy, it waits
    (telling on_wait once) or, with wait=False, raises locks.LockBusy."""
    from megafleet import locks
    from megafleet import up as U

    testbed = U.testbed_name(Path(path), name)
    async with locks.atestbed_lock(testbed, "diff", wait=wait, on_wait=on_wait):
        result = await _diff_locked(Path(path), testbed, defines)
    if not result["up"]:
        locks.forget(testbed)       # no lock file left for a testbed that is not up
    return result


async def _diff_locked(path: Path, testbed: str, defines: dict[str, str]) -> dict[str, Any]:
    from megafleet import manifest as M
    from megafleet import up as U
    from megafleet.experiment import control

    try:
        tb = control.testbed(testbed)
        target, running = tb.target, True
    except control.ControlError:
        tb, target, running = None, U.Target(), False
    net = await trio.to_thread.run_sync(U.compile_testbed, path, defines)
    plan, placed = await trio.to_thread.run_sync(U.make_plan, net, testbed, target)
    images = await trio.to_thread.run_sync(U.build_images, net, plan, U.Output(quiet=True))
    old: dict[str, Any] = {}
    if tb is not None:           # running
        res = await control.on_hosts(tb, "experiment.manifest", {})
        old = {h: v for h, v in res.items() if v is not None}
    addresses = None
    mtu = 1500
    if not target.embedded:
        inv = target.inventory()
        addresses = {h: U._underlay_address(inv.by_name[h].address) for h in placed.hosts if h in inv.by_name}
        tunnels = [x for v in old.values() for x in v.get("vxlan", [])]
        if tunnels:
            mtu = min(x["mtu"] for x in tunnels) + M.VXLAN_OVERHEAD
    manifests = M.split(plan, placed, addresses=addresses, underlay_mtu=mtu,
                        images={k: img.name for k, img in images.items()})
    rows = []
    for host in sorted(set(manifests) | set(old)):
        new_net = manifests[host].net if host in manifests else None
        for r in diff_rows(old.get(host), new_net, net):
            rows.append({**r, "host": host})
    return {"testbed": testbed, "up": running, "rows": rows}
