"""`megafleet up` on the local machine (no inventory: controller and host in one
process): a small testbed with namespace hosts, a router and container guests,
one of which cannot boot. It is retried, then reported; the rest is up; status,
exec and down work without the description; nothing is left behind."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import REPO, TAG, links_in, megafleet, megafleet_json, netns_with

TESTBED = f"mfl{TAG}"

FLEET = f"""
image tiny from "{REPO}/examples/images/tiny.toml"
image panic from "{REPO}/tests/vm/images/panic.toml"
pool p 10.150.0.0/16
switch lanA
switch lanB
router gw {{
  iface lanA auto
  iface lanB auto
}}
host pc[1..2] on lanA
vm web[1..2] image tiny driver container mem 64M on lanB
vm broken image panic driver container mem 64M on lanB
"""


@pytest.fixture
def fleet_file(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, bridges, containers)")
    path = tmp_path / "local.fleet"
    path.write_text(FLEET)
    return path


def test_local_up_status_exec_down(fleet_file):
    plan = megafleet_json("plan", str(fleet_file), "-N", TESTBED)
    assert [h["host"] for h in plan["hosts"]] == ["local"] and plan["spanning"] == []
    try:
        r = megafleet("up", str(fleet_file), "-N", TESTBED, "--no-ksm", "--boot-timeout", "20",
                      "--retries", "1", "--json", check=False)
        assert r.returncode == 1, r.stderr            # one guest failed: exit status 1
        summary = json.loads(r.stdout)
        assert summary["guests"] == 3 and summary["ready"] == 2
        (failed,) = summary["failed"]
        assert failed["node"] == "broken" and failed["reason"]
        assert "vm" in summary["phases"] or "host_vm" in summary["phases"]
        # Progress went to stderr, per phase and host.
        assert "net      local:" in r.stderr and "vm       local:" in r.stderr

        status = megafleet_json("status", TESTBED)
        (bed,) = status["hosts"]["local"]["value"]["testbeds"]
        assert bed["nodes"] == {"up": 3, "running": 2, "failed": 1}
        assert [f["node"] for f in bed["failures"]] == ["broken"]
        text = megafleet("status").stdout
        assert TESTBED in text and "broken" in text

        # A guest pings a namespace host on the other LAN, through the router.
        pc1 = subprocess.run(["ip", "-n", f"{TESTBED}-pc1", "-o", "-4", "addr", "show", "eth0"],
                             capture_output=True, text=True, check=True).stdout.split()[3].split("/")[0]
        r = megafleet("exec", "web*", "--", "ping", "-c", "1", "-W", "3", pc1, check=False)
        assert r.returncode == 0 and r.stdout.count("1 packets received") == 2, r.stdout + r.stderr
        hostname = json.loads(megafleet("exec", "--json", "web1", "--", "hostname").stdout)
        assert hostname["nodes"][0]["stdout"].strip() == "web1"
    finally:
        down = megafleet_json("down", TESTBED, check=False)
    assert down["ok"], down
    assert netns_with(TESTBED + "-") == []
    assert links_in(None, TESTBED) == []
    # Idempotent: nothing is left to do.
    again = megafleet_json("down", TESTBED)
    assert again["ok"] and not again["results"][TESTBED]["local"]["value"]["testbeds"]


def test_down_after_up_was_killed_midway(tmp_path):
    """`megafleet up` killed (SIGKILL) while guests boot: `down`, from the ledger
    alone, removes the guests already started, the router and the network."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, bridges, containers)")
    import signal
    import sys
    import time

    name = f"mfk{TAG}"
    path = tmp_path / "crash.fleet"
    path.write_text(FLEET.replace("vm broken image panic driver container mem 64M on lanB\n", "")
                         .replace("web[1..2]", "web[1..40]"))
    child = subprocess.Popen([sys.executable, "-m", "megafleet", "up", str(path), "-N", name, "--no-ksm"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # Wait until guests are booting (the vm phase has started), then kill.
        deadline = time.monotonic() + 120
        for line in child.stdout:
            if "vm       local:" in line and "guests (" in line or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL          # killed, not finished
    assert netns_with(name + "-") != []            # something was left running
    down = megafleet_json("down", name)
    assert down["ok"], down
    assert netns_with(name + "-") == []
    assert links_in(None, name) == []
    from megafleet.vm.engine import Engine
    assert [g.name for g in Engine().list("web*")] == []


def test_up_refuses_a_testbed_name_that_another_file_holds(tmp_path):
    """Issue 13: a testbed belongs to the description file it was built from
    (its absolute path). `up b.fleet -N X` over `up a.fleet -N X` is refused,
    naming a.fleet and `megafleet down X`; the running testbed (namespaces,
    interfaces, addresses, the records) is untouched; `net up b.fleet` is
    refused the same way. The same file by another path is the same testbed:
    `up` again changes nothing. `down` then leaves nothing."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, bridges)")
    name = f"mfo{TAG}"
    a, b = tmp_path / "a.fleet", tmp_path / "b.fleet"
    a.write_text("pool p 10.154.0.0/16\nswitch s\nhost a[1..2] on s\nreachable a1 a2\n")
    b.write_text("pool p 10.155.0.0/16\nswitch s\nhost b[1..2] on s\n")
    held = str(a.resolve())

    def running() -> dict:
        spaces = {n: os.stat(f"/run/netns/{n}").st_ino for n in netns_with(name + "-")}
        addrs = {n: subprocess.run(["ip", "-n", n, "-o", "addr", "show", "eth0"], capture_output=True,
                                   text=True, check=True).stdout.split()[3] for n in spaces}
        (bed,) = megafleet_json("status", name)["hosts"]["local"]["value"]["testbeds"]
        return {"netns": spaces, "addrs": addrs, "links": sorted(links_in(None, name)),
                "source": bed["source"], "nodes": bed["nodes"]}

    try:
        assert megafleet_json("up", str(a), "-N", name, "--no-ksm")["ok"]
        before = running()
        assert sorted(before["netns"]) == [f"{name}-a1", f"{name}-a2"] and before["source"] == held

        r = megafleet("up", str(b), "-N", name, "--no-ksm", check=False)
        assert r.returncode == 1, r.stdout + r.stderr
        assert (f"testbed {name!r} is already up from another description ({held}); nothing was changed: "
                f"'megafleet down {name}' removes it first, or choose another name with -N") in r.stderr
        assert "Traceback" not in r.stderr
        assert running() == before
        from megafleet.up import deployments
        assert deployments()[name]["source"] == held            # the controller's record too

        r = megafleet("net", "up", str(b), "-N", name, check=False)
        assert r.returncode != 0 and f"different description ({held})" in r.stdout + r.stderr
        assert running() == before

        # The same file spelled another way (relative to the CLI's directory).
        again = megafleet_json("up", os.path.relpath(a, REPO), "-N", name, "--no-ksm")
        assert again["ok"] and running() == before
    finally:
        down = megafleet_json("down", name, check=False)
    assert down["ok"], down
    assert netns_with(name + "-") == [] and links_in(None, name) == []
    assert name not in deployments()


def test_ksm_daemon_runs_with_the_testbed_and_restores_knobs(tmp_path):
    if os.geteuid() != 0 or not os.access("/sys/kernel/mm/ksm/run", os.W_OK):
        pytest.skip("needs root and a writable /sys/kernel/mm/ksm")
    from megafleet.ksm.sysfs import KsmSysfs

    knobs = ("run", "pages_to_scan", "sleep_millisecs")
    before = {k: KsmSysfs().read_one(k) for k in knobs}
    name = f"mfq{TAG}"
    path = tmp_path / "ksm.fleet"
    path.write_text("pool p 10.152.0.0/16\nswitch s\nhost a[1..2] on s\n")
    try:
        megafleet("up", str(path), "-N", name, "--ksm")
        status = megafleet_json("status", name)["hosts"]["local"]["value"]
        assert [b["testbed"] for b in status["testbeds"]] == [name]
        assert status["ksm"]["daemon"] == "running" and "saved_mb" in status["ksm"]
    finally:
        down = megafleet_json("down", name, check=False)
    assert down["ok"] and down["results"][name]["local"]["value"]["testbeds"][name]["processes"] >= 2
    assert {k: KsmSysfs().read_one(k) for k in knobs} == before
    assert megafleet_json("status")["hosts"]["local"]["value"]["ksm"]["daemon"] == "stopped"


def test_up_with_ksm_and_telemetry_in_a_mongodb_server(tmp_path, ferretdb):
    """The main job with every part on: container and QEMU guests; the KSM daemon
    runs before the guests and hears the vm engine announce their boot; the
    collector writes to a real MongoDB-protocol server (FerretDB), and the
    telemetry queries answer from it; `exec` reaches into both kinds of guest."""
    if os.geteuid() != 0 or not os.access("/sys/kernel/mm/ksm/run", os.W_OK):
        pytest.skip("needs root and a writable /sys/kernel/mm/ksm")
    import time

    from megafleet import paths
    from megafleet.ksm.sysfs import KsmSysfs

    knobs = ("run", "pages_to_scan", "sleep_millisecs")
    before = {k: KsmSysfs().read_one(k) for k in knobs}
    name = f"mfm{TAG}"
    uri = ferretdb.uri
    path = tmp_path / "observed.fleet"
    path.write_text(f'image tiny from "{REPO}/examples/images/tiny.toml"\n'
                    "pool p 10.153.0.0/16\nswitch s\nhost h1 on s\n"
                    "vm g[1..2] image tiny driver container mem 64M on s\n"
                    "vm q1 image tiny driver qemu mem 128M on s\n")
    try:
        up = megafleet_json("up", str(path), "-N", name, "--ksm", "--telemetry", uri,
                            "--telemetry-interval", "1")
        assert up["ok"] and up["ready"] == 3, up
        ksm_log = paths.state_dir() / "up" / f"{name}.ksm.log"
        deadline = time.monotonic() + 30
        rows: list = []
        while time.monotonic() < deadline:
            r = megafleet("telemetry", "--telemetry", uri, "status", "--json", check=False)
            rows = json.loads(r.stdout) if r.returncode == 0 else [r.stderr]
            if rows == [{"host": "local", "state": "running", "guests": 3}] and "boot of 3" in ksm_log.read_text():
                break
            time.sleep(1)
        assert rows == [{"host": "local", "state": "running", "guests": 3}]
        assert "boot of 3" in ksm_log.read_text()
        (boots,) = megafleet_json("telemetry", "--telemetry", uri, "boot-times", "--since", "all")
        assert (boots["host"], boots["image"], boots["boots"], boots["failures"]) == ("local", "tiny", 3, 0)
        # exec: nsenter into the container, the exec channel into the QEMU guest.
        ran = json.loads(megafleet("exec", "--json", "-t", name, "[gq]1", "--",
                                   "sh", "-c", 'hostname; echo "$1"', "sh", "a  b").stdout)
        assert [(n["node"], n["rc"], n["stdout"]) for n in ran["nodes"]] == [
            ("g1", 0, "g1\na  b\n"), ("q1", 0, "q1\na  b\n")], ran
    finally:
        down = megafleet_json("down", name, check=False)
    assert down["ok"], down
    assert netns_with(name + "-") == [] and links_in(None, name) == []
    assert {k: KsmSysfs().read_one(k) for k in knobs} == before
