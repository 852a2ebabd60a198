"""The host side of experiments: find a link's or node's kernel objects from what
`up` recorded on this host (the stored manifest, the ledger) and act on them.

Registered as gproc handlers (`experiment.*`), so the controller reaches every
host of a testbed the same way `up` does; with no inventory the controller calls
the same functions in its own process.

Runtime impairments (this kernel has no netem): a link that has no wire gets
one spliced in on the host side. Its host-side interface X (the veth or tap end
on the switch bridge BR, or one end of a switch-to-switch veth) moves to a small
bridge SB, which also holds the tap of a vde_switch A; a second vde_switch B owns
a tap on BR; wirefilter joins A and B and listens on a management socket:

    node ethN ==veth== X -- SB -- tapA ~ vde A ~ wirefilter ~ vde B ~ tapB -- BR

The node's interface, addresses and routing daemons stay as they are; later
changes are one line on the management socket (well under a second). A
point-to-point link (a veth between two namespaces) has no host-side end: its
wire goes inside the two namespaces, tc mirred redirecting the veth's traffic
through it (`splice_p2p`), and comes out again when no delay, jitter or loss
is left. A wire the
description declared (delay in the file) has its wirefilter restarted once with
a management socket. Every process, interface and directory made here is
recorded under netlang's ledger owner ("net", keys "TESTBED/...") before it
exists, so `down` removes it with the rest of the testbed; the settings are
recorded under owner "experiment".
"""

from __future__ import annotations

import base64
import fnmatch
import os
import socket
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import trio

from megafleet import cgroup, locks, proc
from megafleet.experiment.refs import IMPAIRMENTS, LinkRef, LinkSettings
from megafleet.gproc import handlers
from megafleet.ledger import Ledger
from megafleet.names import check_name, ifname

OWNER = "experiment"
NET_OWNER = "net"
MODULE = "megafleet.experiment.hostside"


class ExperimentError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Finding a testbed's links on this host
# ---------------------------------------------------------------------------

@dataclass
class LinkObjects:
    """One link's kernel objects on this host.

    key: unique on this host (an interface or wire name); host_ifs: host-side
    ends to take down for a pulled cable; ns_ifs: (namespace, ifname) ends inside
    nodes with no host-side end; splice: (ifname, bridge) where a wire can be
    spliced in, None when it cannot (point-to-point veths, VDE ports); wire: the
    description's wire (key, ends, mtu, props) when it declared an impairment."""

    ref: LinkRef
    key: str
    host_ifs: list[str] = field(default_factory=list)
    ns_ifs: list[tuple[str, str]] = field(default_factory=list)
    splice: tuple[str, str] | None = None
    wire: dict | None = None
    props: dict = field(default_factory=dict)
    mtu: int = 1500
    vde_plug: tuple[str, str] | None = None    # a namespace's VDE port: (switch socket, plug key)


def plan_of(net: dict[str, Any]):
    """The typed per-host plan (`netlang.hostplan.Plan`) of a stored manifest."""
    from megafleet.netlang.hostplan import Plan
    return Plan.from_json(net)


def host_links(net: dict[str, Any]) -> list[LinkObjects]:
    """Every link of this host's share of a plan (its JSON, as the manifest holds it)."""
    p = plan_of(net)
    out: list[LinkObjects] = []
    for port in p.ports:
        if port.kind == "wire":
            continue          # listed with the wires below
        obj = LinkObjects(LinkRef("port", port.node, port.switch), port.host_if, props=port.props.to_json(),
                          mtu=port.mtu)
        if port.kind in ("veth", "tap", "cveth"):
            obj.host_ifs = [port.host_if]
            obj.splice = (port.host_if, port.bridge)
        elif port.kind == "vde":
            obj.ns_ifs = [(port.ns, port.eth)]
            obj.vde_plug = (port.socket, port.host_if)
        out.append(obj)
    for link in p.p2p:
        a, b = sorted((link.node_a, link.node_b))
        out.append(LinkObjects(LinkRef("p2p", a, b), f"{link.ns_a}:{link.eth_a}",
                               ns_ifs=[(link.ns_a, link.eth_a), (link.ns_b, link.eth_b)],
                               props=link.props.to_json(), mtu=link.mtu))
    for tr in p.trunks:
        out.append(LinkObjects(LinkRef("swlink", tr.switch_a, tr.switch_b), tr.if_a, host_ifs=[tr.if_a, tr.if_b],
                               splice=(tr.if_b, tr.bridge_b), props=tr.props.to_json(), mtu=tr.mtu))
    for w in p.wires:
        kinds = ["node" if e.kind == "ns" else "switch" for e in w.ends]
        names = [e.node or e.where for e in w.ends]
        if kinds == ["node", "node"]:
            ref = LinkRef("p2p", *sorted(names))
        elif kinds == ["switch", "switch"]:
            ref = LinkRef("swlink", names[0], names[1])
        else:
            i = kinds.index("node")
            ref = LinkRef("port", names[i], names[1 - i])
        host_ifs = [e.ifname for e in w.ends if e.kind == "bridge" and e.ifname]
        # The host-side taps are enough for a pulled cable; else the namespaces' ends.
        ns_ifs = [] if host_ifs else [(e.where, e.ifname) for e in w.ends if e.kind == "ns"]
        out.append(LinkObjects(ref, w.key, host_ifs=host_ifs, ns_ifs=ns_ifs,
                               wire={"key": w.key, "ends": [e.to_json() for e in w.ends]},
                               props=w.props.to_json(), mtu=w.mtu))
    return out


def _manifest(testbed: str):
    from megafleet.host import load_manifest

    check_name(testbed, "testbed name")
    m = load_manifest(testbed)
    if m is None:
        raise ExperimentError(f"testbed {testbed!r} is not up on this host")
    return m


def _find(net: dict[str, Any], refs: list[LinkRef]) -> list[LinkObjects]:
    wanted = set(refs)
    return [o for o in host_links(net) if o.ref in wanted]


# ---------------------------------------------------------------------------
# wirefilter's management socket
# ---------------------------------------------------------------------------

