"""Container network set-up alone: what the launcher's network step costs per
container, against creating the same network namespaces with no network.
Prints one JSON line.

Each variant starts N network namespaces (5,000; --quick 500) from W worker
processes (one per CPU, as `up` runs one launcher per CPU), every one with one
NIC: the launcher's own `cnet.setup` from megafleet/vm/cnet.py, as
megafleet/vm/nsspawn.py runs it (defaults inside, the veth pair made from the
host's namespace with its host end up on a bridge, the host end's IPv6 off,
then lo, the NIC, its address inside). No mounts, no init: only the network.

Variants (each timed from its first namespace to its last, busy CPU from
/proc/stat over the same span):

  reference       the namespaces alone, no NIC
  leaves_256      the NICs on bridges of 256 ports, host ends without IPv6
                  (what `up` builds now: limits.LEAF_PORTS_TARGET)
  leaves_1000     the same on bridges of 1,000 ports
  host_ipv6_on    bridges of 256 ports, the host ends keep IPv6 (the kernel
                  then adds a ff00::/8 route per port to the host's table and
                  walks that table at every port's carrier change)
  pair_only       bridges of 256 ports, the veth pair made and nothing else
                  (no IPv6 setting, the far end left down, no address): the
                  floor of any container NIC on a bridge, one netlink request

Keys: <variant>_s, <variant>_ms_per_ns, <variant>_busy_cpu_s, and for each
variant with a network <variant>_net_ms (its ms per namespace minus the
reference's) and <variant>_vs_reference (ratio of the times).

Run as root, alone (it creates thousands of links):
    flock /tmp/megafleet-heavy.lock .venv/bin/python bench/container_net.py
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "megafleet" / "vm"))
import cnet  # noqa: E402  (stdlib only, as the launcher imports it)

sys.path.insert(0, str(REPO / "bench"))
from density import settle  # noqa: E402

CLONE_NEWNET = 0x40000000
PREFIX = "mfcn"
libc = ctypes.CDLL(None, use_errno=True)


def busy_cpu_s() -> float:
    """CPU-seconds all CPUs spent busy since boot (/proc/stat, USER_HZ 100)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(v) - v[3] - v[4]) / 100


def _setns(fd: int) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def worker(k: int, workers: int, n: int, per_bridge: int | None, host_ipv6: bool, pair_only: bool,
           done_fd: int) -> None:
    """Start namespaces k, k+W, ... < n; hold them until killed."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    host_sock = cnet.route_socket()
    held = []
    for i in range(k, n, workers):
        nics: tuple[cnet.Nic, ...] = ()
        if per_bridge is not None:
            mac = "02:00:00:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255, i & 255)
            nics = (cnet.Nic(f"{PREFIX}v{i}", "eth0", mac, (f"10.{100 + (i >> 16)}.{i >> 8 & 255}.{i & 255}/16",),
                             None, f"{PREFIX}b{i // per_bridge}"),)
        config = cnet.NetConfig(nics=nics)
        indexes = cnet.host_indexes(nics)
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        if nics and pair_only:
            cnet.move_in(nics, host_sock, fd, indexes)
        elif nics and host_ipv6:            # cnet.setup without host_ends_ipv6_off
            cnet.prepare_inside(config)
            _setns(home)
            cnet.move_in(nics, host_sock, fd, indexes)
            _setns(fd)
            cnet.configure_inside(config)
        elif nics:                          # what the launcher runs
            cnet.setup(config, host_sock, home, fd, indexes)
        held.append(fd)
        _setns(home)
    os.write(done_fd, b"x")
    signal.pause()


def run_variant(n: int, workers: int, per_bridge: int | None, host_ipv6: bool, pair_only: bool) -> dict:
    bridges = [] if per_bridge is None else [f"{PREFIX}b{j}" for j in range(-(-n // per_bridge))]
    subprocess.run(["ip", "-batch", "-"], check=True, text=True,
                   input="".join(f"link add {b} type bridge\nlink set {b} up\n" for b in bridges))
    settle()
    pids, pipes = [], []
    t0, c0 = time.monotonic(), busy_cpu_s()
    try:
        for k in range(workers):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    worker(k, workers, n, per_bridge, host_ipv6, pair_only, w)
                finally:
                    os._exit(1)
            os.close(w)
            pids.append(pid)
            pipes.append(r)
        for r in pipes:
            if os.read(r, 1) != b"x":
                raise SystemExit("a worker failed (see its traceback above)")
        seconds, cpu = time.monotonic() - t0, busy_cpu_s() - c0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for r in pipes:
            os.close(r)
        if bridges:
            subprocess.run(["ip", "-batch", "-"], text=True, capture_output=True,
                           input="".join(f"link del {b}\n" for b in bridges))
    return {"s": round(seconds, 2), "ms_per_ns": round(1000 * seconds / n, 3), "busy_cpu_s": round(cpu, 1)}


# name: (ports per bridge or no NIC, host ends keep IPv6, the pair and nothing else)
VARIANTS = {"reference": (None, False, False), "leaves_256": (256, False, False),
            "leaves_1000": (1000, False, False), "host_ipv6_on": (256, True, False),
            "pair_only": (256, True, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 namespaces instead of 5,000")
    ap.add_argument("-n", type=int, help="namespaces per variant")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable; default all")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/container_net.py needs root (network namespaces, links)")
    n = args.n or (500 if args.quick else 5000)
    workers = len(os.sched_getaffinity(0))
    out: dict = {"n": n, "workers": workers, "load_before": round(os.getloadavg()[0], 2)}
    for name in args.variant or list(VARIANTS):
        for key, value in run_variant(n, workers, *VARIANTS[name]).items():
            out[f"{name}_{key}"] = value
        print(f"{name}: {out[f'{name}_s']} s", file=sys.stderr)
    if "reference_ms_per_ns" in out:
        for name in VARIANTS:
            if name != "reference" and f"{name}_s" in out:
                out[f"{name}_net_ms"] = round(out[f"{name}_ms_per_ns"] - out["reference_ms_per_ns"], 3)
                out[f"{name}_vs_reference"] = round(out[f"{name}_s"] / out["reference_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
