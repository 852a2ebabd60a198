"""`megafleet up|down|plan|status|exec`: the controller side of a testbed.

`up` compiles the description, places its nodes on hosts, builds the images it
needs, reaches the hosts through gproc, pushes images where missing, cuts the
plan into one manifest per host (`megafleet.manifest`) and has every host apply
its own in parallel (`megafleet.host`), showing progress per phase and host and
a final summary. It does no host's work itself: without an inventory the local
machine is the only host and its `host.apply` runs in this process (the
embedded default).

The controller remembers each testbed it brought up (ledger owner
"up-controller": the inventory, the hosts, the description), so that `down`,
`status` and `exec` need no description. `down` itself is driven by each host's
own ledger: given only `--hosts`, it removes every testbed on every host.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

from megafleet.ledger import Ledger
from megafleet.names import InvalidName, check_name, description_id, same_description
from megafleet.names import testbed_name as names_testbed_name

if TYPE_CHECKING:       # imported when a command runs them
    from megafleet.experiment.verify import ScheduleRun, UpVerify
    from megafleet.host import NodeExec

CONTROLLER = "up-controller"
LOCAL = "local"
HOST_MODULES = ["megafleet.host"]
DEFAULT_HOST_MEM_MB = 8192


class UpError(click.ClickException):
    pass


# ---------------------------------------------------------------------------
# Output: progress lines and tables
# ---------------------------------------------------------------------------

class Output:
    """Progress lines with elapsed time; to stderr when stdout carries JSON."""

    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.t0 = time.monotonic()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        click.echo(f"[{time.monotonic() - self.t0:6.1f}s] {text}", err=self.json_mode)

    def event(self, host: str, event: dict[str, Any]) -> None:
        phase = event.get("phase", "?")
        if "text" in event:
            self.line(f"{phase:<8} {host}: {event['text']}")
        elif phase == "vm" and "done" in event:
            extra = f"  ({event['failed_guest']} failed: {event['reason']})" if "failed_guest" in event else ""
            self.line(f"{phase:<8} {host}: {event['done']}/{event['total']} guests "
                      f"({event['ready']} ready, {event['failed']} failed){extra}")
        elif event.get("state") == "start":
            total = f" ({event['total']} guests)" if "total" in event else ""
            self.line(f"{phase:<8} {host}: starting{total}")
        elif phase == "done":
            self.line(f"{'done':<8} {host}: {event['ready']} ready, {event['failed']} failed")
        elif phase == "down" and event.get("state") == "done":
            self.line(f"{'down':<8} {host}: done in {event['seconds']:.1f} s")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Compile and place
# ---------------------------------------------------------------------------

def testbed_name(path: Path, name: str | None) -> str:
    """The testbed's name: given, or derived from the file name as `net up`
    derives it (`megafleet.names.testbed_name`: at most 8 characters, since it
    prefixes interface names, which Linux limits to 15 bytes)."""
    try:
        return names_testbed_name(path, name)
    except InvalidName as exc:
        raise UpError(str(exc)) from None


def compile_testbed(path: Path, defines: dict[str, str]):
    from megafleet.netlang import CompileError, compile_file

    if not path.is_file():
        raise UpError(f"{path}: no such file")
    try:
        return compile_file(path, defines, graph=False)
    except CompileError as exc:
        raise UpError(str(exc)) from None


def parse_defines(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UpError(f"-D {item!r}: expected NAME=VALUE")
        out[key] = value
    return out


def local_mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return DEFAULT_HOST_MEM_MB


@dataclass
class Target:
    """Where a testbed runs: the local machine, or the hosts of an inventory."""

    inventory_path: str | None = None
    hosts: list[str] = field(default_factory=list)
    host_mem_mb: int | None = None
    host_state: str | None = None      # "{host}" template: per-host state/run dirs
    ksm_sharing: float = 0.3           # share of guest memory KSM is expected to merge

    def inventory(self):
        from megafleet.gproc import inventory
        if self.inventory_path is None:
            raise UpError("no inventory: this target is this host alone (give --inventory FILE)")
        try:
            return inventory.load(self.inventory_path)
        except (inventory.InventoryError, OSError) as exc:
            raise UpError(str(exc)) from None

    @property
    def embedded(self) -> bool:
        return self.inventory_path is None

    def offers(self):
        from megafleet.placement import HostOffer
        if self.embedded:
            return [HostOffer(LOCAL, 1_000_000, self.host_mem_mb or int(local_mem_mb() * 0.8))]
        inv = self.inventory()
        chosen = inv.select(self.hosts or None)
        return [HostOffer(h.name, h.capacity or 1_000_000, self.host_mem_mb or h.mem_mb or DEFAULT_HOST_MEM_MB)
                for h in chosen]

    def dirs(self, host: str) -> dict[str, str | None]:
        if not self.host_state:
            return {"state_dir": None, "run_dir": None, "cache_dir": None}
        base = self.host_state.replace("{host}", host)
        return {"state_dir": f"{base}/state", "run_dir": f"{base}/run", "cache_dir": f"{base}/cache"}

    def to_json(self) -> dict[str, Any]:
        return {"inventory": self.inventory_path, "hosts": self.hosts,
                "host_mem_mb": self.host_mem_mb, "host_state": self.host_state,
                "ksm_sharing": self.ksm_sharing}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Target":
        return cls(d.get("inventory"), list(d.get("hosts") or []), d.get("host_mem_mb"), d.get("host_state"),
                   d.get("ksm_sharing", 0.3))


def make_plan(net, testbed: str, target: Target):
    """netlang's plan of the whole testbed and the placement of its nodes."""
    from megafleet import manifest, placement
    from megafleet.netlang import live

    try:
        plan = live.plan(net, testbed)
    except live.LiveError as exc:
        raise UpError(str(exc)) from None
    try:
        placed = placement.place(manifest.demands(net, plan), target.offers(), ksm_sharing=target.ksm_sharing)
    except placement.PlacementError as exc:
        raise UpError(f"placement: {exc} (memory per host: --host-mem MB; expected KSM "
                      f"sharing of guest RAM: --ksm-sharing)") from None
    try:
        manifest.layout(plan, placed)        # links that cannot cross hosts: fail now
    except manifest.ManifestError as exc:
        raise UpError(f"placement: {exc}") from None
    return plan, placed