def wf_command(mgmt: str | Path, commands: list[str], timeout: float = 2.0) -> None:
    """Send commands to a wirefilter management socket; each must answer
    '1000 Success'. Raises ExperimentError otherwise."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(mgmt))

        def prompt() -> str:
            buf = b""
            while not buf.endswith(b"$ "):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            return buf.decode(errors="replace")

        prompt()
        for cmd in commands:
            s.sendall(cmd.encode() + b"\n")
            answer = prompt()
            if "1000 Success" not in answer:
                raise ExperimentError(f"wirefilter refused {cmd!r}: {answer.strip()[:200]}")


def wf_lines(settings: dict[str, Any]) -> list[str]:
    """wirefilter commands for effective settings (absent = none)."""
    delay = f"{settings.get('delay_us', 0) / 1000:g}"
    if settings.get("jitter_us"):
        delay += f"+{settings['jitter_us'] / 1000:g}"
    rate = settings.get("rate_bit")
    return [f"delay {delay}", f"loss {settings.get('loss_pct', 0):g}",
            f"bandwidth {rate // 8 if rate else 0}"]


def effective(current: dict[str, Any], s: LinkSettings) -> dict[str, Any]:
    """The settings after applying `s` to `current` (dict of delay_us, jitter_us,
    loss_pct, rate_bit)."""
    out = {k: v for k, v in current.items() if k in IMPAIRMENTS}
    names = {"delay": "delay_us", "jitter": "jitter_us", "loss": "loss_pct", "rate": "rate_bit"}
    for key in s.clear:
        out.pop(names[key], None)
    for k, v in s.to_json().items():
        if k != "clear":
            out[k] = v
    return out


# ---------------------------------------------------------------------------
# Splicing a wire into a link, restarting a declared wire with a socket
# ---------------------------------------------------------------------------

def _record_pid(ledger: Ledger, key: str, pidfile: Path, **extra: Any) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            rp = proc.RecordedProcess.of(int(pidfile.read_text().strip()))
            ledger.record(NET_OWNER, "process", key, pidfile=str(pidfile), pid=rp.pid, start=rp.start, **extra)
            return
        except (OSError, ValueError, ProcessLookupError):
            time.sleep(0.02)
    raise ExperimentError(f"no pid in {pidfile} after starting a daemon")


def _wait_link(name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(f"/sys/class/net/{name}"):
        if time.monotonic() > deadline:
            raise ExperimentError(f"{name} did not appear")
        time.sleep(0.02)


def _wire_dir(t: str, ledger: Ledger) -> Path:
    from megafleet.netlang import live

    base = live.run_base(t) / "xwire"
    ledger.record(NET_OWNER, "dir", f"{t}/xwire", path=str(base))
    base.mkdir(parents=True, exist_ok=True)
    return base


def splice(t: str, obj: LinkObjects, settings: dict[str, Any], ledger: Ledger) -> str:
    """Splice a wirefilter into obj's host-side interface; returns its management
    socket. Record before create; the ledger's "net" records make `down` remove it."""
    if obj.splice is None:
        raise ExperimentError(f"{obj.ref.label}: no host-side interface to splice a wire into")
    x, br = obj.splice
    base = _wire_dir(t, ledger)
    sb, ta, tb = ifname(t, "yb", x), ifname(t, "ya", x), ifname(t, "yc", x)
    ledger.record_many(NET_OWNER, "link", [(f"{t}/{n}", {"ifname": n}) for n in (sb, ta, tb)])
    socks = []
    for end, tap in (("a", ta), ("b", tb)):
        sock, pidfile = base / f"{x}.{end}", base / f"{x}.{end}.pid"
        key = f"{t}/xwire/{x}.{end}"
        ledger.record(NET_OWNER, "process", key, pidfile=str(pidfile))
        proc.run(["vde_switch", "-s", str(sock), "-t", tap, "-d", "-p", str(pidfile), "--dirmode", "0700"])
        _record_pid(ledger, key, pidfile)
        socks.append(sock)
    mgmt = base / f"{x}.mgmt"
    _start_wirefilter(ledger, f"{t}/xwire/{x}.wf", socks, base / f"{x}.wf.pid", mgmt)
    for tap in (ta, tb):
        _wait_link(tap)
    lines = [f"link add {sb} type bridge", f"link set {sb} up",
             f"link set {ta} mtu {obj.mtu}", f"link set {tb} mtu {obj.mtu}",
             f"link set {ta} master {sb} up", f"link set {tb} master {br} up",
             # Last: the link moves onto the wire in one step.
             f"link set {x} nomaster", f"link set {x} master {sb}"]
    proc.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
    # No host addresses on the wire's own interfaces (no IPv6 chatter from the host).
    for n in (sb, ta, tb):
        try:
            Path(f"/proc/sys/net/ipv6/conf/{n}/disable_ipv6").write_text("1")
        except OSError:
            pass
    wf_command(mgmt, wf_lines(settings))
    return str(mgmt)


def unsplice(t: str, x: str, ledger: Ledger) -> None:
    """Remove the wire spliced into interface x (its processes and interfaces),
    tolerating what is already gone."""
    keys = {f"{t}/xwire/{x}.{end}" for end in ("a", "b", "wf")}
    for r in ledger.list(NET_OWNER, "process"):
        if r.key in keys and "pid" in r.data:
            proc.RecordedProcess(r.data["pid"], r.data["start"]).stop(grace=2)
    ledger.forget_many(NET_OWNER, "process", keys)
    names = [ifname(t, part, x) for part in ("yb", "ya", "yc")]
    for n in names:
        if os.path.exists(f"/sys/class/net/{n}"):
            proc.run(["ip", "link", "del", n], check=False)
    ledger.forget_many(NET_OWNER, "link", [f"{t}/{n}" for n in names])


def _start_wirefilter(ledger: Ledger, key: str, socks: list, pidfile: Path, mgmt: Path) -> None:
    ledger.record(NET_OWNER, "process", key, pidfile=str(pidfile))
    mgmt.unlink(missing_ok=True)
    proc.run(["wirefilter", "-v", f"{socks[0]}:{socks[1]}", "--daemon", "--pidfile", str(pidfile),
              "-M", str(mgmt)])
    _record_pid(ledger, key, pidfile)
    deadline = time.monotonic() + 5
    while not mgmt.exists():
        if time.monotonic() > deadline:
            raise ExperimentError(f"wirefilter did not open {mgmt}")
        time.sleep(0.02)


def rewire_declared(t: str, obj: LinkObjects, ledger: Ledger) -> str:
    """A wire the description declared, its wirefilter restarted with a
    management socket (~50 ms without traffic on that link). Returns the socket."""
    from megafleet.netlang import live

    w = obj.wire
    if w is None:
        raise ExperimentError(f"{obj.ref.label}: the description declares no wire on this link")
    base = live.run_base(t) / "wire"
    key = f"{t}/wire/{w['key']}.wf"
    old = next((r for r in ledger.list(NET_OWNER, "process") if r.key == key), None)
    if old is not None and "pid" in old.data:
        proc.RecordedProcess(old.data["pid"], old.data["start"]).stop(grace=2)
    socks = [e["where"] if e["kind"] == "vde" else str(base / f"{w['key']}.{i}") for i, e in enumerate(w["ends"])]
    mgmt = base / f"{w['key']}.mgmt"
    _start_wirefilter(ledger, key, socks, base / f"{w['key']}.wf.pid", mgmt)
    return str(mgmt)


# ---------------------------------------------------------------------------
# A wire in a point-to-point link (a veth pair between two namespaces)
# ---------------------------------------------------------------------------
#
# Such a link has no host-side end to move onto a wire, and this kernel has no
# netem. So the wire goes inside the two namespaces, with the veth left as it is
# (addresses, carrier, routing daemons untouched): in each node's namespace a
# vde_switch owns a tap W; tc (clsact, u32 match-all, mirred) sends everything
# the node's interface E transmits to W instead, and hands everything W
# receives to E as if E had received it:
#
#   node A: E_a egress -> W_a ~ vde ~ wirefilter ~ vde ~ W_b ingress -> E_b ingress: node B
#
# W has E's MAC address, so frames for E are "to this host" on W too (the
# kernel drops other hosts' unicast, ARP replies included). Removing it is the
# other way round: E's redirect goes first (traffic is back on the veth), then
# the processes (their taps go with them).

