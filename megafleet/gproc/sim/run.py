"""Drivers of the simulation: reach a tree, bring a testbed up and down.

Each driver is a trio function meant to run under
`trio.run(fn, ..., clock=trio.testing.MockClock(autojump_threshold=0))`
(see `simulate`), so the seconds it reports are simulated seconds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

import trio
import trio.testing

from megafleet.gproc import inventory
from megafleet.gproc.sim.hosts import BootModel, SimHosts
from megafleet.gproc.sim.links import LinkModel, SimNetwork


def simulate(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on a simulated clock: time advances only when every task
    waits (on the links' latencies, the boots' sleeps)."""
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


def host_names(n: int) -> list[str]:
    width = max(4, len(str(n)))
    return [f"node{i:0{width}d}" for i in range(1, n + 1)]


def sim_inventory(names: list[str], capacity: int = 0) -> inventory.Inventory:
    """An inventory of simulated hosts (addresses from 10.0.0.0/8, never used)."""
    hosts = tuple(inventory.Host(name, f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", capacity=capacity)
                  for i, name in enumerate(names, start=1))
    return inventory.Inventory(hosts, source="<simulated>")


@dataclass
class ReachResult:
    hosts: int
    fanout: int
    reach_s: float          # simulated seconds until every agent answered `ready`
    call_s: float           # simulated seconds of one call answered by every host
    up: int
    connects: int
    agents_left: int = 0    # simulated agents still running once the fleet closed


async def reach(n: int, fanout: int, link: LinkModel) -> ReachResult:
    """Build the tree over n simulated agents; then one call to all of them."""
    from megafleet.gproc import Fleet

    sim_hosts = SimHosts(BootModel.containers_here())
    net = SimNetwork(link, sim_hosts.lookup)
    inv = sim_inventory(host_names(n))
    async with net.running():
        async with Fleet.connect(inv, fanout=fanout, transport=net.transport, connect_timeout=60) as fleet:
            up = sum(1 for s in fleet.status.values() if s.state == "up")
            report = await fleet.call("gproc.ping", timeout=600)
            assert report.counts()["ok"] == n, (report.counts(), net.errors[:3])
            result = ReachResult(n, fanout, fleet.setup_seconds, report.seconds, up, net.connects)
        await trio.sleep(1)       # agents end when their parent's session closes
        result.agents_left = len(net.agents)
        return result


# ---------------------------------------------------------------------------
# A testbed of racks, brought up and down on simulated hosts
# ---------------------------------------------------------------------------

def racks_description(racks: int, guests_per_rack: int, *, racks_per_pod: int = 32,
                      image: str = "images/tiny.toml") -> str:
    """A description of `racks` racks of `guests_per_rack` container guests, each
    rack a switch behind its own router. Rack routers meet on one pod switch per
    `racks_per_pod` racks, pod routers on one spine switch: every segment that
    spans hosts spans few of them (a segment on all hosts would give each host a
    VXLAN tunnel to every other one: hosts x hosts). Pod switches take their
    subnets from their own pool and racks theirs in rack order, so the racks
    of a pod are one run of /24s: the routers' merged routes (a power-of-two
    `racks_per_pod` makes each pod one prefix)."""
    pods = -(-racks // racks_per_pod)
    lines = [f'image tiny from "{image}"', "pool racks 10.0.0.0/8 per /24",
             "pool pods 100.64.0.0/10 per /26", "switch spine subnet 100.63.0.0/16"]
    for p in range(1, pods + 1):
        lines.append(f"switch pod{p} subnet pods")
        lines.append(f"router p{p} {{ iface spine auto; iface pod{p} auto }}")
    for r in range(1, racks + 1):
        p = (r - 1) // racks_per_pod + 1
        lines.append(f"switch rack{r}")
        lines.append(f"router r{r} {{ iface pod{p} auto; iface rack{r} auto }}")
        lines.append(f"vm g{r}x[1..{guests_per_rack}] image tiny driver container mem 64M on rack{r}")
    return "\n".join(lines) + "\n"


@dataclass
class ControllerWork:
    """What the controller computes before it talks to any host (real time)."""

    testbed: str
    plan: Any
    placed: Any
    hosts: list[str]
    plan_hosts: dict[str, list[str]]       # host -> its guests
    manifests: dict[str, str]              # host -> manifest JSON text, as sent
    guests: int
    compile_s: float
    plan_s: float
    manifests_s: float
    cpu_s: dict[str, float] | None = None   # CPU seconds of each (a shared machine inflates wall time)
    # The process's peak RSS (MB) at the end of each step: compile, plan, manifests.
    peak_rss_mb: dict[str, float] | None = None


def controller_work(path: str, hosts: list[str], capacity: int, testbed: str = "mil",
                    host_mem_mb: int = 1 << 20) -> ControllerWork:
    """The real compile, plan, placement and manifest split of `megafleet up`
    for `hosts` (each `capacity` nodes), timed in real seconds."""
    import resource
    import time
    from pathlib import Path

    from megafleet import manifest, placement, up
    from megafleet.netlang import live

    def peak() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)    # KB on Linux

    cpu: dict[str, float] = {}
    rss: dict[str, float] = {}
    t, c = time.perf_counter(), time.process_time()
    net = up.compile_testbed(Path(path), {})
    compile_s = time.perf_counter() - t
    cpu["compile"] = round(time.process_time() - c, 3)
    rss["compile"] = peak()
    t, c = time.perf_counter(), time.process_time()
    plan = live.plan(net, testbed)
    offers = [placement.HostOffer(h, capacity, host_mem_mb) for h in hosts]
    placed = placement.place(manifest.demands(net, plan), offers, ksm_sharing=0.3)
    plan_s = time.perf_counter() - t
    cpu["plan"] = round(time.process_time() - c, 3)
    rss["plan"] = peak()
    t, c = time.perf_counter(), time.process_time()
    used = [h for h, nodes in placed.hosts.items() if nodes]
    inv = sim_inventory(hosts)
    addresses = {h: inv.by_name[h].address for h in used}
    # As up.py does: each host's manifest as its JSON text as soon as it is made.
    manifests = {h: json.dumps(m.to_json()) for h, m in manifest.iter_split(
        plan, placed, addresses=addresses, images={"tiny": "tiny"}, ksm=True, telemetry=None, vm_options={},
        source=path, collect_interval=10.0)}
    manifests_s = time.perf_counter() - t
    cpu["manifests"] = round(time.process_time() - c, 3)
    rss["manifests"] = peak()
    vm_names = {v.name for v in plan.vms}
    plan_hosts = {h: [n for n in placed.hosts[h] if n in vm_names] for h in used}
    return ControllerWork(testbed, plan, placed, used, plan_hosts, manifests, len(plan.vms), compile_s, plan_s,
                          manifests_s, cpu, rss)


@dataclass
class UpResult:
    hosts: int
    guests: int
    connect_s: float
    probe_s: float
    apply_s: float
    up_s: float             # connect + probe + apply + summary (simulated)
    down_s: float
    ready: int
    failed_guests: int
    failed_hosts: int
    events: int             # progress events the controller received
    event_frames: int       # frames they came in
    tx_bytes: int           # controller -> tree
    rx_bytes: int           # tree -> controller
    rx_frames: int
    reattachments: int
    summary_ok: bool
    errors: list[str]
    killed: int = 0               # hosts that died during the apply
    survivors_guests: int = 0     # guests placed on the hosts that did not
    agents_left: int = 0          # simulated agents still running once the fleet closed


async def sim_up(work: ControllerWork, fanout: int, link: LinkModel, model: BootModel, *,
                 fail_fraction: float = 0.0, kill_fraction: float = 0.0, seed: int = 1,
                 apply_timeout: float = 3600.0) -> UpResult:
    """`megafleet up`'s tree phases on simulated hosts: connect, probe, apply
    every manifest (progress coalesced up the tree), the real summary; then
    `down`. With kill_fraction, that share of the hosts (chosen by `seed`) die
    during the apply: their agents stop, their connections are refused."""
    from megafleet import up
    from megafleet.gproc import Fleet

    sim_hosts = SimHosts(model, fail_fraction=fail_fraction, seed=seed)
    net = SimNetwork(link, sim_hosts.lookup)
    inv = sim_inventory(work.hosts)
    host_errors: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    phases: dict[str, float] = {}
    counted = {"events": 0, "frames": 0}

    def on_event(host: str, data: Any) -> None:
        counted["events"] += 1

    async with net.running():
        t0 = trio.current_time()
        async with Fleet.connect(inv, fanout=fanout, transport=net.transport, connect_timeout=60) as fleet:
            phases["connect"] = connect_s = trio.current_time() - t0
            t = trio.current_time()
            spanning = [{"hosts": hs} for s, hs in work.placed.segment_hosts.items() if len(hs) > 1]
            peers = up.tunnel_peers(spanning)
            per_host = {h: {"peers": [inv.by_name[o].address for o in sorted(peers.get(h, ()))],
                            "images": ["tiny"]} for h in work.hosts}
            probe = await fleet.call("host.probe", per_host=per_host, modules=up.HOST_MODULES, timeout=60)
            phases["probe"] = probe_s = trio.current_time() - t
            for h, r in probe.results.items():
                if r.status != "ok":
                    host_errors[h] = f"{r.status}: {r.error}"
            t = trio.current_time()
            rx_frames_before = net.controller.rx_frames

            victims = random.Random(seed).sample(work.hosts, int(len(work.hosts) * kill_fraction))

            async def killer() -> None:
                # Hosts die while their guests boot.
                await trio.sleep(max(1.0, model.median_s * 2))
                for h in victims:
                    net.kill(h)

            async with trio.open_nursery() as n:
                if kill_fraction > 0:
                    n.start_soon(killer)
                report = await fleet.call("host.apply", per_host=work.manifests, modules=up.HOST_MODULES,
                                          timeout=apply_timeout, on_event=on_event, encoded=True)
                n.cancel_scope.cancel()
            for h, r in report.results.items():
                if r.status == "ok":
                    results[h] = r.value
                else:
                    host_errors[h] = f"{r.status}: {r.error}"
            phases["apply"] = apply_s = trio.current_time() - t
            counted["frames"] = net.controller.rx_frames - rx_frames_before
            summary = up.summarize(work.testbed, work.placed, work.plan, results, host_errors, phases,
                                   trio.current_time() - t0)
            up_s = trio.current_time() - t0
            t = trio.current_time()
            down = await fleet.call("host.down", {"testbed": work.testbed}, modules=up.HOST_MODULES,
                                    timeout=3600)
            down_s = trio.current_time() - t
            down_ok = sum(1 for r in down.results.values() if r.status == "ok")
            reattachments = len(fleet.reattachments)
        await trio.sleep(1)       # agents end when their parent's session closes
        agents_left = len(net.agents)
    del down_ok
    return UpResult(
        hosts=len(work.hosts), guests=summary.guests, connect_s=connect_s, probe_s=probe_s,
        apply_s=apply_s, up_s=up_s, down_s=down_s, ready=summary.ready,
        failed_guests=sum(1 for f in summary.failed if not f.host_failed),
        failed_hosts=sum(1 for h in summary.hosts if h.status != "ok"),
        events=counted["events"], event_frames=counted["frames"],
        tx_bytes=net.controller.tx_bytes, rx_bytes=net.controller.rx_bytes, rx_frames=net.controller.rx_frames,
        reattachments=reattachments, summary_ok=summary.ok, errors=net.errors[:5],
        agents_left=agents_left, killed=len(victims),
        survivors_guests=sum(len(work.plan_hosts[h]) for h in work.hosts if h not in set(victims)))