def placement_rows(plan, placed) -> list[dict[str, Any]]:
    from megafleet.vm.driver import DRIVER_KINDS
    vms = {v.name: v for v in plan.vms}
    rows = []
    for host, nodes in placed.hosts.items():
        kinds = {"namespaces": 0, "vms": 0, "containers": 0}
        for n in nodes:
            v = vms.get(n)
            kinds["namespaces" if v is None else DRIVER_KINDS[v.driver].summary_column] += 1
        segments = sorted(s for s, hs in placed.segment_hosts.items() if host in hs)
        rows.append({"host": host, "nodes": len(nodes), **kinds, "segments": segments})
    return rows


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def _image_progress(out: Output, name: str, text: str) -> None:
    out.line(f"image    {name}: {text}")


def build_images(net, plan, out: Output) -> dict[str, Any]:
    """Build (or find in the cache) every image a guest uses. Returns the description's
    image name -> store Image."""
    from megafleet.imagegen import store

    used = sorted({v.image for v in plan.vms})
    images = {}
    for name in used:
        if name not in net.images:
            raise UpError(f"image {name!r} is used but not declared in the description")
        spec = net.images[name][0]
        try:
            image = store.build(spec, progress=functools.partial(_image_progress, out, name))
        except store.SpecError as exc:
            raise UpError(str(exc)) from None
        out.line(f"image    {name}: {image.name} {image.short} "
                 f"({'cached' if image.cache_hit else f'built in {image.build_seconds:.1f} s'})")
        images[name] = image
    return images


async def push_images(fleet, images: dict[str, Any], probes: dict[str, Any], out: Output) -> dict[str, str]:
    """Copy image files to the hosts that lack them, and point each host's name of
    the image at this build (gproc skips hosts that already have the same bytes).
    Returns host -> error for hosts where that failed."""
    import tempfile

    failed: dict[str, str] = {}

    async def push(path: str, relative: str, hosts: list[str], **kwargs) -> None:
        # One push (one trip down the tree) per cache directory in use.
        by_cache: dict[str, list[str]] = {}
        for h in hosts:
            if h not in failed:
                by_cache.setdefault(probes[h]["cache_dir"], []).append(h)
        for cache, group in sorted(by_cache.items()):
            r = await fleet.push(path, f"{cache}/{relative}", hosts=group, **kwargs)
            for h, res in r.results.items():
                if res.status != "ok":
                    failed[h] = res.error or "push failed"

    for image in images.values():
        need = [h for h, p in probes.items() if image.hash in p.get("missing_images", ())]
        if need:
            out.line(f"push     {image.name} {image.short}: to {len(need)} hosts")
            for fname in ("vmlinuz", "initramfs.img", "manifest.json"):
                await push(str(image.dir / fname), f"images/{image.hash}/{fname}", need)
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write(image.hash + "\n")
        try:
            await push(f.name, f"names/{image.name}", list(probes), mode=0o644)
        finally:
            os.unlink(f.name)
    return failed


# ---------------------------------------------------------------------------
# The controller's record of what it brought up
# ---------------------------------------------------------------------------

def deployments(ledger: Ledger | None = None) -> dict[str, dict[str, Any]]:
    ledger = ledger or Ledger()
    return {r.key: r.data for r in ledger.list(CONTROLLER, "testbed")}


def _underlay_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return socket.gethostbyname(address)


# ---------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------

