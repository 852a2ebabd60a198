"""Benchmark of experiments on a running testbed: prints one JSON line.

    converge_s             campus-ospf: from `up --no-verify` returning to every
                           reachable assertion true (pings from inside the nodes)
    verify_s               campus-ospf: all its assertions checked live once more
                           (`megafleet verify`, in-process), every check passing
    verify_checks          how many pings that is
    link_set_ms            from `link set dist1 -- core delay 50ms` (in-process
                           call, the first change of that link: a wirefilter is
                           spliced in) to the first reply of a running 10 ms ping
                           with RTT >= 100 ms
    link_change_ms         the same for a later change (delay 80ms from none) on
                           the same link (the wirefilter's management socket),
                           reply >= 160 ms
    link_set_cli_ms        a later change (delay 20ms from none) through the CLI
                           (a fresh `megafleet` process), reply >= 40 ms
                           verify_s, link_change_ms and link_set_cli_ms are
                           medians of --rounds rounds on the one testbed (each
                           round's in the *_rounds keys); converge_s and
                           link_set_ms happen once per testbed: one run each
    lan_up_s               lan1000: the first `up` (N guests)
    reconcile_s            lan1000 up: `up` of the file with 10 guests more
    redeploy_s             the reference, same run: `down` + `up` of that file
    redeploy_down_s        the `down` part of it
    reconcile_vs_redeploy  reconcile_s / redeploy_s (target <= 0.1); these four
                           are medians of --rounds rounds (default 3), each
                           round's in the *_rounds keys
    settle_s               seconds waited, before the reconcile and before the
                           redeploy, for the host to settle after the step
                           before (density.settle: one testbed's boot storm
                           and teardown are not the next step's cost; the
                           testbed's collector keeps running all along)

Run as root:  .venv/bin/python bench/experiments.py [--quick] [--guests N] [--only campus|lan] [--rounds R]
(--quick: campus with 4+4 staff/lab guests, lan1000 with 100 guests; --only:
one of the two parts.) Full size boots 200 + 1010 container guests: run it
under the heavy-run lock:
    flock /tmp/megafleet-heavy.lock .venv/bin/python bench/experiments.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent


def _dirs(base: Path) -> None:
    for name, env in (("state", "MEGAFLEET_STATE"), ("run", "MEGAFLEET_RUN")):
        (base / name).mkdir(parents=True, exist_ok=True)
        os.environ[env] = str(base / name)


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "megafleet", *args], capture_output=True, text=True, cwd=REPO)
    if check and r.returncode != 0:
        raise SystemExit(f"megafleet {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def up(path: Path, name: str, defines: list[str], verify: bool = False) -> tuple[float, dict]:
    t0 = time.monotonic()
    args = ["up", str(path), "-N", name, "--no-ksm", "--json"] + [x for d in defines for x in ("-D", d)]
    if not verify:
        args.append("--no-verify")
    r = cli(*args)
    return time.monotonic() - t0, json.loads(r.stdout)


def settle() -> float:
    """density.settle: seconds until the host is quiet after the step before."""
    if str(REPO / "bench") not in sys.path:
        sys.path.insert(0, str(REPO / "bench"))
    import density
    return density.settle()


def start_ping(ns: str, addr: str) -> subprocess.Popen:
    """A running 10 ms ping inside a namespace, each reply with its epoch time (-D)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-D", "-i", "0.01", "-W", "1", addr],
                            stdout=subprocess.PIPE, text=True)


def first_slow(p: subprocess.Popen, threshold_ms: float, since: float, timeout: float = 10) -> float | None:
    deadline = time.time() + timeout
    pat = re.compile(r"^\[(\d+\.\d+)\].*time=([\d.]+) ms")
    for line in p.stdout:
        m = pat.match(line)
        if m and float(m.group(2)) >= threshold_ms:
            # The reply's receive time minus its RTT: when the echo request left.
            sent = float(m.group(1)) - float(m.group(2)) / 1000
            if sent >= since:
                return sent
        if time.time() > deadline:
            return None
    return None


