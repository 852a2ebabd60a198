"""A dual-stack testbed on this host, through the CLI as a user runs it: two
FRR routers (ospfd and ospf6d) between a namespace host and a container guest,
and a namespace host that ignores pings (its startup commands say so: an
assertion only a live check finds false).

- `up` checks the IPv4 and IPv6 `reachable` assertions live, reports the one
  that does not hold (the quiet host) with its file:line, and exits 1;
- `verify` exits 1 naming the failed assertions' file:line in text and --json;
  with the routers' link pulled, the IPv4 and IPv6 checks through it fail too,
  and pass again once it is plugged back;
- the fault schedule (`every` link settings, a `node ... restart`) runs after
  `up`, and again on its own by `megafleet run-schedule`: its events are in
  telemetry at their times (+- 1 s), the link has the setting and the guest is
  a process started at its restart;
- `down` leaves nothing.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from megafleet import proc
from tests.experiment.test_live import SLACK, _guest_pid, _is_schedule_of, min_rtt, nothing_left, ns_ping
from tests.up.conftest import REPO, TAG, megafleet, megafleet_json

pytestmark = pytest.mark.root

T = f"mfx{TAG}d"
FLEET = f"""\
image tiny from "{REPO}/examples/images/tiny.toml"
pool p4 10.63.0.0/16
pool p6 fd63::/48
switch lanA
switch lanB
router r1 on lanA ospf
router r2 on lanB ospf
link r1 -- r2
host a on lanA
host quiet on lanB exec "sysctl -q -w net.ipv4.icmp_echo_ignore_all=1" exec "sysctl -q -w net.ipv6.icmp.echo_ignore_all=1"
vm c1 image tiny driver container mem 64M on lanB
reachable a c1
reachable c1 a
reachable a quiet
every 1s for 3s from +3s link a -- lanA delay 5ms
at +4s node c1 restart
"""
# What the schedule does, in seconds from its start.
SCHEDULE = [(3.0, "link a -- lanA delay 5ms"), (4.0, "link a -- lanA delay 5ms"), (4.0, "node c1 restart"),
            (5.0, "link a -- lanA delay 5ms")]


def line_of(text: str) -> int:
    return FLEET.splitlines().index(text) + 1


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    """The testbed up (its summary, `up`'s exit status and the file), once the
    schedule `up` started in the background has ended."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, containers, FRR)")
    path = tmp_path_factory.mktemp("dual") / "dual.fleet"
    path.write_text(FLEET)
    r = megafleet("up", str(path), "-N", T, "--no-ksm", "--json", check=False, timeout=600)
    assert r.stdout.startswith("{"), f"up exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    summary = json.loads(r.stdout)
    try:
        pid = summary.get("schedule", {}).get("pid")
        deadline = time.monotonic() + 120
        while pid is not None and _is_schedule_of(str(pid), T):
            assert time.monotonic() < deadline, "the schedule up started did not end"
            time.sleep(0.2)
        yield {"summary": summary, "rc": r.returncode, "path": path}
    finally:
        megafleet("down", T, check=False)
        nothing_left(T)


def test_up_verifies_ipv4_and_ipv6_live_and_exits_1_naming_the_failed_assertion(dual):
    summary, path = dual["summary"], dual["path"]
    assert dual["rc"] == 1
    assert not summary["ok"] and summary["failed"] == [] and summary["ready"] == 1, summary
    v = summary["verify"]
    # a -> c1 and c1 -> a, each over IPv4 and IPv6, pass; a -> quiet cannot.
    assert v["checks"] == 6 and v["passed"] == 4 and v["converge_s"] is None, v
    loc = f"{path}:{line_of('reachable a quiet')}"
    assert sorted((f["loc"], f["src"], f["dst"], f["family"]) for f in v["failed"]) == \
        [(loc, "a", "quiet", 4), (loc, "a", "quiet", 6)]
    assert all(f["assertion"] == "reachable a quiet" for f in v["failed"])


def _verify(*args: str) -> tuple[int, dict]:
    r = megafleet("verify", T, "--json", *args, check=False)
    return r.returncode, json.loads(r.stdout)


def _failed_lines(v: dict) -> set[tuple[int, int]]:
    """(line, family) of every failed check."""
    return {(int(f["loc"].rsplit(":", 1)[1]), f["family"]) for f in v["failed"]}


