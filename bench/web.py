"""Benchmark of the dashboard and API (`megafleet web`): prints one JSON line.

    graph_10k_render_s        first paint of a 10,000-node description's graph in
                              headless Chromium (Debian's, driven by Playwright):
                              from navigation start to the graph drawn, default view
                              (guests grouped by switch above 2,000 nodes)
    graph_10k_full_render_s   the same with every node drawn (?collapse=no)
    api_nodes_10k_ms          GET /api/v1/nodes of those 10,000 nodes (median of 5,
                              after one warm-up that compiles the description)
    api_nodes_10k_cold_ms     that first call
    sse_clients               Server-Sent-Event clients held at once (of --clients)
    server_cpu_cores          the server's CPU (cores) over --window seconds with those
                              clients connected, in front of --guests container guests
                              reporting every 5 s
    event_to_screen_ms        median, over --kills guests: from a guest's process killed
                              (SIGKILL, as a crash) to its colour changing on an open
                              page (no reload)
    poll_s                    the server's poll interval: the floor of event_to_screen

The 10,000-node figures use `megafleet web --preview` (the description is compiled
and drawn; nothing is booted); the others run against a real testbed of --guests
container guests brought up with `megafleet up`.

Targets: graph_10k_render_s <= 3, event_to_screen_ms <= 2,000, sse_clients 1,000,
server_cpu_cores < 0.3.
Run as root:  .venv/bin/python bench/web.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def megafleet(*args: str, env: dict[str, str], timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafleet", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, env: dict[str, str], *args: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "megafleet", "web", "--json",
                                      "--listen", f"127.0.0.1:{self.port}", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     cwd=REPO, env=env)
        self.info = json.loads(self.proc.stdout.readline())
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("megafleet web did not listen")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def big_description(path: Path, nodes: int) -> None:
    """~`nodes` nodes: access switches of 250 container guests behind 4 OSPF routers."""
    per = 250
    switches = max(1, nodes // per)
    lines = [f'image tiny from "{REPO}/examples/images/tiny.toml"', "pool p 10.0.0.0/8", "switch core"]
    for r in range(4):
        lines += [f"router r{r} {{", "  iface core auto"]
        lines += [f"  iface a{s} auto" for s in range(r, switches, 4)]
        lines += ["  ospf area 0", "}"]
    for s in range(switches):
        lines += [f"switch a{s}", f"vm g{s}_[1..{per}] image tiny driver container mem 64M on a{s}"]
    path.write_text("\n".join(lines) + "\n")


def first_paint(browser, url: str) -> float:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url)
    page.wait_for_function("window.megafleet && window.megafleet.drawnAt !== null", timeout=120000)
    page.wait_for_timeout(200)
    seconds = page.evaluate("window.megafleet.drawnAt") / 1000
    page.close()
    return round(seconds, 3)


def sse_clients(port: int, count: int) -> list[socket.socket]:
    request = (f"GET /api/v1/events/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Accept: text/event-stream\r\n\r\n").encode()
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(request)
        socks.append(s)
    held = []
    for s in socks:
        data = b""
        while b"megafleet events" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if b"megafleet events" in data:
            held.append(s)
        else:
            s.close()
    return held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10000, help="nodes of the drawn description")
    ap.add_argument("--guests", type=int, default=1000, help="container guests of the live testbed")
    ap.add_argument("--clients", type=int, default=1000, help="SSE clients")
    ap.add_argument("--window", type=float, default=30, help="seconds of server CPU measured")
    ap.add_argument("--kills", type=int, default=5, help="guests killed for event_to_screen_ms")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.guests, args.clients, args.window, args.kills = 2000, 20, 100, 5, 2
    if os.geteuid() != 0:
        sys.exit("bench/web.py: run as root (it brings a testbed up)")
    from playwright.sync_api import sync_playwright
    import httpx

    work = Path(tempfile.mkdtemp(prefix="mfwb-"))
    env = {**os.environ, "MEGAFLEET_STATE": str(work / "state"), "MEGAFLEET_RUN": str(work / "run")}
    result: dict[str, object] = {"bench": "web", "nodes": args.nodes, "guests": args.guests}
    big = work / "big.fleet"
    big_description(big, args.nodes)
    live = work / "live.fleet"
    live.write_text(f'image tiny from "{REPO}/examples/images/tiny.toml"\npool p 10.170.0.0/16 per /20\n'
                    f"switch lan\nvm g[1..{args.guests}] image tiny driver container mem 64M on lan\n")
    testbed = "mfwbench"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            # -- the 10,000-node description, drawn -------------------------------
            server = Server(env, "--preview", str(big))
            try:
                name = server.info and httpx.get(f"{server.base}/api/v1/testbeds").json()[0]["name"]
                t = time.monotonic()
                r = httpx.get(f"{server.base}/api/v1/nodes?testbed={name}", timeout=120)
                result["api_nodes_10k_cold_ms"] = round((time.monotonic() - t) * 1000, 1)
                result["api_nodes_count"] = len(r.json()["nodes"])
                warm = []
                for _ in range(5):
                    t = time.monotonic()
                    httpx.get(f"{server.base}/api/v1/nodes?testbed={name}", timeout=120).raise_for_status()
                    warm.append((time.monotonic() - t) * 1000)
                result["api_nodes_10k_ms"] = round(statistics.median(warm), 1)
                result["graph_10k_render_s"] = first_paint(browser, f"{server.base}/?testbed={name}")
                result["graph_10k_full_render_s"] = first_paint(browser, f"{server.base}/?testbed={name}&collapse=no")
            finally:
                server.stop()

            # -- a live testbed: SSE clients, server CPU, event to screen ------------
            r = megafleet("up", str(live), "-N", testbed, "--no-ksm", "--json", env=env)
            if not r.stdout.strip():
                raise SystemExit(f"bench/web.py: megafleet up failed:\n{r.stderr[-2000:]}")
            summary = json.loads(r.stdout)
            result["live_ready"] = summary["ready"]
            server = Server(env)
            try:
                held = sse_clients(server.port, args.clients)
                result["sse_clients"] = len(held)
                time.sleep(2)
                c0, t0 = server.cpu_s(), time.monotonic()
                time.sleep(args.window)
                result["server_cpu_cores"] = round((server.cpu_s() - c0) / (time.monotonic() - t0), 3)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(f"{server.base}/?testbed={testbed}")
                page.wait_for_function("window.megafleet && window.megafleet.drawnAt !== null", timeout=120000)
                # A guest fails: its process is killed (SIGKILL, as a crash would end it),
                # timed from that moment to its colour on the open page.
                listed = json.loads(megafleet("vm", "ls", "--json", "g*", env=env).stdout)
                pids = {v["name"]: v["pid"] for v in listed if v.get("pid")}
                delays = []
                for k in range(1, args.kills + 1):
                    guest = f"g{k}"
                    colour = f"window.megafleet.graph.getNodeAttribute('{guest}', 'color')"
                    t = time.monotonic()
                    os.kill(pids[guest], signal.SIGKILL)
                    page.wait_for_function(f"{colour} === '#d0312d'", timeout=30000, polling="raf")
                    delays.append((time.monotonic() - t) * 1000)
                result["event_to_screen_ms"] = round(statistics.median(delays), 1)
                result["event_to_screen_all_ms"] = [round(d, 1) for d in delays]
                result["poll_s"] = 1.0
                page.close()
                for s in held:
                    s.close()
            finally:
                server.stop()
        finally:
            browser.close()
            megafleet("down", testbed, env=env)
            shutil.rmtree(work, ignore_errors=True)
    result["targets_met"] = {
        "graph_10k_render_s<=3": result.get("graph_10k_render_s", 99) <= 3,
        "event_to_screen_ms<=2000": result.get("event_to_screen_ms", 1e9) <= 2000,
        "sse_clients>=1000": result.get("sse_clients", 0) >= 1000 or args.quick,
        "server_cpu_cores<0.3": result.get("server_cpu_cores", 9) < 0.3,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
