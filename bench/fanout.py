"""Benchmark of gproc's tree fanout against pdsh, ClusterShell and parallel-ssh.

Builds one fleet of namespace hosts (each with its own sshd, each host's veth
shaped with tc to 100 Mbit/s in both directions) and, for each fleet size (the
first N hosts), measures in the same run:

  exec_s          time to run `true` on all hosts: megafleet with its tree (or flat
                  star) already up; pdsh, clush and pssh one-shot (their normal use:
                  they connect for each command)
  tree_setup_s    time to build megafleet's agent tree
  push_s          20 MB to one host (`single`), and to all hosts through the tree
                  and through a flat star
  controller_cpu_s  CPU seconds of this (controller) process per megafleet session
                  (tree setup + exec runs + push)

Prints ONE JSON line with those keys plus `ratios` (the issue's targets). Needs
root; pdsh from Debian; ClusterShell and parallel-ssh from PyPI
(`pip install -e '.[bench]'`). Progress goes to stderr.

    .venv/bin/python bench/fanout.py [--counts 16,64,128] [--fanout 8] [--size-mb 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from megafleet.gproc import Fleet
from megafleet.gproc.inventory import Inventory
from megafleet.gproc.testfleet import TestFleet, leftovers

PREFIX = "mfgb"


def log(msg: str) -> None:
    print(f"[fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ssh_options(tf: TestFleet) -> list[str]:
    # The same trust as megafleet: fleet key, fleet known_hosts, strict checking.
    return ["-F", "/dev/null", "-i", str(tf.identity), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={tf.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes"]


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return elapsed


def run_pdsh(tf: TestFleet, addrs: list[str]) -> float:
    env = dict(os.environ, PDSH_SSH_ARGS=" ".join(ssh_options(tf) + ["-l%u", "%h"]))
    return timed(["pdsh", "-R", "ssh", "-l", "root", "-w", ",".join(addrs), "true"], env)


def run_clush(tf: TestFleet, addrs: list[str]) -> float:
    clush = str(Path(sys.executable).parent / "clush")
    return timed([clush, "-l", "root", "-o", " ".join(ssh_options(tf)), "-w", ",".join(addrs), "true"])


PSSH = """
import sys, time
from pssh.clients import ParallelSSHClient
hosts, key = sys.argv[1].split(","), sys.argv[2]
start = time.monotonic()
client = ParallelSSHClient(hosts, user="root", pkey=key, pool_size=len(hosts), timeout=60)
output = client.run_command("true")
client.join(output)
bad = [o.host for o in output if o.exit_code != 0]
if bad:
    sys.exit("pssh: failed on " + ",".join(bad))