def p2p_tag(t: str, o: LinkObjects) -> str:
    """The name of a point-to-point link's wire (its files and ledger keys)."""
    ns, eth = o.ns_ifs[0]
    return ifname(t, "yp", ns, eth)


def p2p_tap(eth: str) -> str:
    """The wire's tap inside a node's namespace, next to the node's `eth`."""
    return ifname("yw", eth)


def _mac(ns: str, eth: str) -> str:
    out = proc.run(["ip", "-n", ns, "-o", "link", "show", eth]).stdout
    return out.split("link/ether ", 1)[1].split()[0]


def _wait_ns_link(ns: str, name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while proc.run(["ip", "-n", ns, "link", "show", name], check=False).returncode:
        if time.monotonic() > deadline:
            raise ExperimentError(f"vde_switch did not create {name} in {ns}")
        time.sleep(0.02)


def splice_p2p(t: str, o: LinkObjects, settings: dict[str, Any], ledger: Ledger) -> str:
    """Put a wire with `settings` into point-to-point link `o` (see above);
    returns its management socket. Processes recorded before they start (owner
    "net": `down` stops them); the taps and tc filters live in the nodes'
    namespaces and go with them."""
    tag = p2p_tag(t, o)
    base = _wire_dir(t, ledger)
    socks = []
    for i, (ns, eth) in enumerate(o.ns_ifs):
        sock, pidfile, key = base / f"{tag}.{i}", base / f"{tag}.{i}.pid", f"{t}/xwire/{tag}.{i}"
        ledger.record(NET_OWNER, "process", key, pidfile=str(pidfile))
        proc.run(["ip", "netns", "exec", ns, "vde_switch", "-s", str(sock), "-t", p2p_tap(eth), "-d",
                  "-p", str(pidfile), "--dirmode", "0700"])
        _record_pid(ledger, key, pidfile)
        socks.append(sock)
    mgmt = base / f"{tag}.mgmt"
    _start_wirefilter(ledger, f"{t}/xwire/{tag}.wf", socks, base / f"{tag}.wf.pid", mgmt)
    wf_command(mgmt, wf_lines(settings))          # impaired before any packet takes it
    for ns, eth in o.ns_ifs:
        tap = p2p_tap(eth)
        _wait_ns_link(ns, tap)
        proc.run(["ip", "-n", ns, "link", "set", tap, "address", _mac(ns, eth), "mtu", str(o.mtu), "up"])
        # The tap is plumbing: no addresses of its own, no IPv6 chatter onto the wire.
        proc.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{tap}.disable_ipv6=1"],
                 check=False)
        proc.run(["tc", "-n", ns, "-batch", "-"], input=(
            f"qdisc add dev {tap} clsact\n"
            f"filter add dev {tap} ingress protocol all prio 1 u32 match u32 0 0 "
            f"action mirred ingress redirect dev {eth}\n"))
    # Last, on both ends: the node's traffic moves onto the wire.
    for ns, eth in o.ns_ifs:
        proc.run(["tc", "-n", ns, "-batch", "-"], input=(
            f"qdisc add dev {eth} clsact\n"
            f"filter add dev {eth} egress protocol all prio 1 u32 match u32 0 0 "
            f"action mirred egress redirect dev {p2p_tap(eth)}\n"))
    return str(mgmt)


def unsplice_p2p(t: str, tag: str, ends: list[tuple[str, str]], ledger: Ledger) -> None:
    """Take the wire `tag` out of a point-to-point link whose ends are `ends`
    ((namespace, interface) pairs), tolerating what is already gone (a
    namespace removed with its node)."""
    for ns, eth in ends:
        proc.run(["tc", "-n", ns, "qdisc", "del", "dev", eth, "clsact"], check=False)
    keys = {f"{t}/xwire/{tag}.{end}" for end in ("0", "1", "wf")}
    for r in ledger.list(NET_OWNER, "process"):
        if r.key in keys and "pid" in r.data:
            proc.RecordedProcess(r.data["pid"], r.data["start"]).stop(grace=2)
    ledger.forget_many(NET_OWNER, "process", keys)
    for ns, eth in ends:
        # A non-persistent tap goes with its vde_switch; this is for one that lingers.
        if proc.run(["ip", "-n", ns, "link", "show", p2p_tap(eth)], check=False).returncode == 0:
            proc.run(["ip", "-n", ns, "link", "del", p2p_tap(eth)], check=False)


# A namespace's port on a VDE switch: its interface is the tap of a
# vde_plug2tap process plugged into the switch. The wire is a small vde_switch W
# joined to the description's switch by a wirefilter; the plug is started again
# on W (the node's interface is made again: a brief carrier loss, after which it
# gets its link up, addresses and the routes through it back from the plan).
# Taking it out plugs the node back into the switch the same way.

def _replug(t: str, m, o: LinkObjects, sock: str, ledger: Ledger) -> None:
    """Plug the VDE port `o` into the switch at `sock` (its plug restarted, the
    interface configured again from the namespace's plan)."""
    from megafleet.experiment.reconcile import ops_of
    from megafleet.netlang import live, netlink
    from megafleet.netlang.hostplan import op_from_json

    if o.vde_plug is None:
        raise ExperimentError(f"link {o.ref.label} is not a namespace's port on a VDE switch")
    (ns, eth), (switch_sock, plug) = o.ns_ifs[0], o.vde_plug
    key = f"{t}/plug/{plug}"
    old = next((r for r in ledger.list(NET_OWNER, "process") if r.key == key), None)
    # The pid file `up` gave the plug (next to the switch's socket), so `down` finds it the same way.
    pidfile = Path(old.data["pidfile"]) if old is not None and "pidfile" in old.data else \
        Path(switch_sock).parent / f"{plug}.pid"
    if old is not None and "pid" in old.data:
        proc.RecordedProcess(old.data["pid"], old.data["start"]).stop(grace=2)
    deadline = time.monotonic() + 10
    while proc.run(["ip", "-n", ns, "link", "show", eth], check=False).returncode == 0:
        if time.monotonic() > deadline:
            raise ExperimentError(f"{eth} in {ns} stayed after its plug stopped")
        time.sleep(0.02)
    ledger.record(NET_OWNER, "process", key, pidfile=str(pidfile))
    pidfile.unlink(missing_ok=True)
    proc.run(["ip", "netns", "exec", ns, "vde_plug2tap", "-s", sock, "-d", "-P", str(pidfile), eth])
    _record_pid(ledger, key, pidfile)
    _wait_ns_link(ns, eth)
    ops = [op_from_json(op) for op in m.net.get("ns_ops", {}).get(ns, [])]
    netlink.apply(str(live.NETNS_DIR / ns), ops_of(ops, {eth}), m.net.get("ns_sysctls", {}).get(ns))


