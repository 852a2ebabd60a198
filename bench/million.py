"""A million guests on 4,480 hosts: the control plane, measured by simulation.

No machine here has thousands of hosts, so the tree phases run on simulated
hosts (megafleet.gproc.sim): the real compiler, placement, manifest split,
Fleet, Node, agents, frame protocol and progress coalescing; only the SSH hop
(an in-memory link with 1 ms latency, 1 Gbit/s and the JSON decode cost of
this machine per byte) and each host's apply (a handler that sleeps boot times
measured on this machine, bench/results/up-2026-11-29.json) are simulated.
Every figure of the tree phases is in simulated seconds; the controller's own
work (compile, plan, manifests) is real time on this machine.

Figures (one JSON line; sizes and growth factors for each):

  compile_1m_s, plan_1m_s, manifests_1m_s, controller_rss_mb
        real compile, live plan + placement, manifest split + JSON of the whole
        testbed (racks of ~223 container guests behind routers, one rack per
        host), in a fresh process per size; controller_rss_mb is that
        process's peak RSS once compile, plan and manifests are done, before
        the simulated up starts (controller_rss_after_plan_mb: after compile
        and plan only)
  reach_s[fanout][N], reach_exponent
        simulated time until the tree to N agents is up (every agent answered
        `ready`), N in 100 .. 100,000, fanout 8/16/32; the exponent is the
        slope of log(reach) against log(N) (0: flat; 1: linear)
  up_1m_s, controller_tx_mb, controller_rx_mb, down_1m_s
        simulated `up` on 4,480 hosts: connect, probe, apply (each host its
        own manifest, progress coalesced up the tree), the real summary; and
        `down`. up_1m_total_s adds the controller's real compile/plan/manifests
  failure_5pct
        the same up with 5 % of the hosts dying during the boot: their guests
        reported failed, the tree re-attached around dead inner agents
  telemetry_1m_docs_per_s, ingest_headroom
        documents a second the collectors of 1M guests send at a 10 s
        interval, one aggregated document per host (GuestSampler aggregate);
        the real ingest rate of such documents through the collect pipeline
        into FerretDB on this machine divided by that need

Every figure is given at each size (*_by_size) with its growth per 10x of
size (*_growth_per_10x; 10 is linear, 100 quadratic); reach_s has its growth
per 10x of agents too and is drawn against N (reach_plot). The JSON says
"simulated": true, and the summary on stderr names each figure simulated.

Targets: up_1m_s <= 120 (simulated); controller_rss_mb <= 4,000;
reach(100,000) <= 10 x reach(100); ingest_headroom >= 1; every growth factor
per 10x size well under 100 (no quadratic step).

    .venv/bin/python bench/million.py            # the full run (tens of minutes)
    .venv/bin/python bench/million.py --quick    # small sizes, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

GUESTS_PER_HOST = 1_000_000 / 4480      # 223.2: a million guests on 4,480 hosts
TELEMETRY_INTERVAL_S = 10.0


def sizes_for(quick: bool) -> list[int]:
    """Guest counts of the three sizes (the last is the headline)."""
    return [2_000, 6_000, 20_000] if quick else [10_000, 100_000, 1_000_000]


def hosts_for(guests: int) -> int:
    return max(2, round(guests / GUESTS_PER_HOST))


def write_description(path: Path, guests: int) -> int:
    """Racks of ~223 guests, one per host; returns the number of racks."""
    from megafleet.gproc.sim.run import racks_description

    racks = hosts_for(guests)
    per, extra = divmod(guests, racks)
    text = racks_description(racks, per, image=str(REPO / "examples/images/tiny.toml"))
    if extra:
        # The first `extra` racks take one guest more: exactly `guests` guests.
        lines = text.splitlines()
        for r in range(1, extra + 1):
            i = lines.index(f"vm g{r}x[1..{per}] image tiny driver container mem 64M on rack{r}")
            lines[i] = f"vm g{r}x[1..{per + 1}] image tiny driver container mem 64M on rack{r}"
        text = "\n".join(lines) + "\n"
    path.write_text(text)
    return racks


# ---------------------------------------------------------------------------
# One size in a fresh process: controller work, then the simulated up/down
# ---------------------------------------------------------------------------

CHILD = r"""
import functools, json, os, resource, sys, time
sys.path.insert(0, {repo!r})
from megafleet.gproc.sim import run, links, hosts
args = json.loads(sys.argv[1])
names = run.host_names(args["hosts"])
w = run.controller_work(args["path"], names, args["capacity"])
out = {{"guests": w.guests, "hosts": len(w.hosts), "compile_s": round(w.compile_s, 3),
        "plan_s": round(w.plan_s, 3), "manifests_s": round(w.manifests_s, 3), "cpu_s": w.cpu_s,
        "controller_rss_mb": w.peak_rss_mb["manifests"], "controller_rss_after_plan_mb": w.peak_rss_mb["plan"],
        "controller_rss_after_compile_mb": w.peak_rss_mb["compile"], "load": round(os.getloadavg()[0], 1),
        "manifest_mb": round(sum(len(m) for m in w.manifests.values()) / 1e6, 1)}}