async def up(path: Path, target: Target, *, name: str | None = None, defines: dict[str, str] | None = None,
             telemetry: str | None = None, ksm: bool = True, vm_options: dict[str, Any] | None = None,
             out: Output | None = None, fanout: int = 8, collect_interval: float = 5.0,
             info: dict[str, Any] | None = None, verify: bool = True) -> UpSummary:
    """Bring a testbed up; returns the summary (also for partial failures).
    `info`, if given, is filled as the plan becomes known (testbed, guests,
    namespaces, hosts): what an interrupted run's summary is made of."""
    from megafleet import host as host_side
    from megafleet import manifest

    out = out or Output(quiet=True)
    phases: dict[str, float] = {}
    t0 = time.monotonic()

    def phase_done(phase: str, since: float) -> float:
        phases[phase] = round(time.monotonic() - since, 3)
        return time.monotonic()

    testbed = testbed_name(path, name)
    source = description_id(path)
    ledger = Ledger()
    refuse_taken(testbed, source, target, ledger)
    t = time.monotonic()
    net = await trio.to_thread.run_sync(compile_testbed, path, defines or {})
    counts = net.counts()
    out.line(f"compile  {path}: {counts['vm']} vms, {counts['host']} hosts, {counts['router']} routers, "
             f"{counts['switch']} switches")
    for warning in net.import_warnings:     # a foreign file: what was not carried over
        out.line(f"import   {warning}")
    t = phase_done("compile", t)
    plan, placed = await trio.to_thread.run_sync(make_plan, net, testbed, target)
    used = [h for h, nodes in placed.hosts.items() if nodes]
    if info is not None:
        info.update(guests=len(plan.vms), namespaces=len(plan.netns), hosts=used)
    from megafleet.manifest import spanning_segments
    spanning = await trio.to_thread.run_sync(spanning_segments, plan, placed)
    out.line(f"place    {len(net.index)} nodes on {len(used)} hosts, "
             f"{len(spanning)} spanning segments")
    t = phase_done("place", t)
    images = await trio.to_thread.run_sync(build_images, net, plan, out)
    t = phase_done("images", t)
    image_names = {k: img.name for k, img in images.items()}
    # Each host's engine admits with the memory model, budget and KSM sharing
    # placement used, so what was placed on a host boots there.
    budgets = {o.name: o.mem_mb for o in target.offers()}
    vm_options = {**(vm_options or {}), "ksm_sharing": target.ksm_sharing, "budget_option": "--host-mem"}
    common: dict[str, Any] = {"ksm": ksm, "telemetry": telemetry, "vm_options": vm_options,
                              "source": source, "collect_interval": collect_interval}
    # Each host gets the file:line of its nodes' `exec` statements: a failed
    # startup command there names its line, as `net up` does.
    from megafleet.netlang.nsexec import statement_locs
    exec_locs = statement_locs(net, {c.node for cmds in plan.ns_exec.values() for c in cmds})

    results: dict[str, dict[str, Any]] = {}
    host_errors: dict[str, str] = {}
    record = {"source": source, "defines": defines or {}, "target": target.to_json(),
              "hosts": used, "started": time.time()}
    # Record before create: `down` must find this testbed even if we crash now.
    ledger.record(CONTROLLER, "testbed", testbed, **record)

    if target.embedded:
        manifests = manifest.split(plan, placed, images=image_names, **common)
        for h, m in manifests.items():
            m.vm_options = {**m.vm_options, "mem_budget_mb": budgets[h]}
            m.exec_locs = {n: locs for n, locs in exec_locs.items() if n in m.net["netns"]}
        t = phase_done("manifests", t)
        for h, m in manifests.items():
            try:
                results[h] = await host_side.apply(m, functools.partial(out.event, h))
            except Exception as exc:       # the host failed: report it, keep the record for down
                host_errors[h] = f"{type(exc).__name__}: {exc}"
        phase_done("apply", t)
    else:
        from megafleet.gproc import Fleet

        inv = target.inventory()
        addresses = {h: _underlay_address(inv.by_name[h].address) for h in used}
        async with Fleet.connect(inv, hosts=used, fanout=fanout) as fleet:
            for h, st in fleet.status.items():
                if st.state != "up":
                    host_errors[h] = f"unreachable: {st.error}"
            out.line(f"connect  {len(used) - len(host_errors)}/{len(used)} hosts reached "
                     f"({fleet.setup_seconds:.1f} s)")
            t = phase_done("connect", t)
            reachable = [h for h in used if h not in host_errors]
            peers = tunnel_peers(spanning)
            per_host = {h: {"peers": [addresses[o] for o in sorted(peers.get(h, ()))],
                            "images": [img.hash for img in images.values()], **target.dirs(h)}
                        for h in reachable}
            report = await fleet.call("host.probe", per_host=per_host, modules=HOST_MODULES, timeout=60)
            probes = {}
            for h, r in report.results.items():
                if r.status == "ok":
                    probes[h] = r.value
                else:
                    host_errors[h] = f"{r.status}: {r.error}"
            mtu = min([p["mtu"] for p in probes.values()] or [1500])
            t = phase_done("probe", t)
            failed_push = await push_images(fleet, images, probes, out)
            host_errors.update({h: f"image push: {e}" for h, e in failed_push.items()})
            t = phase_done("push", t)
            # Each manifest as its JSON text as soon as it is made (relays pass it
            # on without parsing it): every host's manifest as objects at once was
            # the controller's largest memory at a million guests.
            go: dict[str, str] = {}
            lowered: dict[str, int] = {}
            for h, m in manifest.iter_split(plan, placed, addresses=addresses, underlay_mtu=mtu,
                                            images=image_names, **common):
                m.vm_options = {**m.vm_options, "mem_budget_mb": budgets[h]}
                m.exec_locs = {n: locs for n, locs in exec_locs.items() if n in m.net["netns"]}
                d = target.dirs(h)
                m.state_dir, m.run_dir, m.cache_dir = d["state_dir"], d["run_dir"], d["cache_dir"]
                lowered.update({x.segment: x.mtu for x in m.vxlan})
                if h not in host_errors:
                    go[h] = json.dumps(m.to_json())
            if lowered:
                out.line(f"vxlan    {len(lowered)} spanning segments, underlay MTU {mtu}, "
                         f"segment MTU {min(lowered.values())}")
            t = phase_done("manifests", t)
            report = await fleet.call("host.apply", per_host=go, modules=HOST_MODULES, timeout=3600,
                                      on_event=out.event, encoded=True)
            for h, r in report.results.items():
                if r.status == "ok":
                    results[h] = r.value
                else:
                    host_errors[h] = f"{r.status}: {r.error}"
            phase_done("apply", t)

    summary = summarize(testbed, placed, plan, results, host_errors, phases, time.monotonic() - t0)
    if results:
        # The testbed works when its assertions hold live, not when guests are ready.
        from megafleet.experiment import verify as live_verify
        after = await live_verify.after_up(testbed, out.line, verify=verify, net=net)
        summary.verify, summary.schedule = after.verify, after.schedule
        if not after.verify.ok:
            summary.ok = False
    done = summary.to_json()
    ledger.record(CONTROLLER, "testbed", testbed, **record, summary={
        k: done[k] for k in ("guests", "ready", "failed", "namespaces", "seconds")})
    return summary


def refuse_taken(testbed: str, source: str, target: Target, ledger: Ledger) -> None:
    """UpError when the testbed name is held by another description than
    `source` (`names.description_id`): the same file, edited, is the same
    testbed (`up` applies the difference); another file is not, and `up` over it
    would turn one testbed into the other. Checked before anything is recorded:
    the running testbed and the controller's record of it stay as they are.
    This controller's record says who holds the name; on the local machine the
    host's own records too (a testbed of `net up`). Remote hosts check their
    records themselves (host.apply)."""
    from megafleet import host as host_side

    held = deployments(ledger).get(testbed, {}).get("source")
    if not held and target.embedded:
        held = host_side.held_by(testbed, ledger)
    if held is not None and not same_description(held, source):
        raise UpError(host_side.taken_message(testbed, held))


def tunnel_peers(spanning: list[dict[str, Any]]) -> dict[str, set[str]]:
    """host -> the hosts it will have VXLAN tunnels to (whose underlay MTU
    matters to it). Not every other host: at thousands of hosts that list was
    hosts x hosts addresses in the probe, each probed by the host."""
    peers: dict[str, set[str]] = {}
    for seg in spanning:
        for h in seg["hosts"]:
            peers.setdefault(h, set()).update(o for o in seg["hosts"] if o != h)
    return peers


@dataclass
class HostRow:
    """One host's line of `up`'s summary: its status ("ok", "failed", or
    "interrupted" and gproc's statuses), its nodes, guests and how many of
    them are ready or failed; an apply's seconds and phases (seconds per
    phase) when the host answered, the error when it did not."""

    host: str
    status: str
    nodes: int
    guests: int
    ready: int
    failed: int
    seconds: float | None = None
    phases: dict[str, float] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class FailedNode:
    """A node that is not up: its host, and why (a host that failed as a
    whole fails each of its nodes with "host failed: ...")."""

    node: str
    host: str
    reason: str

    @property
    def host_failed(self) -> bool:
        return self.reason.startswith("host failed")