print(time.monotonic() - start)
"""


def run_pssh(tf: TestFleet, addrs: list[str]) -> float:
    # In its own process: parallel-ssh runs on gevent, which must not meet trio.
    result = subprocess.run([sys.executable, "-c", PSSH, ",".join(addrs), str(tf.identity)],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pssh failed: {result.stderr.strip()[-500:]}")
    return float(result.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def megafleet_session(inv: Inventory, names: list[str], fanout: int, root_fanout: int | None,
                            blob: Path, push_dir: Path, exec_runs: int) -> dict:
    for name in names:
        (push_dir / name).mkdir(parents=True, exist_ok=True)
    cpu = cpu_seconds()
    async with Fleet.connect(inv, hosts=names, fanout=fanout, root_fanout=root_fanout,
                             connect_timeout=60) as fleet:
        down = [n for n, s in fleet.status.items() if s.state != "up"]
        if down:
            raise RuntimeError(f"hosts not up: {down[:5]} ... {fleet.status[down[0]].error}")
        times = []
        for _ in range(exec_runs):
            report = await fleet.exec(["true"])
            if not report.ok:
                raise RuntimeError(f"exec failed: {report.counts()}")
            times.append(report.seconds)
        report = await fleet.push(str(blob), str(push_dir / "{host}" / "blob"), timeout=900)
        if not report.ok or any(r.skipped for r in report.results.values()):
            raise RuntimeError(f"push failed: {report.counts()}")
        out = {"setup_s": fleet.setup_seconds, "exec_s": statistics.median(times),
               "push_s": report.seconds}
    out["cpu_s"] = cpu_seconds() - cpu
    for name in names:
        shutil.rmtree(push_dir / name, ignore_errors=True)
    return out


def settle(tf: TestFleet, n: int, baseline: dict[int, int], timeout: float = 60.0) -> None:
    """Wait until the first n hosts run only what they ran at the start (their
    sshd): the sessions of the previous tool must not slow the next one down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [i for i in range(n) if len(tf.pids_in(i)) > baseline[i]]
        if not busy:
            return
        time.sleep(0.2)
    log(f"hosts still busy after {timeout:.0f} s: {busy[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="16,64,128", help="fleet sizes (comma-separated)")
    parser.add_argument("--fanout", type=int, default=4, help="megafleet agents' fanout")
    parser.add_argument("--root-fanout", type=int, default=16,
                        help="sessions the controller opens (its link is not shaped, the hosts' are)")
    parser.add_argument("--size-mb", type=int, default=20, help="size of the pushed file")
    parser.add_argument("--exec-runs", type=int, default=3, help="megafleet exec runs (median)")
    parser.add_argument("--skip", default="", help="references to skip: pdsh,clush,pssh")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if os.geteuid() != 0:
        sys.exit("bench/fanout.py: needs root (network namespaces, sshd)")

    work = Path(tempfile.mkdtemp(prefix="mfgb-"))
    tf = TestFleet(PREFIX, max(counts), work / "fleet", subnet="10.148.0.0/24", shape_mbit=100)
    result: dict = {"exec_s": {t: {} for t in ("megafleet_tree", "megafleet_flat", "pdsh", "clush", "pssh")},
                    "tree_setup_s": {}, "push_s": {"single": None, "megafleet_tree": {}, "megafleet_flat": {}},
                    "controller_cpu_s": {"megafleet_tree": {}, "megafleet_flat": {}}}
    try:
        log(f"building a fleet of {max(counts)} namespace hosts with sshd, 100 Mbit/s links")
        inv = tf.up(workers=16)
        blob = work / "blob.bin"
        blob.write_bytes(os.urandom(args.size_mb << 20))
        push_dir = work / "push"
        names_all = [h.name for h in inv.hosts]
        baseline = {i: len(tf.pids_in(i)) for i in range(len(names_all))}
        addr_all = [h.address for h in inv.hosts]

        log("push to a single host")
        single = trio.run(megafleet_session, inv, names_all[:1], 1, None, blob, push_dir, 1)
        result["push_s"]["single"] = round(single["push_s"], 3)

        for n in counts:
            names, addrs = names_all[:n], addr_all[:n]
            for tool, fn in (("pdsh", run_pdsh), ("clush", run_clush), ("pssh", run_pssh)):
                if tool in skip:
                    continue
                settle(tf, n, baseline)
                log(f"{n} hosts: {tool} one-shot `true`")
                result["exec_s"][tool][n] = round(fn(tf, addrs), 3)
            settle(tf, n, baseline)
            log(f"{n} hosts: megafleet tree (root fanout {args.root_fanout}, then {args.fanout})")
            tree_run = trio.run(megafleet_session, inv, names, args.fanout, args.root_fanout, blob, push_dir,
                                args.exec_runs)
            result["tree_setup_s"][n] = round(tree_run["setup_s"], 3)
            result["exec_s"]["megafleet_tree"][n] = round(tree_run["exec_s"], 4)
            result["push_s"]["megafleet_tree"][n] = round(tree_run["push_s"], 3)
            result["controller_cpu_s"]["megafleet_tree"][n] = round(tree_run["cpu_s"], 2)
            settle(tf, n, baseline)
            log(f"{n} hosts: megafleet flat")
            flat_run = trio.run(megafleet_session, inv, names, n, None, blob, push_dir, args.exec_runs)
            result["exec_s"]["megafleet_flat"][n] = round(flat_run["exec_s"], 4)
            result["push_s"]["megafleet_flat"][n] = round(flat_run["push_s"], 3)
            result["controller_cpu_s"]["megafleet_flat"][n] = round(flat_run["cpu_s"], 2)
            log(f"{n} hosts done: {json.dumps({k: v for k, v in result.items()})}")
    finally:
        log("tearing the fleet down")
        tf.down()
        shutil.rmtree(work, ignore_errors=True)
        left = leftovers(PREFIX)
        if left:
            log(f"LEFT BEHIND: {left}")

    big = max(counts)
    ratios = {}
    tree_exec = result["exec_s"]["megafleet_tree"].get(big)
    for tool in ("pdsh", "clush"):
        if tree_exec and big in result["exec_s"][tool]:
            ratios[f"exec_{tool}_over_tree_{big}"] = round(result["exec_s"][tool][big] / tree_exec, 1)
    if big in result["exec_s"]["pdsh"]:
        ratios[f"tree_setup_over_pdsh_{big}"] = round(result["tree_setup_s"][big] / result["exec_s"]["pdsh"][big], 2)
    mid = 64 if 64 in counts else big
    ratios[f"push_tree_{mid}_over_single"] = round(result["push_s"]["megafleet_tree"][mid] / result["push_s"]["single"], 2)
    ratios[f"push_flat_{mid}_over_single"] = round(result["push_s"]["megafleet_flat"][mid] / result["push_s"]["single"], 2)
    result["ratios"] = ratios
    result["fanout"] = {"root": args.root_fanout, "agents": args.fanout}
    result["load_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
