"""Benchmark of the importers: a generated 10,000-node GraphML map imported, and
the GÉANT 2012 Topology Zoo map brought up live with OSPF and a host LAN per PoP.

Prints one JSON line:
  import_10k_nodes_s      a generated 10,000-PoP Zoo-style GraphML (labels, coordinates,
                          ~20,000 edges) read and converted to .fleet text
                          (`megafleet import`'s work, best of --repeat)
  nx_read_graphml_10k_s   networkx's own read_graphml of the same file: the reference
  import_vs_nx_read       import_10k_nodes_s / nx_read_graphml_10k_s
  *_cpu_s                 CPU seconds of the same runs (a shared host inflates wall time)
  compile_10k_nodes_s     the imported text compiled (what `net check` adds)
  geant_import_s          Geant2012.graphml imported (hosts per router 1) and compiled
  geant_up_s              `net up` of it: 40 FRR routers (OSPF), 40 host LANs
  geant_converged_s       from up's return until the hosts of the two PoPs farthest
                          apart in hops ping each other (OSPF converged end to end)
  geant_up_vs_import      geant_up_s / geant_import_s

Target: import_10k_nodes_s <= 2. Options: --quick (a 1,000-node map, no GÉANT
run), --no-live (no GÉANT run: it needs root and FRR), --repeat N.
The GÉANT run starts 40 FRR routers: keep the machine otherwise idle for figures.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GEANT = REPO.parent / "shared" / "testdata" / "topologyzoo" / "Geant2012.graphml"


def generate_map(nodes: int, path: Path, seed: int = 17) -> int:
    """A Zoo-style map: PoPs with labels (accents, duplicates), coordinates and
    LinkSpeedRaw, preferential attachment (2 edges per new PoP). Returns edges."""
    import networkx as nx

    rng = random.Random(seed)
    g = nx.barabasi_albert_graph(nodes, 2, seed=seed)
    cities = ["Zürich", "São Paulo", "New York", "Kraków", "Paris", "Genève", "Москва", "Dublin"]
    for n in g.nodes:
        g.nodes[n].update(label=f"{rng.choice(cities)} {n % 997}", Latitude=rng.uniform(-60, 70),
                          Longitude=rng.uniform(-180, 180), Internal=1)
    for a, b in g.edges:
        g.edges[a, b]["LinkSpeedRaw"] = float(rng.choice((1e9, 2.5e9, 1e10)))
    nx.write_graphml(g, path)
    return g.number_of_edges()


def best(fn, repeat: int) -> tuple[float, float, object]:
    """(best wall seconds, CPU seconds of that run, result) over `repeat` runs."""
    runs, out = [], None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        runs.append((time.perf_counter() - t, time.process_time() - c))
    wall, cpu = min(runs)
    return wall, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000-node map, no GÉANT run")
    ap.add_argument("--no-live", action="store_true", help="no GÉANT run (needs root and FRR)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import networkx as nx

    from megafleet.netlang.compiler import compile_text
    from megafleet.netlang.importers import ImportOptions, convert

    out: dict[str, object] = {}
    size = 1000 if args.quick else 10_000
    with tempfile.TemporaryDirectory(prefix="mfbench-import-") as tmp:
        path = Path(tmp) / f"map{size}.graphml"
        edges = generate_map(size, path)
        nx_s, nx_cpu, _ = best(lambda: nx.read_graphml(path), args.repeat)
        imp_s, imp_cpu, result = best(lambda: convert([path], "graphml", ImportOptions(delays="geo", rates=True)),
                                      args.repeat)
        comp_s, _, net = best(lambda: compile_text(result.text, "map.fleet", graph=False), 1)
        assert net.counts()["router"] == size, net.counts()
        key = "10k" if size == 10_000 else f"{size // 1000}k"
        out.update({f"import_{key}_nodes_s": round(imp_s, 3), f"nx_read_graphml_{key}_s": round(nx_s, 3),
                    "import_vs_nx_read": round(imp_s / nx_s, 2), f"import_{key}_cpu_s": round(imp_cpu, 3),
                    f"nx_read_graphml_{key}_cpu_s": round(nx_cpu, 3),
                    f"compile_{key}_nodes_s": round(comp_s, 3), "map_edges": edges})
    if not (args.quick or args.no_live):
        out.update(geant())
    print(json.dumps(out))


def geant() -> dict[str, object]:
    import networkx as nx

    from megafleet import proc
    from megafleet.netlang import live
    from megafleet.netlang.compiler import compile_text
    from megafleet.netlang.importers import ImportOptions, convert

    if not GEANT.exists():
        return {"geant": f"skipped: {GEANT} not found"}
    name = "mfbig"
    t = time.perf_counter()
    result = convert([GEANT], opts=ImportOptions(hosts_per_router=1))
    net = compile_text(result.text, f"{name}.fleet", graph=False)
    import_s = time.perf_counter() - t
    g = nx.read_graphml(GEANT)
    lengths = dict(nx.all_pairs_shortest_path_length(g))
    a, b = max(((x, y) for x in lengths for y in lengths[x]), key=lambda p: lengths[p[0]][p[1]])
    names = {line.split("(node ")[1].split(",")[0]: line.split()[1]
             for line in result.text.splitlines() if line.startswith("router ") and "(node " in line}
    src, dst = f"{names[a]}_h1", f"{names[b]}_h1"
    live.down(name)
    try:
        t = time.perf_counter()
        live.up(net, name)
        up_s = time.perf_counter() - t
        netns = live.plan(net, name).netns
        addr = net.node(dst).ifaces[0][2][4].split("/")[0]
        t = time.perf_counter()
        while proc.run(["ip", "netns", "exec", netns[src], "ping", "-n", "-q", "-c1", "-W1", addr],
                       check=False).returncode != 0:
            if time.perf_counter() - t > 300:
                raise SystemExit(f"GÉANT: {src} did not reach {dst} within 300 s")
            time.sleep(0.2)
        conv_s = time.perf_counter() - t
    finally:
        live.down(name)
    return {"geant_import_s": round(import_s, 3), "geant_up_s": round(up_s, 2),
            "geant_converged_s": round(conv_s, 2), "geant_up_vs_import": round(up_s / import_s, 1),
            "geant_hops": lengths[a][b], "geant_pair": f"{src}->{dst}"}


if __name__ == "__main__":
    main()