@dataclass
class UpSummary:
    """What `up` did, for its table and final line and as `--json`:
    `guests` and `namespaces` planned, `ready` guests and `namespaces_up`,
    the nodes that `failed`, `phases` (seconds per phase, the hosts' as the
    slowest host saw them), and `ok` when every node is up and every
    assertion holds. `verify` and `schedule` are what experiment.verify's
    after_up did; `interrupted` marks a summary made from what the hosts
    reported after Ctrl-C, with `error` when they did not report."""

    testbed: str
    seconds: float
    guests: int
    namespaces: int
    ready: int = 0
    namespaces_up: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    hosts: list[HostRow] = field(default_factory=list)
    failed: list[FailedNode] = field(default_factory=list)
    ok: bool = False
    interrupted: bool = False
    error: str | None = None
    verify: UpVerify | None = None
    schedule: ScheduleRun | None = None

    def to_json(self) -> dict[str, Any]:
        """The summary as `up --json` prints it (absent: interrupted when
        false, error, verify and schedule when None)."""
        d: dict[str, Any] = {"testbed": self.testbed, "seconds": self.seconds, "phases": self.phases,
                             "hosts": [h.to_json() for h in self.hosts], "guests": self.guests,
                             "namespaces": self.namespaces, "namespaces_up": self.namespaces_up,
                             "ready": self.ready, "failed": [dataclasses.asdict(f) for f in self.failed],
                             "ok": self.ok}
        if self.interrupted:
            d["interrupted"] = True
        if self.error is not None:
            d["error"] = self.error
        if self.verify is not None:
            d["verify"] = self.verify.to_json()
        if self.schedule is not None:
            d["schedule"] = self.schedule.to_json()
        return d


def summarize(testbed, placed, plan, results, host_errors, phases, seconds) -> UpSummary:
    """The summary of an `up` from each host's apply result (host.apply's
    JSON, by host) and the hosts that failed (host -> error)."""
    vm_names = {v.name for v in plan.vms}
    summary = UpSummary(testbed, round(seconds, 3), guests=len(vm_names), namespaces=len(plan.netns),
                        phases=phases)
    host_phases: dict[str, dict[str, float]] = {}
    for h, nodes in placed.hosts.items():
        if not nodes:
            continue
        guests = sum(1 for n in nodes if n in vm_names)
        if h in results:
            r = results[h]
            summary.ready += r["ready"]
            summary.failed += [FailedNode(f["name"], h, f["reason"]) for f in r["failed"]]
            host_phases[h] = r["phases"]
            summary.namespaces_up += r.get("namespaces", 0)
            summary.hosts.append(HostRow(h, "ok", len(nodes), guests, r["ready"], len(r["failed"]),
                                         seconds=r["seconds"], phases=r["phases"]))
        else:
            why = host_errors.get(h, "no result")
            summary.failed += [FailedNode(n, h, f"host failed: {why}") for n in nodes]
            summary.hosts.append(HostRow(h, "failed", len(nodes), guests, 0, len(nodes), error=why))
    # Per-host phases, as the slowest host saw them (they run in parallel).
    for phase in ("net", "ksm", "vm", "collect"):
        values = [p.get(phase, 0.0) for p in host_phases.values()]
        if values:
            phases[f"host_{phase}"] = round(max(values), 3)
    summary.ok = not summary.failed and not host_errors
    return summary