link = links.LinkModel(latency_s=args["latency_s"], bandwidth_bps=args["bandwidth_bps"],
                       decode_s_per_byte=args["decode_s_per_byte"])
model = hosts.BootModel.containers_here()
runs = [("up", 0.0)] + ([("failure", args["kill"])] if args["kill"] else [])
for label, kill in runs:
    t = time.perf_counter()
    r = run.simulate(functools.partial(run.sim_up, w, args["fanout"], link, model,
                                       fail_fraction=args["fail"], kill_fraction=kill))
    out[label] = {{"up_s": round(r.up_s, 2), "connect_s": round(r.connect_s, 3), "probe_s": round(r.probe_s, 3),
                  "apply_s": round(r.apply_s, 2), "down_s": round(r.down_s, 2), "ready": r.ready,
                  "failed_guests": r.failed_guests, "failed_hosts": r.failed_hosts,
                  "events": r.events, "event_frames": r.event_frames,
                  "tx_mb": round(r.tx_bytes / 1e6, 2), "rx_mb": round(r.rx_bytes / 1e6, 2),
                  "rx_frames": r.rx_frames, "reattachments": r.reattachments,
                  "killed": r.killed, "survivors_guests": r.survivors_guests,
                  "sim_wall_s": round(time.perf_counter() - t, 1), "errors": r.errors}}