def splice_vde(t: str, m, o: LinkObjects, settings: dict[str, Any], ledger: Ledger) -> str:
    """Put a wire with `settings` between VDE port `o`'s plug and its switch;
    returns the wire's management socket. Processes recorded (owner "net")
    before they start."""
    tag = ifname(t, "yv", o.key)
    base = _wire_dir(t, ledger)
    sock, pidfile, key = base / f"{tag}.w", base / f"{tag}.w.pid", f"{t}/xwire/{tag}.w"
    ledger.record(NET_OWNER, "process", key, pidfile=str(pidfile))
    proc.run(["vde_switch", "-s", str(sock), "-d", "-p", str(pidfile), "--dirmode", "0700"])
    _record_pid(ledger, key, pidfile)
    mgmt = base / f"{tag}.mgmt"
    _start_wirefilter(ledger, f"{t}/xwire/{tag}.wf", [sock, (o.vde_plug or ("", ""))[0]],
                      base / f"{tag}.wf.pid", mgmt)
    wf_command(mgmt, wf_lines(settings))
    _replug(t, m, o, str(sock), ledger)
    return str(mgmt)


def unsplice_vde(t: str, m, o: LinkObjects, tag: str, ledger: Ledger) -> None:
    """The VDE port's plug back on its switch, the wire `tag` gone."""
    _replug(t, m, o, (o.vde_plug or ("", ""))[0], ledger)
    keys = {f"{t}/xwire/{tag}.{end}" for end in ("w", "wf")}
    for r in ledger.list(NET_OWNER, "process"):
        if r.key in keys and "pid" in r.data:
            proc.RecordedProcess(r.data["pid"], r.data["start"]).stop(grace=2)
    ledger.forget_many(NET_OWNER, "process", keys)


def p2p_redirected(ns: str, eth: str) -> bool:
    """Whether a point-to-point link's end sends its traffic onto a wire."""
    out = proc.run(["tc", "-n", ns, "filter", "show", "dev", eth, "egress"], check=False).stdout
    return "mirred" in out


def p2p_wired(ns: str, eth: str) -> bool:
    """Whether a point-to-point link's end has a wire in it (its tap exists)."""
    return proc.run(["ip", "-n", ns, "link", "show", p2p_tap(eth)], check=False).returncode == 0


# ---------------------------------------------------------------------------
# link set / down / up / show
# ---------------------------------------------------------------------------

def _record_key(t: str, obj: LinkObjects) -> str:
    return f"{t}/{obj.key}"


def _records(t: str, ledger: Ledger) -> dict[str, dict[str, Any]]:
    """This testbed's link records; ones older than the testbed itself were left
    by an earlier testbed of the same name (forgotten here)."""
    born = next((r.created for r in ledger.list("up", "testbed") if r.key == t), None)
    mine = [r for r in ledger.list(OWNER, "link") if r.key.startswith(t + "/")]
    stale = [r.key for r in mine if born is not None and r.created < born]
    if stale:
        ledger.forget_many(OWNER, "link", stale)
    return {r.key: r.data for r in mine if r.key not in stale}


def _declared(obj: LinkObjects) -> dict[str, Any]:
    return {k: v for k, v in obj.props.items() if k in IMPAIRMENTS}


def link_set(t: str, refs: list[LinkRef], s: LinkSettings, ledger: Ledger | None = None) -> list[dict]:
    """Change the settings of the links `refs` that are on this host."""
    ledger = ledger or Ledger()
    m = _manifest(t)
    objs = _find(m.net, refs)
    # Point-to-point links get a wire inside their namespaces (splice_p2p), a
    # namespace's VDE port one between its plug and the switch (splice_vde).
    problems = [o for o in objs if o.splice is None and o.wire is None and o.ref.kind != "p2p"
                and o.vde_plug is None]
    for o in problems:
        if (s.delay_us or s.jitter_us or s.loss_pct is not None or s.rate_bit is not None) and not o.ns_ifs:
            raise ExperimentError(f"link {o.ref.label}: a guest's port on a VDE switch cannot be changed at "
                                  f"runtime (QEMU is plugged into the switch itself): declare its impairments "
                                  f"in the description, or use a bridge switch")
    records = _records(t, ledger)
    out = []
    for o in objs:
        key = _record_key(t, o)
        rec = records.get(key, {})
        current = rec.get("settings", _declared(o))
        new = effective(current, s)
        mgmt = rec.get("mgmt")
        ledger.record(OWNER, "link", key, **{**rec, "link": o.ref.to_json(), "settings": new,
                                             "state": rec.get("state", "up")})
        if o.ref.kind == "p2p" and o.wire is None:
            mgmt, rec = _set_p2p(t, o, new, rec, ledger)
        elif o.vde_plug is not None:
            mgmt, rec = _set_vde(t, m, o, new, rec, ledger)
        elif o.splice is None and o.wire is None:
            # A namespace's plug on a VDE switch (rate only): tc tbf.
            _tbf_ns(o, new.get("rate_bit"))
        elif mgmt and Path(mgmt).exists():
            wf_command(mgmt, wf_lines(new))
        elif o.wire is not None:
            mgmt = rewire_declared(t, o, ledger)
            wf_command(mgmt, wf_lines(new))
        elif o.splice is not None:           # the only case left
            mgmt = splice(t, o, new, ledger)
            rec = {**rec, "splice_if": o.splice[0]}
        ledger.record(OWNER, "link", key, **{**rec, "link": o.ref.to_json(), "settings": new,
                                             "state": rec.get("state", "up"), "mgmt": mgmt})
        out.append({"link": o.ref.label, "iface": o.key, "settings": new})
    return out


_IMPAIRMENTS = ("delay_us", "jitter_us", "loss_pct")


def _set_p2p(t: str, o: LinkObjects, new: dict[str, Any], rec: dict[str, Any],
             ledger: Ledger) -> tuple[str | None, dict[str, Any]]:
    """Settings `new` on a point-to-point link: with delay, jitter or loss, a
    wire inside its namespaces (spliced the first time; rate is the wire's
    bandwidth then); without, no wire (removed if there was one) and rate as tc
    tbf on both ends. Returns (the wire's management socket or None, the record
    with the wire's tag and ends, or without)."""
    mgmt = rec.get("mgmt")
    if any(k in new for k in _IMPAIRMENTS):
        if mgmt and rec.get("p2p_wire") and Path(mgmt).exists():
            wf_command(mgmt, wf_lines(new))
            return mgmt, rec
        if rec.get("p2p_wire"):
            # A wire that died with its namespaces (the testbed was rebuilt): its leftovers go first.
            unsplice_p2p(t, rec["p2p_wire"], [tuple(e) for e in rec.get("ends", o.ns_ifs)], ledger)
        tag = p2p_tag(t, o)
        # Recorded before it exists: a crash half-way leaves what link set
        # --clear (or a reconciling up) removes.
        ledger.record(OWNER, "link", _record_key(t, o), **{
            **rec, "link": o.ref.to_json(), "settings": new, "state": rec.get("state", "up"),
            "p2p_wire": tag, "ends": [list(e) for e in o.ns_ifs]})
        _tbf_ns(o, None)
        mgmt = splice_p2p(t, o, new, ledger)
        return mgmt, {**rec, "p2p_wire": tag, "ends": [list(e) for e in o.ns_ifs]}
    if rec.get("p2p_wire"):
        unsplice_p2p(t, rec["p2p_wire"], [tuple(e) for e in rec.get("ends", o.ns_ifs)], ledger)
    _tbf_ns(o, new.get("rate_bit"))
    return None, {k: v for k, v in rec.items() if k not in ("p2p_wire", "ends", "mgmt")}