def print_summary(summary: UpSummary) -> None:
    click.echo("")
    rows = [[h.host, h.status, h.nodes, h.guests, h.ready, h.failed,
             f"{h.seconds:.1f}" if h.seconds is not None else "", h.error or ""]
            for h in summary.hosts]
    click.echo(table(rows, ["HOST", "STATUS", "NODES", "GUESTS", "READY", "FAILED", "SECONDS", "ERROR"]))
    click.echo("")
    if summary.phases:
        click.echo("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.phases.items()))
    failed_guests = [f for f in summary.failed if not f.host_failed]
    click.echo(f"testbed {summary.testbed}: {summary.ready}/{summary.guests} guests ready, "
               f"{len(summary.failed)} nodes failed, {summary.namespaces} namespace nodes, "
               f"{summary.seconds:.1f} s")
    for f in failed_guests[:10]:
        click.echo(f"  failed: {f.node} on {f.host}: {f.reason}")
    if len(failed_guests) > 10:
        click.echo(f"  ... and {len(failed_guests) - 10} more (see --json or megafleet status)")
    if summary.verify is not None or summary.schedule is not None:
        from megafleet.experiment.verify import summary_lines
        for line in summary_lines(summary.verify, summary.schedule):
            click.echo(line)
    click.echo(final_line(summary))


def final_line(summary: UpSummary) -> str:
    """The last line of `up`: what is true now, and how to remove it."""
    t = summary.testbed
    guests, ready = summary.guests, summary.ready
    ns, ns_up = summary.namespaces, summary.namespaces_up
    remove = f"'megafleet down {t}' removes it"
    parts = []
    if guests:
        parts.append(f"{ready} of {guests} guests up")
    if ns:
        parts.append(f"{ns_up} of {ns} namespace nodes up")
    what = ", ".join(parts) or "no nodes"
    nothing = ready == 0 and ns_up == 0
    if summary.interrupted:
        if nothing:
            return f"interrupted: nothing is up; {remove.replace('it', 'what was recorded')}"
        return f"interrupted: {what}; {remove}"
    failed = len(summary.failed)
    if nothing:
        return (f"nothing is up ({failed} nodes failed); 'megafleet down {t}' removes what was "
                "recorded")
    if failed:
        return (f"up with {failed} failed nodes ({what}): 'megafleet status' shows them, "
                f"{remove}")
    return (f"up: {what}; the testbed stays up: 'megafleet status' shows it, "
            f"'megafleet exec NODE -- CMD' runs commands in it, {remove}")


# ---------------------------------------------------------------------------
# Interrupts and the one-controller lock
# ---------------------------------------------------------------------------

async def guarded_up(path: Path, target: Target, *, name: str | None, wait: bool, out: Output,
                     host_state: str | None = None, **kwargs: Any) -> UpSummary:
    """`up` holding the testbed's lock (waiting with a message, or UpError at
    once when wait is False), and interruptible: the first SIGINT or SIGTERM
    cancels the run (nothing new starts; steps under way in worker threads
    finish) and the summary comes from what the hosts report is up, with
    "interrupted": True; a second one exits at once with status 130."""
    from megafleet import locks

    testbed = testbed_name(path, name)
    info: dict[str, Any] = {"testbed": testbed}
    state = {"signals": 0}
    summary: UpSummary | None = None
    error: Exception | None = None
    t0 = time.monotonic()

    async def watch(work: trio.CancelScope, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _sig in signals:
                state["signals"] += 1
                if state["signals"] == 1:
                    click.echo(f"\ninterrupted: starting nothing new, stopping the steps under way "
                               f"(interrupt again to abort at once)", err=True)
                    work.cancel()
                else:
                    _abort(testbed)

    async with trio.open_nursery() as nursery:
        work = trio.CancelScope()
        await nursery.start(watch, work)
        with work:
            try:
                async with locks.atestbed_lock(testbed, "up", wait=wait, on_wait=lambda m: out.line(f"lock     {m}")):
                    summary = await up(path, target, name=testbed, out=out, info=info, **kwargs)
            except locks.LockBusy as exc:
                error = UpError(f"{exc}; without --no-wait, up waits for it")
            except Exception as exc:
                # Raised outside the nursery below: the user sees this error,
                # not an exception group around it.
                error = exc
            if testbed not in deployments():
                locks.forget(testbed)       # nothing was recorded: no lock file either
        if state["signals"]:
            summary = None
            with trio.move_on_after(60):
                summary = await interrupted_summary(testbed, target, info, host_state, time.monotonic() - t0)
            if summary is None:
                summary = _empty_summary(testbed, info, time.monotonic() - t0)
                summary.error = "the hosts did not report in 60 s"
        nursery.cancel_scope.cancel()
    if error is not None and not state["signals"]:
        raise error
    if summary is None:      # not reached: up returned one, or the hosts' report replaced it
        raise UpError(f"up of {testbed} ended without a summary")
    return summary


def _abort(testbed: str) -> None:
    """A second interrupt of `up`: say what to do, exit 130 at once (no traceback)."""
    click.echo(f"aborted: 'megafleet status' shows what is up, "
               f"'megafleet down {testbed}' removes it", err=True)
    sys.stdout.flush()
    os._exit(130)


def _empty_summary(testbed: str, info: dict[str, Any], seconds: float) -> UpSummary:
    return UpSummary(testbed, round(seconds, 3), guests=info.get("guests", 0),
                     namespaces=info.get("namespaces", 0), interrupted=True)


async def interrupted_summary(testbed: str, target: Target, info: dict[str, Any], host_state: str | None,
                              seconds: float) -> UpSummary:
    """The summary of an interrupted `up`, from what every host reports is up."""
    summary = _empty_summary(testbed, info, seconds)
    res = await _on_hosts(target, "host.status", {"testbed": testbed},
                          Output(quiet=True), timeout=60)
    for h, r in sorted(res.items()):
        if not r.ok:
            summary.hosts.append(HostRow(h, r.status, 0, 0, 0, 0, error=r.error or ""))
            continue
        for bed in r.value["testbeds"]:
            if bed["testbed"] != testbed:
                continue
            nodes = bed["nodes"]
            ready = nodes.get("running", 0)
            summary.ready += ready
            summary.namespaces_up += nodes.get("up", 0)
            summary.hosts.append(HostRow(h, "interrupted", sum(nodes.values()),
                                         sum(v for k, v in nodes.items() if k != "up"), ready, 0))
    return summary


# ---------------------------------------------------------------------------
# down, status, exec
# ---------------------------------------------------------------------------

@dataclass
class HostAnswer:
    """One host's answer to a host.* handler: status "ok" with the handler's
    value (plain JSON data: a dict, or exec's list of results), or gproc's
    status of a host that did not answer (failed, timeout, unreachable, ...)
    with the error text."""

    status: str
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        """{"status": "ok", "value": ...} or {"status": ..., "error": ...}."""
        return {"status": "ok", "value": self.value} if self.ok else {"status": self.status, "error": self.error}


async def _on_hosts(target: Target, handler: str, payload: dict[str, Any], out: Output,
                    timeout: float = 600, fanout: int = 8) -> dict[str, HostAnswer]:
    """Call a host.* handler on every host of the target: host -> its answer."""
    from megafleet import host as host_side

    if target.embedded:
        value: Any            # what the handler returns, as JSON (a dict, or exec's list of results)
        try:
            if handler == "host.down":
                value = await host_side.down(payload.get("testbed"), lambda ev: out.event(LOCAL, ev),
                                             wait=not payload.get("no_wait"))
            elif handler == "host.status":
                value = await trio.to_thread.run_sync(host_side.status, payload.get("testbed"))
            elif handler == "host.exec":
                done = await host_side.exec_nodes(payload["pattern"], payload["argv"], payload.get("testbed"),
                                                  timeout=payload.get("timeout", 30))
                value = [n.to_json() for n in done]     # as a remote host answers
            else:
                raise ValueError(handler)
            return {LOCAL: HostAnswer("ok", value)}
        except Exception as exc:
            return {LOCAL: HostAnswer("failed", error=f"{type(exc).__name__}: {exc}")}
    from megafleet.gproc import Fleet

    inv = target.inventory()
    names = [h.name for h in inv.select(target.hosts or None)]
    async with Fleet.connect(inv, hosts=names, fanout=fanout) as fleet:
        per_host = {h: {**payload, **target.dirs(h)} for h in names}
        report = await fleet.call(handler, per_host=per_host, modules=HOST_MODULES, timeout=timeout,
                                  on_event=out.event)
    return {h: HostAnswer(r.status, r.value if r.status == "ok" else None, r.error)
            for h, r in report.results.items()}


def _targets_for(testbed: str | None, hosts: str | None, host_state: str | None) -> list[tuple[str | None, Target]]:
    """Which (testbed, target) pairs a down/status/exec concerns."""
    if hosts is not None:
        return [(testbed, Target(hosts, host_state=host_state))]
    known = deployments()
    if testbed is not None:
        if testbed in known:
            return [(testbed, Target.from_json(known[testbed]["target"]))]
        return [(testbed, Target(host_state=host_state))]
    if not known:
        return [(None, Target(host_state=host_state))]
    # Group testbeds by where they run; None means "everything there".
    return [(t, Target.from_json(d["target"])) for t, d in sorted(known.items())]


@dataclass
class DownResult:
    """What `down` did: `ok` when every host answered, the seconds it took,
    and each host's answer (host.down's counts) by testbed ("*": every
    testbed of a target)."""

    ok: bool
    seconds: float
    results: dict[str, dict[str, HostAnswer]]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": self.seconds,
                "results": {t: {h: a.to_json() for h, a in res.items()} for t, res in self.results.items()}}


async def down(testbed: str | None, hosts: str | None, out: Output, host_state: str | None = None,
               fanout: int = 8, wait: bool = True) -> DownResult:
    """Tear down `testbed` (or every testbed this controller knows, or with
    `hosts` every testbed of that inventory) on every host at once, and
    forget the controller's records of what went."""
    t0 = time.monotonic()
    ledger = Ledger()
    results: dict[str, dict[str, HostAnswer]] = {}
    ok = True
    for name, target in _targets_for(testbed, hosts, host_state):
        res = await _on_hosts(target, "host.down", {"testbed": name, "no_wait": not wait}, out, fanout=fanout)
        results[name or "*"] = res
        if all(r.ok for r in res.values()):
            if name is not None:
                ledger.forget(CONTROLLER, "testbed", name)
            else:
                for key, record in deployments(ledger).items():
                    if Target.from_json(record["target"]).inventory_path == target.inventory_path:
                        ledger.forget(CONTROLLER, "testbed", key)
        else:
            ok = False
    # The controller's own lock files, of testbeds it no longer knows.
    from megafleet import locks
    known = deployments(ledger)
    for r in ledger.list(locks.OWNER, "file"):
        if r.key not in known:
            locks.forget(r.key)
    return DownResult(ok, round(time.monotonic() - t0, 3), results)


async def status(testbed: str | None, hosts: str | None, out: Output,
                 host_state: str | None = None) -> dict[str, HostAnswer]:
    """host -> its host.status answer ({"testbeds": [...], "ksm": {...}}), the
    testbeds of every target that reaches the host merged into one answer."""
    out_hosts: dict[str, HostAnswer] = {}
    for name, target in _targets_for(testbed, hosts, host_state):
        res = await _on_hosts(target, "host.status", {"testbed": name}, out, timeout=60)
        for h, r in res.items():
            first = out_hosts.setdefault(h, r)
            if r.ok and first is not r and first.ok:
                seen = {b["testbed"] for b in first.value["testbeds"]}
                first.value["testbeds"] += [b for b in r.value["testbeds"] if b["testbed"] not in seen]
    return out_hosts


@dataclass
class ExecResult:
    """What `exec` did: each matching node's result (by node name, its host
    filled in) and the hosts that did not answer (host -> why)."""

    nodes: list[NodeExec]
    host_errors: dict[str, str]

    @property
    def ok(self) -> bool:
        """Some node matched, every host answered and every command exited 0."""
        return bool(self.nodes) and not self.host_errors and not any(n.error or n.rc for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [n.to_json() for n in self.nodes], "host_errors": self.host_errors}


async def exec_on(pattern: str, argv: list[str], testbed: str | None, hosts: str | None, out: Output,
                  timeout: float, host_state: str | None = None) -> ExecResult:
    """Run argv in every node matching `pattern` on every host of the
    testbed (or of every testbed this controller knows), `timeout` seconds
    per command."""
    from megafleet.host import NodeExec

    nodes: list[NodeExec] = []
    errors: dict[str, str] = {}
    for name, target in _targets_for(testbed, hosts, host_state):
        res = await _on_hosts(target, "host.exec", {"testbed": name, "pattern": pattern, "argv": argv,
                                                    "timeout": timeout}, out, timeout=timeout + 30)
        for h, r in res.items():
            if r.ok:
                nodes += [NodeExec.from_json(n, host=h) for n in r.value]
            else:
                errors[h] = r.error or r.status
    return ExecResult(sorted(nodes, key=lambda n: n.node), errors)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

_hosts_option = click.option(
    "--hosts", "hosts", metavar="INVENTORY", type=click.Path(dir_okay=False),
    help="gproc host inventory (TOML, hosts one by one or as ranges like node[0001-0064]); "
         "'slurm' (or 'slurm:FILE' with FILE's defaults and overrides): the hosts of the current "
         "Slurm allocation. Without it, the local machine runs everything.")
_host_state_option = click.option(
    "--host-state", metavar="DIR", hidden=True,
    help="Per-host state, run and image cache directories, '{host}' replaced by the "
         "host's name (for test fleets whose hosts share one filesystem).")
_json_option = click.option("--json", "json_mode", is_flag=True, help="Print one JSON object, for scripts.")


def _run(fn, *args, **kwargs):
    try:
        return trio.run(lambda: fn(*args, **kwargs))
    except KeyboardInterrupt:
        click.echo("interrupted; 'megafleet status' shows what is up, 'megafleet down' removes it",
                   err=True)
        sys.exit(130)


@click.command("up")
@click.argument("testbed", type=click.Path(dir_okay=False, path_type=Path))
@_hosts_option
@click.option("--telemetry", metavar="URI", envvar="MEGAFLEET_MONGO_URI",
              help="Telemetry store: mongodb://HOST:PORT/DB or sqlite:PATH "
                   "(default: $MEGAFLEET_MONGO_URI, else SQLite in each host's state directory).")
@click.option("--name", "-N", help="Testbed name (default: the file's stem, at most 8 characters).")
@click.option("-D", "defines", multiple=True, metavar="NAME=VALUE", help="Set a parameter of the description.")
@click.option("--host-mem", type=click.IntRange(64), metavar="MB",
              help=f"Guest memory budget per host for placement (default: 80% of available "
                   f"memory locally, {DEFAULT_HOST_MEM_MB} MB per inventory host).")
@click.option("--ksm-sharing", type=click.FloatRange(0, 0.9), default=0.3, show_default=True,
              metavar="FRACTION", help="Share of guest memory KSM is expected to merge, for the "
                                       "memory budgets of placement.")
@click.option("--ksm/--no-ksm", default=True, show_default=True, help="Run the KSM tuning daemon on every host.")
@click.option("--telemetry-interval", type=click.FloatRange(0.5, 3600), default=5, show_default=True,
              metavar="SECONDS", help="Seconds between telemetry samples on each host.")
@click.option("--boot-timeout", type=click.FloatRange(1), default=60, show_default=True,
              help="Seconds a guest may take to print its ready line, per attempt.")
@click.option("--retries", type=click.IntRange(0, 10), default=1, show_default=True,
              help="Boot attempts after the first for a guest that fails.")
@click.option("--fanout", type=click.IntRange(1, 64), default=8, show_default=True,
              help="gproc tree fanout.")
@click.option("--no-verify", is_flag=True,
              help="Return when the guests are ready, without waiting for routing and checking "
                   "the reachable assertions live.")
@click.option("--no-wait", is_flag=True,
              help="Fail at once when another up/down holds the testbed's lock (default: wait, "
                   "saying for whom).")
@_host_state_option
@_json_option
def up_command(testbed, hosts, telemetry, name, defines, host_mem, ksm_sharing, ksm, telemetry_interval, boot_timeout, retries, fanout,
               no_verify, no_wait, host_state, json_mode):
    """Bring up the testbed described in TESTBED (a .fleet file).

    \b
    Phases (progress is printed per phase and per host):
      compile   parse, expand, address and check the description
      place     assign nodes to hosts (deterministic; see `megafleet plan`)
      images    build missing images (cache hits take milliseconds)
      connect   reach the hosts through gproc (inventory only)
      probe     underlay MTU, memory and images of each host
      push      copy images to hosts that lack them
      apply     every host, in parallel: network (bridges, veths, VXLAN,
                routers), guests (bounded parallel boot, retried once), KSM
                daemon, telemetry collector
      verify    wait for routing to converge: every `reachable` assertion
                checked live by pings from inside the nodes (up to 60 s;
                failures listed with file:line; --no-verify skips it); then
                the description's fault schedule (at/every) starts

    Switch segments that span hosts are joined by VXLAN, one VNI per segment;
    when the underlay MTU cannot carry the segment's MTU plus 50 bytes, the
    segment's MTU is lowered everywhere on it. A host that fails or dies has
    its nodes reported failed; the rest of the testbed stays up. Guests that
    fail to boot are retried, then reported.

    \b
    Examples:
      megafleet up examples/campus-ospf.fleet
      megafleet up examples/lan1000.fleet --hosts hosts.toml --telemetry mongodb://db:27017/mf
    The testbed stays up; `megafleet status` shows it, `megafleet down` removes it.
    A testbed name belongs to the file it was built from: `up` of that file,
    edited, applies only the difference (see `megafleet diff`); `up` of another
    file under a name that is up is refused, and nothing running changes.
    The last line says what is true: "up: ...", "up with 3 failed nodes",
    "nothing is up", "interrupted: 68 of 120 guests up".

    \b
    One controller per testbed and host: `up` and `down` hold the testbed's
    lock; a second one waits (saying for whom) or, with --no-wait, fails.
    Ctrl-C (SIGINT) or SIGTERM: nothing new starts, steps under way finish or
    stop within seconds, and the summary of what is up is printed, marked
    interrupted; a second Ctrl-C exits at once.

    Exit status: 0 when every node is up and every assertion holds, 1 when
    some failed, 130 when interrupted.
    """
    out = Output(json_mode)
    target = Target(hosts, host_mem_mb=host_mem, host_state=host_state, ksm_sharing=ksm_sharing)
    if hosts is not None:
        target.inventory()          # a bad inventory fails before anything starts
    try:
        summary = _run(guarded_up, testbed, target, name=name, wait=not no_wait, host_state=host_state,
                       defines=parse_defines(defines), telemetry=telemetry,
                       ksm=ksm, vm_options={"timeout_s": boot_timeout, "retries": retries}, out=out,
                       fanout=fanout, collect_interval=telemetry_interval, verify=not no_verify)
    except KeyboardInterrupt:
        # A second Ctrl-C in the instant between the run's signal receiver and
        # the handlers below (trio.run puts Python's own back as it returns).
        _abort(testbed_name(testbed, name))
    if summary.interrupted:
        # Interrupted once: another Ctrl-C while the summary prints aborts, as
        # a second one during the run does.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: _abort(summary.testbed))
    if json_mode:
        click.echo(json.dumps(summary.to_json()))
    else:
        print_summary(summary)
    if summary.interrupted:
        # Out at once: a Ctrl-C during the interpreter's own shutdown would end
        # the process by the signal (status -2) instead of 130.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if not summary.ok:
        sys.exit(1)


@click.command("plan")
@click.argument("testbed", type=click.Path(dir_okay=False, path_type=Path))
@_hosts_option
@click.option("--name", "-N", help="Testbed name (default: the file's stem, at most 8 characters).")
@click.option("-D", "defines", multiple=True, metavar="NAME=VALUE", help="Set a parameter of the description.")
@click.option("--host-mem", type=click.IntRange(64), metavar="MB",
              help="Guest memory budget per host (as for `up`).")
@click.option("--ksm-sharing", type=click.FloatRange(0, 0.9), default=0.3, show_default=True,
              metavar="FRACTION", help="Share of guest memory KSM is expected to merge, for the "
                                       "memory budgets of placement.")
@click.option("--nodes", "show_nodes", is_flag=True, help="List the nodes of each host too.")
@_json_option
def plan_command(testbed, hosts, name, defines, host_mem, ksm_sharing, show_nodes, json_mode):
    """Show where `megafleet up` would put each node of TESTBED, doing nothing.

    Placement is deterministic (the same description and inventory always give
    the same plan): switch segments are placed largest first, each whole on the
    roomiest host where it fits (capacity and memory budget, counting memory
    KSM is expected to share), split over few hosts only when it fits on none.
    Nodes joined by point-to-point links stay together. Segments on more than
    one host are listed with their VXLAN VNI.
    """
    name = testbed_name(testbed, name)
    target = Target(hosts, host_mem_mb=host_mem, ksm_sharing=ksm_sharing)
    net = compile_testbed(testbed, parse_defines(defines))
    for warning in net.import_warnings:     # a foreign file: what was not carried over
        click.echo(warning, err=True)
    plan, placed = make_plan(net, name, target)
    rows = placement_rows(plan, placed)
    from megafleet.manifest import ManifestError, spanning_segments
    try:
        spanning = spanning_segments(plan, placed)
    except ManifestError as exc:
        raise UpError(str(exc)) from None
    if json_mode:
        click.echo(json.dumps({"testbed": name, "hosts": rows, "spanning": spanning,
                               "tunnels": sum(len(s["hosts"]) - 1 for s in spanning), "node_host": placed.node_host}))
        return
    click.echo(table([[r["host"], r["nodes"], r["namespaces"], r["vms"], r["containers"],
                       len(r["segments"])] for r in rows],
                     ["HOST", "NODES", "NAMESPACES", "VMS", "CONTAINERS", "SEGMENTS"]))
    if spanning:
        click.echo("")
        click.echo(table([[s["segment"], s["vni"], ", ".join(s["hosts"])] for s in spanning],
                         ["SPANNING SEGMENT", "VNI", "HOSTS"]))
    if show_nodes:
        for host, nodes in placed.hosts.items():
            click.echo(f"\n{host}: {' '.join(nodes)}")
    click.echo(f"\ntestbed {name}: {len(placed.node_host)} nodes on "
               f"{sum(1 for r in rows if r['nodes'])} hosts, {len(spanning)} VXLAN segments")


@click.command("down")
@click.argument("testbed", required=False)
@_hosts_option
@click.option("--fanout", type=click.IntRange(1, 64), default=8, show_default=True, help="gproc tree fanout.")
@click.option("--no-wait", is_flag=True,
              help="Fail at once when another up/down holds a testbed's lock (default: wait).")
@_host_state_option
@_json_option
def down_command(testbed, hosts, fanout, no_wait, host_state, json_mode):
    """Tear down TESTBED, or every testbed brought up from here.

    Needs no description: each host removes what its own ledger records
    (daemons, guests, routers, namespaces, bridges, VXLAN tunnels), in parallel
    on every host. With --hosts, every testbed on every host of that inventory
    goes, also ones this controller forgot (after a crash). Idempotent: running
    it again finds nothing to do. Unreachable hosts are reported; run `down`
    again when they are back.

    Every process of a testbed runs in its cgroup; `down` kills them all in
    one write (cgroup.kill) before removing the network, so it finishes on a
    host the testbed saturates. With no TESTBED, it also sweeps what killed
    commands left: a KVM probe's QEMU, scratch directories, orphaned cgroups
    (`megafleet doctor --leftovers` lists what is recorded and present).
    A `down` or `up` of the same testbed already running: this one waits for
    it (then finds nothing left to do), or fails with --no-wait.
    """
    out = Output(json_mode)
    result = _run(down, testbed, hosts, out, host_state, fanout, not no_wait)
    if json_mode:
        click.echo(json.dumps(result.to_json()))
    else:
        rows = []
        for name, res in result.results.items():
            for h, r in res.items():
                if r.ok:
                    for t, c in r.value["testbeds"].items():
                        rows.append([h, t, "down", c["namespaces"], c["links"], c["processes"], ""])
                    if not r.value["testbeds"]:
                        rows.append([h, name, "nothing up", "", "", "", ""])
                else:
                    rows.append([h, name, r.status, "", "", "", r.error or ""])
        click.echo(table(rows, ["HOST", "TESTBED", "STATE", "NAMESPACES", "LINKS", "PROCESSES", "ERROR"]))
        click.echo(f"\n{'down: nothing of it is up' if result.ok else 'some hosts failed: run down again'}"
                   f" ({result.seconds:.1f} s)")
    if not result.ok:
        sys.exit(1)


@click.command("status")
@click.argument("testbed", required=False)
@_hosts_option
@_host_state_option
@_json_option
def status_command(testbed, hosts, host_state, json_mode):
    """Show the testbeds that are up: nodes by state per host, failures, KSM
    saving and telemetry health.

    \b
    Node states: up (namespace present), running (guest ready), failed
    (did not boot; reason shown), exited (guest died), missing (gone).
    """
    out = Output(json_mode, quiet=True)
    answers = _run(status, testbed, hosts, out, host_state)
    if json_mode:
        click.echo(json.dumps({"hosts": {h: a.to_json() for h, a in answers.items()}}))
        return
    from megafleet.experiment.cli import fmt_settings
    rows, failures, links = [], [], []
    for h, r in sorted(answers.items()):
        if not r.ok:
            rows.append([h, "", r.status, "", "", r.error or ""])
            continue
        v = r.value
        ksm = v["ksm"]
        ksm_text = f"{ksm.get('saved_mb', '?')} MB saved ({ksm['daemon']})"
        for b in v["testbeds"]:
            nodes = ", ".join(f"{n} {s}" for s, n in sorted(b["nodes"].items()))
            tel = b["telemetry"]
            seen = (f", {tel['guests_seen']}/{tel['guests']} guests seen" if "guests_seen" in tel
                    else f", store: {tel['store_error']}" if "store_error" in tel else "")
            rows.append([h, b["testbed"], "complete" if b["complete"] else "incomplete", nodes, ksm_text,
                         f"collector {tel['collector']}{seen}"])
            failures += [[h, b["testbed"], f["node"], f["state"], f["reason"]] for f in b["failures"]]
            links += [[h, b["testbed"], x["link"], x["state"], fmt_settings(x["settings"])]
                      for x in b.get("links", [])]
        if not v["testbeds"]:
            rows.append([h, "", "nothing up", "", ksm_text, ""])
    click.echo(table(rows, ["HOST", "TESTBED", "STATE", "NODES", "KSM", "TELEMETRY"]))
    if failures:
        click.echo("")
        click.echo(table(failures[:50], ["HOST", "TESTBED", "NODE", "STATE", "REASON"]))
        if len(failures) > 50:
            click.echo(f"... and {len(failures) - 50} more (--json lists all)")
    if links:
        click.echo("")
        click.echo(table(links, ["HOST", "TESTBED", "LINK CHANGED AT RUNTIME", "STATE", "SETTINGS"]))


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("pattern")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--testbed", "-t", help="Only nodes of this testbed.")
@_hosts_option
@click.option("--timeout", type=click.FloatRange(0.1), default=30, show_default=True,
              help="Seconds each command may run.")
@_host_state_option
@_json_option
def exec_command(pattern, command, testbed, hosts, timeout, host_state, json_mode):
    """Run COMMAND inside every node whose name matches PATTERN (a glob).

    \b
    Namespace nodes (hosts, routers): `ip netns exec`.
    Container guests: `nsenter` into the guest's namespaces and root.
    QEMU and libvirt guests: through the guest's exec channel (a virtio-serial
    port the image's init serves); the command runs from / with no stdin, and
    its output comes back when it has finished.
    Put `--` before the command: megafleet exec 'pc*' -- ping -c1 10.1.0.1
    Output is printed per node; the exit status is 1 when any node failed.
    """
    out = Output(json_mode, quiet=True)
    result = _run(exec_on, pattern, list(command), testbed, hosts, out, timeout, host_state)
    if json_mode:
        click.echo(json.dumps(result.to_json()))
    else:
        for n in result.nodes:
            status_text = n.error if n.error else f"exit {n.rc}"
            click.echo(f"--- {n.node} ({n.host}): {status_text}")
            if n.stdout:
                click.echo(n.stdout.rstrip("\n"))
            if n.stderr:
                click.echo(n.stderr.rstrip("\n"), err=True)
        for h, e in result.host_errors.items():
            click.echo(f"--- host {h}: {e}", err=True)
        if not result.nodes:
            click.echo(f"no node matches {pattern!r}", err=True)
    if not result.ok:
        sys.exit(1)
