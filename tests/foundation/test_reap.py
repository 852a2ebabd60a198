"""megafleet.proc.reap: a detached daemon re-parented to a child subreaper (as
the vm engine makes its caller) is reaped when megafleet stops it, so no
zombie piles up under a long-lived process; live processes and others'
children are never touched."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, os, signal, time
from megafleet import proc
from megafleet.vm.driver import become_subreaper

def zombies():
    out = []
    for pid in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if state == "Z" and int(ppid) == os.getpid():
            out.append(int(pid))
    return out

become_subreaper()
# Two daemons that detach as FRR's `-d` does: the launcher exits, they stay,
# and come to us (the subreaper).
pids = [int(proc.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout) for _ in range(3)]
rps = [proc.RecordedProcess.of(p) for p in pids]
ours = all(int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid() for p in pids)
live_refused = not rps[0].reap()
rps[0].stop(grace=2)                          # stop() reaps
os.kill(pids[1], signal.SIGKILL)              # killed elsewhere (its cgroup): reap() collects it
while rps[1].alive():
    time.sleep(0.01)
before = zombies()
reaped = rps[1].reap()
os.kill(pids[2], signal.SIGKILL)              # unrecorded pid reuse guard: another start time
while rps[2].alive():
    time.sleep(0.01)
wrong_start = not proc.RecordedProcess(pids[2], rps[2].start + 1).reap()
proc.reap(pids[2])
print(json.dumps({"ours": ours, "live_refused": live_refused, "before": before, "reaped": reaped,
                  "wrong_start": wrong_start, "left": zombies(),
                  "not_child": proc.reap(1), "gone": proc.reap(pids[0])}))
"""


def test_detached_daemons_stopped_leave_no_zombie():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["ours"], "the detached daemons were not re-parented to the subreaper"
    assert r["live_refused"]
    assert len(r["before"]) == 1 and r["reaped"]      # a zombie until reaped, then gone
    assert r["wrong_start"]
    assert r["left"] == []
    assert r["not_child"] is False and r["gone"] is False


REAPER = r"""
import json, os, signal, subprocess, sys, time
from megafleet import proc
proc.start_orphan_reaper(0.2)           # before become_subreaper's default: fast looks
from megafleet.vm.driver import become_subreaper
become_subreaper()

# What a finished child left running comes to us (as a finished `up`'s
# daemons come to a test run); another process kills them, as `down` would.
pids = [int(proc.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout) for _ in range(4)]
subprocess.run(["kill", "-9", *map(str, pids)], check=True)
# A child whose Popen waits for it later: its status must stay its own.
late = subprocess.Popen(["sh", "-c", "exit 3"])
time.sleep(2.0)
left = sorted(p for p, _ in proc.zombie_children())
print(json.dumps({"left": left, "late_pid": late.pid, "late": late.wait(),
                  "run": proc.run(["sh", "-c", "exit 5"], check=False).returncode,
                  "after": sorted(p for p, _ in proc.zombie_children())}))
"""


def test_orphan_reaper_reaps_what_nobody_waits_for_and_only_that():
    out = subprocess.run([sys.executable, "-c", REAPER], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    # The killed orphans are reaped; the child whose Popen waits stays for it.
    assert r["left"] == [r["late_pid"]], r
    assert r["late"] == 3 and r["run"] == 5 and r["after"] == [], r