def _set_vde(t: str, m, o: LinkObjects, new: dict[str, Any], rec: dict[str, Any],
             ledger: Ledger) -> tuple[str | None, dict[str, Any]]:
    """Settings `new` on a namespace's port on a VDE switch: with delay, jitter
    or loss, a wire between its plug and the switch (splice_vde; rate is the
    wire's bandwidth); without, the plug back on the switch and rate as tc tbf."""
    mgmt = rec.get("mgmt")
    if any(k in new for k in _IMPAIRMENTS):
        if mgmt and rec.get("vde_wire") and Path(mgmt).exists():
            wf_command(mgmt, wf_lines(new))
            return mgmt, rec
        tag = ifname(t, "yv", o.key)
        ledger.record(OWNER, "link", _record_key(t, o), **{
            **rec, "link": o.ref.to_json(), "settings": new, "state": rec.get("state", "up"), "vde_wire": tag})
        _tbf_ns(o, None)
        mgmt = splice_vde(t, m, o, new, ledger)
        return mgmt, {**rec, "vde_wire": tag}
    if rec.get("vde_wire"):
        unsplice_vde(t, m, o, rec["vde_wire"], ledger)
    _tbf_ns(o, new.get("rate_bit"))
    return None, {k: v for k, v in rec.items() if k not in ("vde_wire", "mgmt")}


def _tbf_ns(o: LinkObjects, rate: int | None) -> None:
    for ns, eth in o.ns_ifs:
        if rate is None:
            proc.run(["tc", "-n", ns, "qdisc", "del", "dev", eth, "root"], check=False)
        else:
            burst = max(1600, rate // 8 // 250)
            proc.run(["tc", "-n", ns, "qdisc", "replace", "dev", eth, "root", "handle", "1:", "tbf",
                      "rate", f"{rate}bit", "burst", str(burst), "latency", "50ms"])


def link_state(t: str, refs: list[LinkRef], up: bool, ledger: Ledger | None = None) -> list[dict]:
    """Pull (up=False) or plug back (up=True) the cables of the links `refs` on
    this host: their host-side ends go down, so the nodes see their carrier go;
    ends inside namespaces keep their addresses (keep_addr_on_down)."""
    ledger = ledger or Ledger()
    m = _manifest(t)
    objs = _find(m.net, refs)
    records = _records(t, ledger)
    out = []
    for o in objs:
        if not o.host_ifs and not o.ns_ifs:
            raise ExperimentError(f"link {o.ref.label}: a guest's port on a VDE switch cannot be taken down")
    for o in objs:
        key = _record_key(t, o)
        rec = records.get(key, {})
        ledger.record(OWNER, "link", key, **{**rec, "link": o.ref.to_json(),
                                             "settings": rec.get("settings", _declared(o)),
                                             "state": "up" if up else "down"})
        word = "up" if up else "down"
        lines = [f"link set {x} {word}" for x in o.host_ifs]
        if lines:
            proc.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")
        for ns, eth in o.ns_ifs:
            proc.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                      f"net.ipv6.conf.{eth}.keep_addr_on_down=1"], check=False)
            proc.run(["ip", "-n", ns, "link", "set", eth, word])
        out.append({"link": o.ref.label, "iface": o.key, "state": word})
    return out


def _operstate(o: LinkObjects) -> str:
    try:
        if o.host_ifs:
            flags = int(Path(f"/sys/class/net/{o.host_ifs[0]}/flags").read_text(), 16)
            return "up" if flags & 1 else "down"
        if o.ns_ifs:
            ns, eth = o.ns_ifs[0]
            out = proc.run(["ip", "-n", ns, "-o", "link", "show", eth], check=False).stdout
            return "up" if ",UP" in out or "<UP" in out else ("down" if out else "missing")
    except (OSError, ValueError):
        return "missing"
    return "n/a"


def link_show(t: str, ledger: Ledger | None = None) -> list[dict]:
    """Every link of the testbed on this host: state (live), settings (changed at
    runtime, else as declared), whether they were changed at runtime."""
    ledger = ledger or Ledger()
    m = _manifest(t)
    records = _records(t, ledger)
    rows = []
    for o in host_links(m.net):
        rec = records.get(_record_key(t, o))
        rows.append({"link": o.ref.label, "kind": o.ref.kind, "iface": o.key,
                     "state": _operstate(o), "settings": rec["settings"] if rec else _declared(o),
                     "changed": rec is not None})
    return rows


@dataclass(frozen=True)
class ChangedLink:
    """A link changed at run time on this host (`link set/down/up`), by the
    names at its ends as declared: its cable state ("up" or "down") and the
    impairments it runs with now (every one in force; a cleared one is
    absent, and the description's no longer apply)."""

    a: str
    b: str
    state: str
    settings: LinkSettings

    @property
    def ends(self) -> tuple[str, str]:
        """The two ends, sorted: how the web view keys its links."""
        first, second = sorted((self.a, self.b))
        return first, second

    def to_json(self) -> dict[str, Any]:
        return {"link": f"{self.a} -- {self.b}", "state": self.state, "settings": self.settings.to_json()}


def changed_links(t: str, ledger: Ledger) -> list[ChangedLink]:
    """Links changed at runtime on this host (for `status` and the web view)."""
    return [ChangedLink(r["link"][1], r["link"][2], r.get("state", "up"),
                        LinkSettings(**{k: v for k, v in (r.get("settings") or {}).items() if k in IMPAIRMENTS}))
            for r in _records(t, ledger).values() if "link" in r]


def forget(t: str, ledger: Ledger) -> None:
    """Drop this testbed's experiment records (after `down`)."""
    ledger.forget_many(OWNER, "link", [k for k in _records(t, ledger)])