def test_verify_exits_1_naming_file_and_line_and_follows_a_pulled_cable(dual):
    path = dual["path"]
    quiet, a_c1, c1_a = (line_of(f"reachable {x}") for x in ("a quiet", "a c1", "c1 a"))
    rc, v = _verify()
    assert rc == 1 and not v["ok"] and v["testbed"] == T
    assert _failed_lines(v) == {(quiet, 4), (quiet, 6)}
    text = megafleet("verify", T, check=False)
    assert text.returncode == 1
    assert f"{path}:{quiet}: reachable a quiet: a -> quiet (10.63." in text.stdout
    assert f"{path}:{quiet}: reachable a quiet: a -> quiet (fd63:" in text.stdout
    assert "2 of 6 reachability checks FAILED" in text.stdout

    # The only path between the routers pulled: both families fail both ways.
    megafleet("link", "down", "r1", "--", "r2")
    try:
        rc, v = _verify()
        assert rc == 1
        assert _failed_lines(v) == {(line, fam) for line in (quiet, a_c1, c1_a) for fam in (4, 6)}, v
        text = megafleet("verify", T, check=False)
        assert text.returncode == 1
        for line in (quiet, a_c1, c1_a):
            assert f"{path}:{line}: " in text.stdout
    finally:
        megafleet("link", "up", "r1", "--", "r2")
    deadline = time.monotonic() + 30
    while _failed_lines(v) != {(quiet, 4), (quiet, 6)}:
        assert time.monotonic() < deadline, f"not back within 30 s of the link's return: {v['failed']}"
        time.sleep(0.5)
        rc, v = _verify()
    assert rc == 1


def _c1_started() -> float:
    """The epoch time c1's process started (from /proc, to ~10 ms)."""
    pid = _guest_pid("c1")
    ticks = proc.start_time(pid) if pid is not None else None
    assert ticks is not None
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _fault_events(since: float) -> list[tuple[float, str]]:
    """(epoch time, message) of this testbed's fault events from `since` on
    that a schedule made (the other tests' `link` commands make some too)."""
    out = []
    for e in megafleet_json("telemetry", "events", "--kind", "fault", "--since", "10m"):
        when = datetime.fromisoformat(e["time"]).replace(tzinfo=timezone.utc).timestamp()
        if e.get("testbed") == T and e.get("source") == "schedule" and when >= since - 1:
            out.append((when, e["message"]))
    return sorted(out)


def _check_run(start: float, log: str) -> None:
    """The schedule that started at `start` did what it says, when it says
    (`log`: what its runner said, for the failure's message)."""
    events = _fault_events(start)
    assert sorted(m for _, m in events) == sorted(m for _, m in SCHEDULE), (events, log)
    for at, message in SCHEDULE:
        assert any(m == message and abs(when - (start + at)) <= 1.0 for when, m in events), \
            (at, message, start, events)
    # The effects: the link has the delay (a round trip crosses it twice) and
    # the guest is a process started by the restart at +4 s.
    shown = {r["link"]: r for r in megafleet_json("link", "show", T)}
    assert shown["a -- lanA"]["settings"] == {"delay_us": 5000} and shown["a -- lanA"]["changed"]
    assert _c1_started() >= start + 4 - 0.2
    c1 = [f for f in dual_addresses() if f[0] == 4][0][1]
    r = ns_ping(T, "a", c1, count=3, wait=2)
    assert r.returncode == 0 and min_rtt(r.stdout) >= 10 * SLACK, r.stdout


def dual_addresses() -> list[tuple[int, str]]:
    """c1's (family, address) pairs, as the guest itself has them on eth0."""
    r = json.loads(megafleet("exec", "c1", "-t", T, "--json", "--", "ip", "-o", "addr", "show", "eth0",
                             "scope", "global").stdout)
    out = []
    for line in r["nodes"][0]["stdout"].splitlines():
        words = line.split()
        out.append((4 if words[2] == "inet" else 6, words[3].split("/")[0]))
    return sorted(out)


def test_schedule_with_every_and_node_restart_after_up_and_by_run_schedule(dual):
    sch = dual["summary"]["schedule"]
    assert sch["steps"] == 4 and sch["span_s"] == 5.0
    _check_run(sch["start"], Path(sch["log"]).read_text())
    addrs = dual_addresses()
    megafleet("link", "set", "a", "--", "lanA", "--clear")

    # `megafleet run-schedule` on its own, from a start a little ahead (its
    # offsets count from there).
    start = time.time() + 2
    r = megafleet("run-schedule", T, "--start", f"{start:.3f}", "--json", check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    log = json.loads(r.stdout)
    assert sorted((e["at_s"], e["action"]) for e in log) == sorted(SCHEDULE)
    assert all("error" not in e and e["done"] for e in log), log
    every, node = line_of("every 1s for 3s from +3s link a -- lanA delay 5ms"), line_of("at +4s node c1 restart")
    assert {e["loc"].rsplit(":", 1)[1] for e in log} == {str(every), str(node)}
    for e in log:
        assert abs(e["time_ms"] / 1000 - (start + e["at_s"])) <= 1.0, e
    _check_run(start, r.stderr)
    assert dual_addresses() == addrs          # restarted twice, the same addresses
    megafleet("link", "set", "a", "--", "lanA", "--clear")
    deadline = time.monotonic() + 20
    while (v := _verify()[1])["passed"] != 4:
        assert time.monotonic() < deadline, v
        time.sleep(0.5)