def campus(base: Path, quick: bool, rounds: int = 3) -> dict:
    from megafleet.experiment import control, verify
    from megafleet.experiment import refs as R

    name = "mfxbc"
    defines = ["staff=4", "lab=4"] if quick else []
    path = REPO / "examples" / "campus-ospf.fleet"
    out: dict = {}
    try:
        up_s, summary = up(path, name, defines)
        returned = time.monotonic()
        tb = control.testbed(name)
        res = trio.run(lambda: verify.converge(tb, within=180))
        out["converge_s"] = round(time.monotonic() - returned, 3) if res.ok else None
        out["converge_checks_s"] = res.converge_s
        verifies = []
        for _ in range(rounds):
            t0 = time.monotonic()
            res2 = trio.run(lambda: verify.converge(tb, within=0))
            verifies.append(round(time.monotonic() - t0, 3))
            out["verify_checks"] = res2.checks
            out["verify_ok"] = res2.ok and out.get("verify_ok", True)
        out["verify_s"], out["verify_s_rounds"] = statistics.median(verifies), verifies

        ns, www1 = f"{name}-probe1", "10.20.5.2"

        def set_delay(delay: str, via_cli: bool = False) -> None:
            if via_cli:
                cli("link", "set", "dist1", "--", "core", "delay", delay, "-t", name)
            else:
                trio.run(lambda: control.link(control.testbed(name), "set", "dist1", "core",
                                              R.parse_settings(["delay", delay])))

        def timed(delay_ms: int, via_cli: bool = False) -> float | None:
            """ms from setting `delay_ms` (higher than the link's delay now) to
            the first echo request sent after it whose RTT shows it."""
            p = start_ping(ns, www1)
            try:
                time.sleep(1)
                t0 = time.time()
                set_delay(f"{delay_ms}ms", via_cli)
                seen = first_slow(p, 2 * delay_ms, t0)
            finally:
                p.kill()
                p.wait()
            return round((seen - t0) * 1000, 1) if seen else None

        out["link_set_ms"] = timed(50)          # the splice: once per link
        changes: list[float | None] = []
        clis: list[float | None] = []
        for _ in range(rounds):
            set_delay("none")
            changes.append(timed(80))
            set_delay("none")
            clis.append(timed(20, via_cli=True))
        for key, values in (("link_change_ms", changes), ("link_set_cli_ms", clis)):
            seen = [v for v in values if v is not None]
            out[key] = statistics.median(seen) if len(seen) == len(values) else None
            out[f"{key}_rounds"] = values
        out["campus_guests"] = summary["guests"]
        out["campus_up_s"] = round(up_s, 3)
    finally:
        cli("down", name, check=False)
    return out


def lan(base: Path, quick: bool, guests: int | None = None, rounds: int = 3) -> dict:
    """lan1000's reconcile against its redeploy, `rounds` times: each round
    adds 10 guests with `up` (the reconcile), then takes the testbed `down`
    and `up` again with them (the redeploy), then goes back to N guests with
    an `up` that is not timed. The figures are the medians of the rounds (one
    round's redeploy varies by a second on this machine); every round's
    figures are in the *_rounds keys."""
    name = "mfxbl"
    n = guests or (100 if quick else 1000)
    text = (REPO / "examples" / "lan1000.fleet").read_text().replace(
        'image tiny from "images/tiny.toml"', f'image tiny from "{REPO}/examples/images/tiny.toml"')
    path = base / "lan.fleet"
    path.write_text(text)
    out: dict = {"lan_guests": n, "rounds": rounds}
    reconciles, redeploys, downs, settled, phases = [], [], [], [], []
    try:
        first_s, _ = up(path, name, [f"guests={n}"])
        out["lan_up_s"] = round(first_s, 3)
        for i in range(rounds):
            if i:
                up(path, name, [f"guests={n}"])          # back to N (a reconcile removing 10)
            settled.append(settle())
            reconcile_s, s = up(path, name, [f"guests={n + 10}"])
            assert s["ok"] and s["ready"] == n + 10, s
            reconciles.append(round(reconcile_s, 3))
            phases.append(s.get("phases"))               # inside `up`: where the time went
            settled.append(settle())
            t0 = time.monotonic()
            cli("down", name)
            downs.append(round(time.monotonic() - t0, 3))
            up(path, name, [f"guests={n + 10}"])
            redeploys.append(round(time.monotonic() - t0, 3))
    finally:
        cli("down", name, check=False)
    ratios = [round(r / d, 4) for r, d in zip(reconciles, redeploys)]
    out.update(reconcile_s=statistics.median(reconciles), redeploy_s=statistics.median(redeploys),
               redeploy_down_s=statistics.median(downs),
               reconcile_vs_redeploy=statistics.median(ratios),
               reconcile_s_rounds=reconciles, redeploy_s_rounds=redeploys,
               reconcile_vs_redeploy_rounds=ratios, reconcile_phases=phases, settle_s=settled)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (see the module text)")
    ap.add_argument("--guests", type=int, default=None, help="lan guests before the 10 added (default 1000; 100 with --quick)")
    ap.add_argument("--only", choices=("campus", "lan"), default=None, help="run one part only")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the lan reconcile/redeploy and of the campus verify and link changes (medians reported)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    base = Path(tempfile.mkdtemp(prefix="mfxb-"))
    try:
        _dirs(base)
        os.environ.setdefault("MEGAFLEET_CACHE", str(REPO / ".cache" / "test"))
        result = {"bench": "experiments", "quick": args.quick}
        if args.only in (None, "campus"):
            result.update(campus(base, args.quick, args.rounds))
        if args.only in (None, "lan"):
            result.update(lan(base, args.quick, args.guests, args.rounds))
        result["load"] = os.getloadavg()[0]
        print(json.dumps(result))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