def reapply(t: str, ledger: Ledger | None = None) -> list[dict]:
    """After `up` of the same file: put back the recorded settings and cable
    states where the kernel lost them (the network was rebuilt)."""
    ledger = ledger or Ledger()
    records = _records(t, ledger)
    if not records:
        return []             # the usual case: nothing to read (a big testbed's manifest) for nothing
    m = _manifest(t)
    done = []
    by_key = {_record_key(t, o): o for o in host_links(m.net)}
    for key, rec in records.items():
        o = by_key.get(key)
        if o is None:
            # The link is no longer in the testbed (a reconciling up removed it):
            # its spliced wire goes too.
            if rec.get("splice_if"):
                unsplice(t, rec["splice_if"], ledger)
            if rec.get("p2p_wire"):
                unsplice_p2p(t, rec["p2p_wire"], [tuple(e) for e in rec.get("ends", [])], ledger)
            if rec.get("vde_wire"):
                keys = {f"{t}/xwire/{rec['vde_wire']}.{end}" for end in ("w", "wf")}
                for r in ledger.list(NET_OWNER, "process"):
                    if r.key in keys and "pid" in r.data:
                        proc.RecordedProcess(r.data["pid"], r.data["start"]).stop(grace=2)
                ledger.forget_many(NET_OWNER, "process", keys)
            ledger.forget(OWNER, "link", key)
            continue
        settings = rec.get("settings", {})
        mgmt = rec.get("mgmt")
        lost = not (mgmt and Path(mgmt).exists())
        if rec.get("p2p_wire") and not all(p2p_redirected(ns, eth) for ns, eth in o.ns_ifs):
            lost = True           # the veth was made again (a changed link): its wire is not in it
        if settings != _declared(o) and lost:
            ledger.record(OWNER, "link", key, **{**rec, "mgmt": None, "settings": _declared(o)})
            s = LinkSettings(**{k: v for k, v in settings.items()},
                             clear=[n for n, f in (("delay", "delay_us"), ("jitter", "jitter_us"),
                                                   ("loss", "loss_pct"), ("rate", "rate_bit")) if f not in settings])
            link_set(t, [o.ref], s, ledger)
            done.append({"link": o.ref.label, "settings": settings})
        if rec.get("state") == "down" and _operstate(o) == "up":
            link_state(t, [o.ref], False, ledger)
            done.append({"link": o.ref.label, "state": "down"})
    return done


# ---------------------------------------------------------------------------
# Running commands inside nodes
# ---------------------------------------------------------------------------

@dataclass
class NodeTarget:
    """How to run a command inside one node: host argv prefix (in the cgroup of
    process `cgroup_pid` when set), or an exec socket; `error` when neither."""

    node: str
    kind: str                     # "namespace", or the guest's driver
    prefix: list[str] | None = None
    sock: Path | None = None
    error: str | None = None
    cgroup_pid: int | None = None


def node_targets(m, only: set[str] | None = None) -> dict[str, NodeTarget]:
    """How to run a command in each node of this host's share (manifest `m`),
    or only in the nodes named in `only` (a few checks' sources: asking every
    guest of a big testbed for its exec route was most of a verify's time)."""
    from megafleet.host import guest_exec_routes

    out = {node: NodeTarget(node, "namespace", ["ip", "netns", "exec", ns])
           for node, ns in m.net["netns"].items() if only is None or node in only}
    vms = [v for v in m.net["vms"] if only is None or v["name"] in only]
    drivers = {v["name"]: v["driver"] for v in vms}
    for name, route in (guest_exec_routes(vms).items() if vms else ()):
        if isinstance(route, str):
            out[name] = NodeTarget(name, drivers[name], error=route)
        else:
            out[name] = NodeTarget(name, drivers[name], list(route.prefix) if route.prefix else None,
                                   route.sock, cgroup_pid=route.cgroup_pid)
    return out


async def run_in(target: NodeTarget, argv: list[str], timeout: float) -> tuple[int | None, str, str | None]:
    """(rc, stdout, error) of argv run inside the node."""
    from megafleet.vm.guestexec import GuestExecError, exec_in_guest

    if target.error:
        return None, "", target.error
    if target.sock is not None:
        try:
            answer = await exec_in_guest(target.sock, argv, timeout)
        except GuestExecError as exc:
            return None, "", str(exc)
        return answer.rc, answer.stdout.decode(errors="replace"), None
    join = cgroup.kwargs_like(target.cgroup_pid) if target.cgroup_pid else {}
    with trio.move_on_after(timeout) as scope:
        r = await proc.arun((target.prefix or []) + argv, check=False, **join)
    if scope.cancelled_caught:
        return None, "", f"timed out after {timeout:g} s"
    return r.returncode, r.stdout + r.stderr, None


async def ping(t: str, checks: list[dict[str, Any]], timeout: float = 2.0, parallel: int = 16) -> list[dict]:
    """Each check {src, dst, addr, family}: one ping from inside `src` to `addr`
    (waiting up to `timeout` s for the answer). Returns the checks with ok,
    rtt_ms and error."""
    m = await trio.to_thread.run_sync(_manifest, t)
    targets = await trio.to_thread.run_sync(node_targets, m, {c["src"] for c in checks})
    limiter = trio.CapacityLimiter(parallel)
    results: list[dict] = []

    async def one(c: dict[str, Any]) -> None:
        target = targets.get(c["src"])
        async with limiter:
            if target is None:
                return          # another host's node: that host answers for it
            rc, out, err = await run_in(target, ["ping", "-c", "1", "-W", str(max(1, int(timeout))),
                                                     c["addr"]], timeout + 5)
        rtt = None
        if rc == 0 and "time=" in out:
            try:
                rtt = float(out.split("time=", 1)[1].split()[0].rstrip("ms"))
            except ValueError:
                pass
        results.append({**c, "ok": rc == 0, "rtt_ms": rtt,
                        "error": err or (None if rc == 0 else (out.strip().splitlines() or ["no answer"])[-1][:200])})

    async with trio.open_nursery() as nursery:
        for c in checks:
            nursery.start_soon(one, c)
    return results


# ---------------------------------------------------------------------------
# Nodes: stop, start, restart, kill
# ---------------------------------------------------------------------------

def _node_links(m, node: str) -> list[LinkRef]:
    return sorted({o.ref for o in host_links(m.net) if node in (o.ref.a, o.ref.b) and o.ref.kind != "swlink"},
                  key=lambda r: r.label)


def _frr_records(t: str, router: str, ledger: Ledger):
    return [r for r in ledger.list(NET_OWNER, "process") if r.key.startswith(f"{t}/frr/{router}/")]


async def node_action(t: str, nodes: list[str], action: str, ledger: Ledger | None = None) -> list[dict]:
    """stop | start | restart | kill the nodes of this host among `nodes`.

    Guests: stop (SIGTERM/QMP quit) or kill (SIGKILL) the guest; start boots it
    again from the same spec (name, MACs, addresses: the same identity).
    Namespace nodes: routers' FRR daemons stopped (kill: SIGKILL) and the node's
    cables pulled; start plugs them back and starts the daemons again."""
    if action not in ("stop", "start", "restart", "kill"):
        raise ExperimentError(f"unknown node action {action!r}")
    ledger = ledger or Ledger()
    m = await trio.to_thread.run_sync(_manifest, t)
    vms = {v["name"]: v for v in m.net["vms"]}
    mine = [n for n in nodes if n in vms or n in m.net["netns"]]
    out = []
    for node in mine:
        t0 = time.monotonic()
        if node in vms:
            await _guest_action(m, vms[node], action, ledger)
        else:
            await _namespace_action(t, m, node, action, ledger)
        out.append({"node": node, "action": action, "seconds": round(time.monotonic() - t0, 3)})
    return out


