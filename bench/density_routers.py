"""Benchmark: a mesh of OSPF routers (a ring plus random chords) brought up on
this host through `megafleet up` (or `megafleet net up` with --via net);
prints one JSON line:

    routers_n              OSPF routers in the mesh (--routers, default 750)
    routers_daemon         frr | bird | auto (--daemon: `ospf daemon X` on every router)
    routers_links          point-to-point links (ring + chords)
    routers_via            up | net: which command brought it up and down
    routers_up_s           `up` until it returned (namespaces, links, daemons started)
    routers_converged_s    `up` started until, with every router's daemons
                           started (`up` returned), a host behind the first router
                           answers a ping from a host behind the router half way
                           round the ring (from inside our own namespaces only)
    routers_first_reach_s  the same, the first ping that answered at all (a path
                           through the routers started so far may come earlier)
    routers_down_s         `down` of the whole testbed
    routers_max_load1      highest 1-minute load average seen while converging
    routers_steady_cpu     CPU (in cores) all routing daemons use together over
                           --steady seconds (default 20) once converged: what the
                           idle mesh costs (hellos, refreshes), i.e. no storm
    load1_before           load average when the run started (others' work)
    leftovers              namespaces and daemons of the testbed left after down (0)

Target (issue 12): 750 routers converged in <= 300 s on a 2-core host.
The mesh: routers r1..rN in a ring, N/2 chords between random pairs (fixed
seed, so every run builds the same mesh; diameter ~log N, within ping's TTL),
IPv4 point-to-point /30s; host LAN `lana` (host ha) at r1 and `lanb` (host hb)
at r(N/2+1). `--ipv6` adds an IPv6 pool (ospf6d / OSPFv3 too).

Run as root, alone (it loads both CPUs):
    flock /tmp/megafleet-heavy.lock .venv/bin/python bench/density_routers.py
    .venv/bin/python bench/density_routers.py --quick        (40 routers)
`run(args)` returns the dict; the testbed is always torn down, also on errors
and timeouts, and the run fails if anything is left.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NAME = "mfrbench"


def mesh(n: int, daemon: str = "auto", ipv6: bool = False, seed: int = 1) -> tuple[str, int]:
    """The description of an n-router ring plus n/2 random chords, and its
    number of point-to-point links."""
    rng = random.Random(seed)
    edges = {(i, i % n + 1) if i < i % n + 1 else (i % n + 1, i) for i in range(1, n + 1)}
    want = len(edges) + n // 2
    while len(edges) < want:
        a, b = sorted(rng.sample(range(1, n + 1), 2))
        edges.add((a, b))
    far = n // 2 + 1
    lines = ["pool core 10.128.0.0/11", "pool lans 10.127.0.0/16"]
    if ipv6:
        lines.append("pool core6 fd7f::/48")
    lines += [f"router r[1..{n}] ospf area 0" + ("" if daemon == "auto" else f" daemon {daemon}"),
              "switch lana subnet 10.127.1.0/24", "switch lanb subnet 10.127.2.0/24",
              "host ha on lana", "host hb on lanb", "link r1 -- lana", f"link r{far} -- lanb"]
    lines += [f"link r{a} -- r{b}" for a, b in sorted(edges)]
    lines.append("reachable ha hb")
    return "\n".join(lines) + "\n", len(edges)


def _megafleet(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megafleet", *args], cwd=REPO, **kw)


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _leftovers() -> dict:
    from megafleet.netlang import live

    namespaces = [n for n in live.existing_netns() if n.startswith(NAME + "-")]
    return {"namespaces": len(namespaces), "processes": len(live.pids_in_netns(namespaces))}


def _ping(src_ns: str, addr: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-n", "-q", "-c1", "-W1", addr],
                          capture_output=True).returncode == 0


def _daemon_cpu_s() -> float:
    """CPU seconds used so far by the testbed's recorded routing daemons."""
    from megafleet.ledger import Ledger

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for r in Ledger().list("net", "process"):
        if r.key.startswith(NAME + "/frr/") and "pid" in r.data:
            try:
                stat = Path(f"/proc/{r.data['pid']}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[19]) == r.data["start"]:
                total += int(fields[11]) + int(fields[12])
    return total / tick


def run(args: argparse.Namespace) -> dict:
    """Build, wait for convergence, tear down; returns the JSON fields above.
    args: routers, daemon, ipv6, timeout (seconds for the whole up+converge),
    steady (seconds of steady-state CPU measurement, 0: none)."""
    from megafleet.netlang import live
    from megafleet.netlang.compiler import compile_file

    # Defaults for whatever the caller's namespace lacks (bench/density.py passes its own).
    args = argparse.Namespace(**{**vars(parser().parse_args([])), **vars(args)})
    if os.geteuid() != 0:
        raise SystemExit("density_routers needs root (namespaces, daemons)")
    result: dict = {"routers_n": args.routers, "routers_daemon": args.daemon, "routers_via": args.via,
                    "load1_before": _load1()}
    # `megafleet up` without the KSM daemon (no guests here) and without its own
    # convergence wait (measured here); telemetry samples rarely.
    up_argv = ["up", "--no-ksm", "--no-verify", "--telemetry-interval", "60"] if args.via == "up" \
        else ["net", "up"]
    down_argv = ["down"] if args.via == "up" else ["net", "down"]
    with tempfile.TemporaryDirectory(prefix="mfr-bench-") as tmp:
        path = Path(tmp) / "mesh.fleet"
        text, links = mesh(args.routers, args.daemon, args.ipv6)
        path.write_text(text)
        result["routers_links"] = links
        net = compile_file(str(path), graph=False)
        dst = net.node("ha").ifaces[0][2][4].split("/")[0]
        src_ns = f"{NAME}-hb"
        if _leftovers()["namespaces"]:
            _megafleet(*down_argv, NAME).wait()
        t0 = time.monotonic()
        up = _megafleet(*up_argv, str(path), "-N", NAME, stdout=subprocess.DEVNULL)
        converged = up_s = first = None
        max_load = 0.0
        try:
            deadline = t0 + args.timeout
            while time.monotonic() < deadline:
                max_load = max(max_load, _load1())
                if up_s is None and up.poll() is not None:
                    if up.returncode != 0:
                        raise SystemExit(f"{' '.join(up_argv)} failed (exit {up.returncode})")
                    up_s = time.monotonic() - t0
                if (NETNS / src_ns).exists() and _ping(src_ns, dst):
                    first = first if first is not None else time.monotonic() - t0
                    if up_s is not None:
                        converged = time.monotonic() - t0
                        break
                time.sleep(0.5)
            if converged is not None and args.steady > 0:
                c0, w0 = _daemon_cpu_s(), time.monotonic()
                time.sleep(args.steady)
                result["routers_steady_cpu"] = round((_daemon_cpu_s() - c0) / (time.monotonic() - w0), 3)
        finally:
            if up.poll() is None:
                # Out of time: stop `up` (our child) before `down` removes its work.
                up.send_signal(signal.SIGINT)
                try:
                    up.wait(30)
                except subprocess.TimeoutExpired:
                    up.kill()
                    up.wait()
            t1 = time.monotonic()
            down = _megafleet(*down_argv, NAME, stdout=subprocess.DEVNULL)
            down.wait()
            result["routers_down_s"] = round(time.monotonic() - t1, 2)
            result["leftovers"] = _leftovers()
            if live.status(NAME) is not None:
                result["leftovers"]["ledger"] = 1
    result["routers_up_s"] = None if up_s is None else round(up_s, 2)
    result["routers_converged_s"] = None if converged is None else round(converged, 2)
    result["routers_first_reach_s"] = None if first is None else round(first, 2)
    result["routers_max_load1"] = max_load
    return result


NETNS = Path("/run/netns")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routers", type=int, default=750, help="routers in the mesh (default 750)")
    ap.add_argument("--quick", action="store_true", help="40 routers")
    ap.add_argument("--daemon", choices=("auto", "frr", "bird"), default="auto",
                    help="`ospf daemon X` on every router (auto: megafleet chooses by count)")
    ap.add_argument("--ipv6", action="store_true", help="an IPv6 pool too (OSPFv3)")
    ap.add_argument("--via", choices=("up", "net"), default="up",
                    help="bring it up and down with `megafleet up`/`down` (default) or `net up`/`net down`")
    ap.add_argument("--steady", type=float, default=20,
                    help="seconds over which the converged mesh's daemon CPU is measured (0: skip)")
    ap.add_argument("--timeout", type=float, default=480,
                    help="seconds from `up` to giving up on convergence (default 480)")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.routers = 40
    result = run(args)
    print(json.dumps(result))
    left = result["leftovers"]
    if any(left.values()):
        raise SystemExit(f"left behind: {left}")


if __name__ == "__main__":
    main()