out["sim_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print(json.dumps(out))
"""


def one_size(guests: int, work: Path, args, decode: float, kill: float) -> dict:
    path = work / f"racks{guests}.fleet"
    racks = write_description(path, guests)
    params = {"path": str(path), "hosts": racks, "capacity": math.ceil(guests / racks) + 3,
              "fanout": 16, "latency_s": 0.001, "bandwidth_bps": 1e9, "decode_s_per_byte": decode,
              "fail": 0.001, "kill": kill}
    r = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), json.dumps(params)],
                       capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"size {guests} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Reach
# ---------------------------------------------------------------------------

def reach_all(counts: list[int], fanouts: list[int], decode: float,
              largest_fanouts: list[int] | None = None) -> dict:
    """Simulated reach of every count with every fanout; the largest count only
    with `largest_fanouts` (None: all), as it takes most of the bench's time
    (100,000 simulated agents: about 20 minutes of this machine per fanout)."""
    from megafleet.gproc.sim import links, run

    link = links.LinkModel(latency_s=0.001, bandwidth_bps=1e9, decode_s_per_byte=decode)
    out: dict[str, dict[str, float]] = {}
    walls = {}
    for fanout in fanouts:
        out[str(fanout)] = {}
        for n in counts:
            if n == max(counts) and largest_fanouts is not None and fanout not in largest_fanouts:
                continue
            t = time.perf_counter()
            r = run.simulate(run.reach, n, fanout, link)
            walls[f"{fanout}/{n}"] = round(time.perf_counter() - t, 1)
            assert r.up == n, r
            out[str(fanout)][str(n)] = round(r.reach_s, 4)
            print(f"reach {n} agents, fanout {fanout}: {r.reach_s:.4f} s simulated "
                  f"({walls[f'{fanout}/{n}']} s of this machine, load {os.getloadavg()[0]:.1f})",
                  file=sys.stderr, flush=True)
    return {"reach_s": out, "reach_sim_wall_s": walls}


def fit_exponent(points: dict[str, float]) -> float:
    """Least-squares slope of log(reach) against log(N)."""
    xs = [math.log(int(n)) for n in points]
    ys = [math.log(v) for v in points.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot_reach(reach: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for fanout, points in reach.items():
        ns = [int(n) for n in points]
        ax.plot(ns, [points[str(n)] * 1000 for n in ns], marker="o", label=f"fanout {fanout}")
    ax.set_xscale("log")
    ax.set_xlabel("agents (N)")
    ax.set_ylabel("reach (ms, simulated)")
    ax.set_title("gproc tree reach, 1 ms per hop (simulated)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# ---------------------------------------------------------------------------
# Telemetry: aggregated documents into FerretDB
# ---------------------------------------------------------------------------

def telemetry(hosts: int, guests: int, docs_n: int, work: Path) -> dict:
    from megafleet.collect import docs as D
    from megafleet.collect.samplers import aggregate_guest_samples
    from megafleet.collect.stores import MongoStore
    from telemetry import FERRETDB, Server, pipeline_insert

    need = hosts / TELEMETRY_INTERVAL_S
    per_guest_need = guests / TELEMETRY_INTERVAL_S
    out = {"telemetry_1m_docs_per_s": round(need, 1), "telemetry_per_guest_docs_per_s": round(per_guest_need)}
    if not FERRETDB.exists():
        out["ingest_error"] = f"{FERRETDB} missing: run scripts/ferretdb-install"
        return out
    per_host = round(guests / hosts)
    base = D.now_ms()
    docs = []
    for i in range(docs_n):
        host = f"node{i % hosts:04d}"
        t = base + (i // hosts) * int(TELEMETRY_INTERVAL_S * 1000)
        guest_docs = [D.sample(D.GUEST, host, {"state": "running", "cpu_s": 1.0 + g, "cpu_pct": 3.0,
                                               "rss_kb": 60_000}, time_ms=t, guest=f"g{g}")
                      for g in range(per_host)]
        docs += aggregate_guest_samples(host, guest_docs, t)
    server = Server(work / "ferret")
    try:
        store = MongoStore(server.uri("mfbmillion"))
        rate = pipeline_insert(store, docs, work / "spool")
        store.close()
    finally:
        server.stop()
    out.update({"ingest_docs_per_s": round(rate), "ingest_docs": len(docs),
                "ingest_doc_bytes": len(json.dumps(docs[0], default=str)),
                "ingest_headroom": round(rate / need, 2),
                "ingest_headroom_per_guest_samples": round(rate / per_guest_need, 3)})
    return out


# ---------------------------------------------------------------------------

def growth(values: list[float], sizes: list[int]) -> list[float]:
    """Factor per step between consecutive sizes, normalised to a 10x step."""
    out = []
    for (a, na), (b, nb) in zip(zip(values, sizes), zip(values[1:], sizes[1:])):
        steps = math.log10(nb / na)
        out.append(round((b / a) ** (1 / steps), 2) if a > 0 and b > 0 else None)
    return out


def print_summary(r: dict, tag: str, sizes: list[int]) -> None:
    """The figures for a reader, on stderr, each marked as what it is: the hosts,
    the wire and the guests are simulated in every one of them; the
    controller's own work is real time on this machine (with simulated hosts)."""
    def by(key: str) -> str:
        vals = r.get(f"{key}_by_size") or []
        g = r.get(f"{key}_growth_per_10x") or []
        return (" / ".join(f"{v}" for v in vals) + f"  (growth per 10x: {', '.join(str(x) for x in g)})")

    sz = " / ".join(f"{n:,}" for n in sizes)
    lines = [f"million.py, simulated hosts, wire and guests; sizes {sz} guests; load {r['load_before']} before, "
             f"{r['load_after']} after",
             f"  compile_s (simulated testbed, real controller time)        {by('compile_s')}",
             f"  plan_s (simulated testbed, real controller time)           {by('plan_s')}",
             f"  manifests_s (simulated testbed, real controller time)      {by('manifests_s')}",
             f"  controller_rss_mb (simulated testbed, peak before up)      {by('controller_rss_mb')}",
             f"  controller_rss_after_plan_mb (simulated testbed)           {by('controller_rss_after_plan_mb')}",
             f"  up_s (simulated)                                           {by('up_s')}",
             f"  down_s (simulated)                                         {by('down_s')}",
             f"  controller_tx_mb (simulated)                               {by('tx_mb')}",
             f"  controller_rx_mb (simulated)                               {by('rx_mb')}",
             f"  progress frames (simulated)                                {by('event_frames')}",
             f"  telemetry docs/s (simulated collectors)                    "
             f"{' / '.join(str(v) for v in r['telemetry_docs_per_s_by_size'])}"]
    for fo, pts in r["reach_s"].items():
        lines.append(f"  reach_s fanout {fo} (simulated, 1 ms per hop)              "
                     + ", ".join(f"{int(n):,}: {v}" for n, v in pts.items())
                     + f"  (growth per 10x: {', '.join(str(x) for x in r['reach_growth_per_10x'][fo])})")
    f = r["failure_5pct"]
    lines.append(f"  failure_5pct (simulated): {f['hosts_killed']} hosts killed, {f['ready']:,} ready, "
                 f"up {f['up_s']} s simulated, rest came up: {f['rest_came_up']}")
    if "ingest_headroom" in r:
        lines.append(f"  ingest_headroom (simulated collectors, real FerretDB ingest) {r['ingest_headroom']}")
    lines.append(f"  targets met (simulated): {r['met']}")
    print("\n".join(lines), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--skip-telemetry", action="store_true")
    parser.add_argument("--sizes", help="guest counts to run, comma-separated (default: 10k,100k,1M; "
                                        "--quick: 2k,6k,20k); the last is the headline and has the failure run")
    parser.add_argument("--reach", help="agent counts for reach, comma-separated "
                                        "(default: 100,1000,4480,20000,100000; --quick: up to 4480)")
    parser.add_argument("--fanouts", help="fanouts for reach (default 8,16,32; --quick: 8,32)")
    parser.add_argument("--reach-largest-fanouts", help="fanouts for the largest reach count only "
                                                        "(default: all; 100,000 agents take ~20 min each)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"),
                        help="where the reach plot goes")
    args = parser.parse_args()

    from megafleet.gproc.sim import hosts as sim_hosts
    from megafleet.gproc.sim import links

    work = Path(tempfile.mkdtemp(prefix="mfg-million-"))
    started = time.perf_counter()
    try:
        load = os.getloadavg()[0]
        decode = links.calibrate_decode()
        sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else sizes_for(args.quick)
        result: dict = {"simulated": True, "cpus": os.cpu_count(), "load_before": round(load, 2),
                        "decode_s_per_mb": round(decode * 1e6, 4),
                        "boot_model": sim_hosts.BootModel.containers_here().source,
                        "link": "1 ms per hop, 1 Gbit/s, decode cost measured here", "sizes": sizes}
        per_size = []
        for i, g in enumerate(sizes):
            kill = 0.05 if i == len(sizes) - 1 else 0.0
            per_size.append(one_size(g, work, args, decode, kill))
            print(f"size {g}: {json.dumps(per_size[-1])}", file=sys.stderr)
        head = per_size[-1]
        tag = "1m" if sizes[-1] == 1_000_000 else f"{sizes[-1] // 1000}k"
        for key in ("compile_s", "plan_s", "manifests_s", "controller_rss_mb", "controller_rss_after_plan_mb"):
            values = [s[key] for s in per_size]
            name = key.replace("_s", f"_{tag}_s") if key.endswith("_s") else key
            result[name] = head[key]
            result[f"{key}_by_size"] = values
            result[f"{key}_growth_per_10x"] = growth(values, sizes) if len(sizes) > 1 else []
        for part in ("compile", "plan", "manifests"):
            values = [s["cpu_s"][part] for s in per_size]
            result[f"{part}_cpu_s_by_size"] = values
            result[f"{part}_cpu_s_growth_per_10x"] = growth(values, sizes) if len(sizes) > 1 else []
        up = head["up"]
        result.update({
            f"up_{tag}_s": up["up_s"],
            f"up_{tag}_total_s": round(up["up_s"] + head["compile_s"] + head["plan_s"] + head["manifests_s"], 2),
            "controller_tx_mb": up["tx_mb"], "controller_rx_mb": up["rx_mb"],
            f"down_{tag}_s": up["down_s"], "hosts": head["hosts"], "guests": head["guests"],
            "ready": up["ready"], "failed_guests": up["failed_guests"],
            "progress_events": up["events"], "progress_frames": up["event_frames"],
            "manifest_mb": head["manifest_mb"], "sim_rss_mb": head["sim_rss_mb"]})
        for key in ("up_s", "tx_mb", "rx_mb", "down_s", "event_frames"):
            values = [s["up"][key] for s in per_size]
            result[f"{key}_by_size"] = values
            result[f"{key}_growth_per_10x"] = growth([max(v, 1e-9) for v in values], sizes) if len(sizes) > 1 else []
        f = head["failure"]
        # The rest came up: every guest of a surviving host is ready or failed
        # by the simulated failure rate, and only the dead hosts failed.
        result["failure_5pct"] = {
            "hosts_killed": f["killed"], "failed_hosts": f["failed_hosts"],
            "ready": f["ready"], "failed_guests": f["failed_guests"],
            "guests_on_survivors": f["survivors_guests"], "up_s": f["up_s"],
            "reattachments": f["reattachments"],
            "rest_came_up": f["failed_hosts"] == f["killed"]
            and f["ready"] + f["failed_guests"] == f["survivors_guests"]}

        counts = [100, 1000, 4480] if args.quick else [100, 1000, 4480, 20_000, 100_000]
        fanouts = [8, 32] if args.quick else [8, 16, 32]
        if args.reach:
            counts = [int(x) for x in args.reach.split(",")]
        if args.fanouts:
            fanouts = [int(x) for x in args.fanouts.split(",")]
        largest = [int(x) for x in args.reach_largest_fanouts.split(",")] if args.reach_largest_fanouts else None
        result.update(reach_all(counts, fanouts, decode, largest))
        exps = {fo: round(fit_exponent(pts), 3) for fo, pts in result["reach_s"].items() if len(pts) > 1}
        result["reach_exponent"] = max(exps.values()) if exps else None
        result["reach_exponent_by_fanout"] = exps
        # Each fanout's largest N against its N = 100 (the largest count may
        # have run with some fanouts only).
        result["reach_ratio_largest_to_100"] = {
            fo: {"n": max(pts, key=int), "ratio": round(pts[max(pts, key=int)] / pts["100"], 2)}
            for fo, pts in result["reach_s"].items() if "100" in pts}
        result["reach_growth_per_10x"] = {fo: growth(list(pts.values()), [int(n) for n in pts])
                                          for fo, pts in result["reach_s"].items()}
        result["reach_plot"] = plot_reach(result["reach_s"], Path(args.out) / f"million-reach-{tag}.png")

        result["telemetry_docs_per_s_by_size"] = [round(s["hosts"] / TELEMETRY_INTERVAL_S, 1) for s in per_size]
        result["load_by_size"] = [s["load"] for s in per_size]
        if not args.skip_telemetry:
            result.update(telemetry(4480, 1_000_000, 2000 if args.quick else 20_000, work))
        result["targets"] = {f"up_{tag}_s": 120, "controller_rss_mb": 4000,
                             "reach_ratio_largest_to_100": 10, "ingest_headroom": 1}
        result["met"] = {
            f"up_{tag}_s": result[f"up_{tag}_s"] <= 120,
            "controller_rss_mb": result["controller_rss_mb"] <= 4000,
            "reach_ratio_largest_to_100": max(v["ratio"] for v in result["reach_ratio_largest_to_100"].values()) <= 10,
            "ingest_headroom": result["ingest_headroom"] >= 1 if "ingest_headroom" in result else None}
        result["load_after"] = round(os.getloadavg()[0], 2)
        result["bench_wall_s"] = round(time.perf_counter() - started, 1)
        print_summary(result, tag, sizes)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