async def _guest_action(m, spec: dict, action: str, ledger: Ledger) -> None:
    from megafleet.vm.engine import Engine
    from megafleet.vm.spec import GuestSpec
    from megafleet.vm.api import apply as vm_apply

    name = spec["name"]
    if action in ("stop", "kill", "restart"):
        await Engine(ledger=ledger).stop(name, force=action == "kill")
    if action in ("start", "restart"):
        # Whatever host side of the guest's NICs is gone (a container's
        # launcher makes its veths again itself).
        await trio.to_thread.run_sync(_guest_nics, m, name)
        report = await vm_apply([GuestSpec.from_dict(spec)], **m.vm_options)
        bad = [r for r in report.results if r.outcome not in ("ready", "already")]
        if bad:
            raise ExperimentError(f"guest {name} did not come back: {bad[0].reason or bad[0].outcome}")
        from megafleet.netlang import live
        await trio.to_thread.run_sync(live.shape_container_ports, plan_of(m.net), {name})
        if name in m.net.get("vm_frr", {}):
            from megafleet.netlang import live
            await live.start_vm_frr({name: m.net["vm_frr"][name]})


def _guest_nics(m, name: str) -> None:
    """Guest `name`'s NICs as `up` made them, where their host side is missing
    (a tap outlives its QEMU; a container's launcher makes its veths itself,
    so there is nothing to make for it). The names are already in netlang's
    ledger records."""
    lines = []
    for port in plan_of(m.net).ports:
        if port.node == name and any(not os.path.exists(f"/sys/class/net/{i}") for i in port.links()):
            lines += port.ip_lines()
    if lines:
        proc.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")


def _namespace_stop(t: str, m, node: str, action: str, ledger: Ledger) -> None:
    for r in _frr_records(t, node, ledger):
        if "pid" in r.data:
            # kill: SIGKILL at once (a crash: routes stay in the kernel, neighbours
            # find out by their dead interval); stop: SIGTERM, then SIGKILL.
            proc.RecordedProcess(r.data["pid"], r.data["start"]).stop(grace=0 if action == "kill" else 3)
    links = _node_links(m, node)
    if links:
        link_state(t, links, False, ledger)


async def _namespace_action(t: str, m, node: str, action: str, ledger: Ledger) -> None:
    if action in ("stop", "kill", "restart"):
        await trio.to_thread.run_sync(_namespace_stop, t, m, node, action, ledger)
    if action in ("start", "restart"):
        links = _node_links(m, node)
        if links:
            await trio.to_thread.run_sync(link_state, t, links, True, ledger)
        if node in m.net.get("frr", {}):
            alive = [r for r in _frr_records(t, node, ledger)
                     if "pid" in r.data and proc.RecordedProcess(r.data["pid"], r.data["start"]).alive()]
            if not alive:
                from megafleet.netlang import live, routers
                p = live.Plan(t, netns={node: m.net["netns"][node]}, frr={node: m.net["frr"][node]})
                await routers.start(p, ledger, lambda text: None)


# ---------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------

def capture_point(m, what: dict[str, Any]) -> tuple[list[str], str]:
    """(argv prefix to run tcpdump where the interface lives, interface) for
    {"node", "iface"} | {"switch"} | {"link": LinkRef json}. Raises
    ExperimentError when it is not on this host."""
    p = plan_of(m.net)
    if "switch" in what:
        try:
            return [], p.bridge(what["switch"], None).ifname
        except KeyError:
            raise ExperimentError(f"switch {what['switch']} has no bridge on this host") from None
    if "link" in what:
        objs = _find(m.net, [LinkRef.from_json(what["link"])])
        if not objs:
            raise ExperimentError("link not on this host")
        o = objs[0]
        if o.host_ifs:
            return [], o.host_ifs[0]
        ns, eth = o.ns_ifs[0]
        if o.ref.kind == "p2p" and o.wire is None and p2p_wired(ns, eth):
            # What the node sends is redirected before the interface's capture
            # point; the wire's tap sees both directions.
            return ["ip", "netns", "exec", ns], p2p_tap(eth)
        return ["ip", "netns", "exec", ns], eth
    node, iface = what["node"], what.get("iface") or "eth0"
    if node in p.netns:
        return ["ip", "netns", "exec", p.netns[node]], iface
    spec = next((g for g in p.vms if g.name == node), None)
    if spec is None:
        raise ExperimentError(f"node {node} not on this host")
    index = int(iface[3:]) if iface.startswith("eth") and iface[3:].isdigit() else -1
    if not 0 <= index < len(spec.nics):
        raise ExperimentError(f"node {node} has no interface {iface} (it has eth0..eth{len(spec.nics) - 1})")
    nic = spec.nics[index]
    if not nic.ifname:
        raise ExperimentError(f"{node}:{iface} is a guest's port on a VDE switch: capture the switch's "
                              "link of a namespace node instead")
    # A guest's NIC is seen from its host-side end (tap or veth).
    return [], nic.ifname


def has_capture_point(t: str, what: dict[str, Any]) -> bool:
    try:
        capture_point(_manifest(t), what)
        return True
    except ExperimentError:
        return False


def capture_argv(m, what: dict[str, Any], count: int | None = None, bpf: str | None = None) -> tuple[list[str], str]:
    """(tcpdump argv writing pcap to stdout, interface) for a capture point on this host."""
    prefix, iface = capture_point(m, what)
    argv = prefix + ["tcpdump", "-i", iface, "-U", "-w", "-", "-n", "-s", "0", "--immediate-mode"]
    if count:
        argv += ["-c", str(int(count))]
    if bpf:
        argv += [bpf]          # one argv word: tcpdump parses it as its filter expression
    return argv, iface


async def capture(t: str, what: dict[str, Any], sink: Callable[[bytes], Any], *, count: int | None = None,
                  duration: float | None = None, bpf: str | None = None) -> dict[str, Any]:
    """Run tcpdump where `what` lives (on this host), writing pcap bytes to
    `sink` (an async callable) as they come, until `count` packets, `duration`
    seconds, or the caller is cancelled. Returns {"iface", "bytes"}."""
    m = await trio.to_thread.run_sync(_manifest, t)
    argv, iface = capture_argv(m, what, count, bpf)
    total = 0
    err = b""
    deadline = trio.current_time() + duration if duration else float("inf")
    p = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None      # both are pipes
    stdout: trio.abc.ReceiveStream = p.stdout
    stderr: trio.abc.ReceiveStream = p.stderr
    try:
        async def read_stderr() -> None:
            nonlocal err
            async for chunk in stderr:
                err += chunk

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stderr)
            with trio.move_on_at(deadline):
                async for chunk in stdout:
                    total += len(chunk)
                    await sink(bytes(chunk))
            if p.returncode is None:
                p.terminate()
                # What tcpdump still had buffered when it was told to stop.
                async for chunk in stdout:
                    total += len(chunk)
                    await sink(bytes(chunk))
            await p.wait()
    finally:
        if p.returncode is None:
            p.kill()
        with trio.CancelScope(shield=True):
            await p.wait()
    if p.returncode not in (0, -15) and total == 0:
        raise ExperimentError(f"tcpdump on {iface} failed: {err.decode(errors='replace').strip()[-300:]}")
    return {"iface": iface, "bytes": total}


