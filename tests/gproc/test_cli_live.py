"""The gproc command line, run as a user would (a real process, real SSH)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.gproc.conftest import wait_no_agents

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(240)]


def megafleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafleet", *args], capture_output=True, text=True,
                          timeout=120)


def test_hosts_ls_and_check(testfleet):
    inv = str(testfleet.inventory_path)
    ls = megafleet("hosts", "ls", "-i", inv, "--json")
    assert ls.returncode == 0, ls.stderr
    assert [h["name"] for h in json.loads(ls.stdout)["hosts"]] == [h.name for h in testfleet.inventory.hosts]
    names = ",".join(h.name for h in testfleet.inventory.hosts[:5])
    check = megafleet("hosts", "check", "-i", inv, "-w", names, "-f", "2")
    assert check.returncode == 0, check.stderr
    lines = check.stdout.splitlines()
    assert lines[0].split() == ["HOSTS", "STATUS", "DETAIL"]
    assert lines[1].split() == [f"{testfleet.prefix}h[0-4]", "ok", "answered"]      # folded
    assert "tree up in" in check.stderr and "5 ok, 0 failed, 0 unreachable" in check.stderr
    each = megafleet("hosts", "check", "-i", inv, "-w", names, "-f", "2", "--each")
    assert [line.split()[:2] for line in each.stdout.splitlines()[1:]] == [[n, "ok"] for n in names.split(",")]
    # Two hosts whose sshd is not where the inventory says: folded as clubak does.
    from megafleet.gproc import inventory

    hosts = list(testfleet.inventory.hosts[:6])
    hosts[1] = inventory.Host(hosts[1].name, hosts[1].address, 1, hosts[1].user, (), 0, hosts[1].agent)
    hosts[2] = inventory.Host(hosts[2].name, hosts[2].address, 1, hosts[2].user, (), 0, hosts[2].agent)
    broken = testfleet.workdir / "broken.toml"
    broken.write_text(inventory.render(hosts, identity=testfleet.inventory.identity,
                                       known_hosts=testfleet.inventory.known_hosts))
    check = megafleet("hosts", "check", "-i", str(broken), "-f", "2")
    assert check.returncode == 1
    rows = [line.split(None, 2) for line in check.stdout.splitlines()[1:]]
    p = testfleet.prefix
    assert rows == [[f"{p}h[0,3-5]", "ok", "answered"], [f"{p}h[1-2]", "unreachable", "connection refused"]]
    # An image the hosts' cache lacks (an empty cache directory), folded too.
    from megafleet.imagegen import store

    try:
        image = store.find("tiny")
    except store.ImageNotFound:
        image = None
    if image is not None:
        empty = testfleet.workdir / "empty-cache"
        empty.mkdir(exist_ok=True)
        check = megafleet("hosts", "check", "-i", inv, "-w", names, "--image", "tiny", "--cache-dir", str(empty))
        assert check.returncode == 1
        assert check.stdout.splitlines()[1].split(None, 2) == [f"{p}h[0-4]", "image",
                                                                f"missing tiny ({image.hash[:12]})"]
    assert wait_no_agents(testfleet) == {}


def test_gproc_exec_streams_gathers_and_reports_failures(testfleet, tmp_path):
    inv = str(testfleet.inventory_path)
    names = [h.name for h in testfleet.inventory.hosts[:6]]
    w = ",".join(names)
    tagged = megafleet("gproc", "exec", "-i", inv, "-w", w, "-f", "2", "-q", "--", "ip", "netns", "identify")
    assert tagged.returncode == 0, tagged.stderr
    assert sorted(tagged.stdout.splitlines()) == sorted(f"{n}: {n}" for n in names)
    gathered = megafleet("gproc", "exec", "-i", inv, "-w", w, "-b", "-q", "--", "echo", "same")
    assert gathered.returncode == 0
    assert gathered.stdout.splitlines()[1] == testfleet.prefix + "h[0-5]"
    failing = megafleet("gproc", "exec", "-i", inv, "-w", w, "--json", "--shell", "--",
                        "test $(ip netns identify) != " + names[2])
    assert failing.returncode == 1
    result = json.loads(failing.stdout)
    assert result["counts"] == {"ok": 5, "failed": 1, "unreachable": 0}
    assert result["hosts"][names[2]]["rc"] == 1
    src = tmp_path / "payload"
    src.write_bytes(b"x" * 100_000)
    for n in names:
        (tmp_path / n).mkdir()
    push = megafleet("gproc", "push", "-i", inv, "-w", w, "--json", str(src), str(tmp_path / "{host}" / "p"))
    assert push.returncode == 0, push.stderr
    assert json.loads(push.stdout)["counts"]["ok"] == 6
    assert all((tmp_path / n / "p").read_bytes() == src.read_bytes() for n in names)
    bad = megafleet("gproc", "push", "-i", inv, "-w", w, str(src), "relative/path")
    assert bad.returncode == 1 and "normalised absolute path" in bad.stderr
    assert wait_no_agents(testfleet) == {}


def test_bad_inventory_is_a_clear_error(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text('[[host]]\nname = "a"\naddress = "10.0.0.1"\nport = 99999\n')
    r = megafleet("hosts", "ls", "-i", str(path))
    assert r.returncode == 1
    assert f"{path}: host[0] (a).port: expected an integer 1-65535, got 99999" in r.stderr