# ---------------------------------------------------------------------------
# Fault events in telemetry
# ---------------------------------------------------------------------------

def fault_seq(testbed: str, message: str, source: str, **fields: Any) -> int:
    """What tells apart two fault events of one host in the same millisecond
    (the event's `seq`): a schedule's actions due at the same time start
    within a millisecond of each other, and an event's id is otherwise only
    host, kind and time, so the store kept the first and ignored the others.
    Derived from the event's content, not a counter: the same event inserted
    twice is still one."""
    text = "\0".join([testbed, message, source] + [f"{k}={v}" for k, v in sorted(fields.items())])
    # Never 0: `docs.event` reads a seq of 0 as none, which would put the
    # event back on the bare id that this seq exists to tell apart.
    return zlib.crc32(text.encode()) or 1


def record_fault(m, host: str, message: str, source: str, time_ms: int | None = None, **fields: Any) -> None:
    """A `fault` event in this host's telemetry store (best effort: telemetry
    never blocks an experiment)."""
    from megafleet.collect import docs as D
    from megafleet.collect.stores import open_store

    try:
        store = open_store(m.telemetry, timeout_ms=1000)
        try:
            store.insert(D.EVENTS, [D.event("fault", host, time_ms=time_ms, message=message, source=source,
                                            testbed=m.testbed, seq=fault_seq(m.testbed, message, source, **fields),
                                            **fields)])
        finally:
            store.close()
    except Exception:       # store away: the experiment goes on
        pass


# ---------------------------------------------------------------------------
# gproc handlers
# ---------------------------------------------------------------------------

def _dirs(payload: dict[str, Any]) -> None:
    from megafleet.host import use_dirs
    use_dirs(payload.get("state_dir"), payload.get("run_dir"), payload.get("cache_dir"))


def _fault(payload: dict[str, Any], host: str, done: list) -> None:
    if done and payload.get("message"):
        m = _manifest(payload["testbed"])
        record_fault(m, host, payload["message"], payload.get("source", "cli"), payload.get("time_ms"),
                     action=payload.get("action"))


@handlers.handler("experiment.link")
async def _link_handler(payload: Any, ctx: handlers.Context) -> list[dict]:
    _dirs(payload)
    t = payload["testbed"]
    if not await trio.to_thread.run_sync(lambda: _has_testbed(t)):
        return []
    refs = [LinkRef.from_json(r) for r in payload["links"]]
    op = payload["op"]
    # One controller per testbed and host; what it starts runs in the testbed's cgroup.
    async with locks.atestbed_lock(t, f"link {op}"):
        with cgroup.scope(t), cgroup.spawning("daemons"):
            if op == "set":
                s = LinkSettings.from_json(payload["settings"])
                done = await trio.to_thread.run_sync(lambda: link_set(t, refs, s))
            elif op in ("up", "down"):
                done = await trio.to_thread.run_sync(lambda: link_state(t, refs, op == "up"))
            else:
                raise ExperimentError(f"unknown link operation {op!r}")
    await trio.to_thread.run_sync(_fault, payload, ctx.host, done)
    return done


@handlers.handler("experiment.link-show")
async def _link_show_handler(payload: Any, ctx: handlers.Context) -> list[dict]:
    _dirs(payload)
    t = payload["testbed"]
    if not await trio.to_thread.run_sync(lambda: _has_testbed(t)):
        return []
    return await trio.to_thread.run_sync(link_show, t)


@handlers.handler("experiment.reapply")
async def _reapply_handler(payload: Any, ctx: handlers.Context) -> list[dict]:
    _dirs(payload)
    t = payload["testbed"]
    if not await trio.to_thread.run_sync(lambda: _has_testbed(t)):
        return []
    return await trio.to_thread.run_sync(reapply, t)


@handlers.handler("experiment.manifest")
async def _manifest_handler(payload: Any, ctx: handlers.Context) -> dict | None:
    """The network plan this host runs for the testbed (its stored manifest), or None."""
    _dirs(payload)
    from megafleet.host import load_manifest
    m = await trio.to_thread.run_sync(load_manifest, check_name(payload["testbed"], "testbed name"))
    return None if m is None else m.net


@handlers.handler("experiment.node")
async def _node_handler(payload: Any, ctx: handlers.Context) -> list[dict]:
    _dirs(payload)
    t = payload["testbed"]
    if not await trio.to_thread.run_sync(lambda: _has_testbed(t)):
        return []
    async with locks.atestbed_lock(t, f"node {payload['action']}"):   # one controller per testbed and host
        with cgroup.scope(t):                                          # restarted guests: its cgroup
            done = await node_action(t, payload["nodes"], payload["action"])
    await trio.to_thread.run_sync(_fault, payload, ctx.host, done)
    return done


@handlers.handler("experiment.ping")
async def _ping_handler(payload: Any, ctx: handlers.Context) -> list[dict]:
    _dirs(payload)
    t = payload["testbed"]
    if not await trio.to_thread.run_sync(lambda: _has_testbed(t)):
        return []
    return await ping(t, payload["checks"], payload.get("timeout", 2.0))


@handlers.handler("experiment.capture")
async def _capture_handler(payload: Any, ctx: handlers.Context) -> dict[str, Any]:
    """Streams the pcap to the caller as events {"pcap": base64} (gproc carries
    JSON); returns {"iface", "bytes"}, or {"absent": true} on hosts without it."""
    _dirs(payload)
    t = payload["testbed"]
    what = payload["what"]
    has = await trio.to_thread.run_sync(lambda: _has_testbed(t) and has_capture_point(t, what))
    if payload.get("probe"):
        # The controller streams a remote capture through gproc's exec (whose
        # output is a byte stream; handler events are coalesced snapshots).
        argv = None
        if has:
            argv = (await trio.to_thread.run_sync(lambda: capture_argv(
                _manifest(t), what, payload.get("count"), payload.get("filter"))))[0]
        return {"has": has, "argv": argv}
    if not has:
        return {"absent": True}

    async def sink(chunk: bytes) -> None:
        await ctx.emit({"pcap": base64.b64encode(chunk).decode()})

    return await capture(t, what, sink, count=payload.get("count"), duration=payload.get("duration"),
                         bpf=payload.get("filter"))


def _has_testbed(t: str) -> bool:
    # The file's presence is the answer: parsing a big testbed's manifest only
    # to say yes cost every handler (up's reapply and verify) its size.
    from megafleet.host import manifest_path
    return manifest_path(check_name(t, "testbed name")).exists()


def matching(names: list[str], pattern: str) -> list[str]:
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]

