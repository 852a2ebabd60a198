"""Startup commands live (root): a containerlab lab whose nodes have `exec`,
brought up with `megafleet net up` straight from the .clab.yml. The commands'
effects are visible inside the namespaces, a long-lived one is recorded and
stopped by `net down`, a failing one stops `net up` naming node, command and
line, and nothing is left behind."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from megafleet import proc
from megafleet.cli import root
from megafleet.ledger import Ledger
from megafleet.netlang import live, nsexec
from megafleet.netlang.importers import convert

from .test_live import clean, leftovers

pytestmark = pytest.mark.root

LAB = """\
name: ex
topology:
  nodes:
    r1:
      kind: frr
      exec:
        - ip addr add 192.0.2.1/32 dev lo
    h1:
      kind: linux
      exec:
        - ip addr add 192.0.2.11/32 dev lo
        - sh -c "echo started > /dev/null"
        - sleep 300
  links:
    - endpoints: ["r1:eth1", "h1:eth1"]
"""


@pytest.fixture(autouse=True)
def _root(root_only):
    pass


def lo_addrs(ns: str) -> str:
    return proc.run(["ip", "-n", ns, "-o", "addr", "show", "dev", "lo"]).stdout


def exec_records(name: str) -> list:
    return [r for r in Ledger().list(live.OWNER, "process") if r.key.startswith(f"{name}/exec/")]


def test_clab_exec_runs_in_the_namespaces_after_net_up_and_down_removes_everything(tmp_path, monkeypatch):
    name = "mfnex1"
    lab = tmp_path / "ex.clab.yml"
    lab.write_text(LAB)
    # `sleep 300` is the long-lived one: waited for 1 s, then left running.
    monkeypatch.setenv(nsexec.WAIT_ENV, "1")
    runner = CliRunner()
    try:
        r = runner.invoke(root, ["net", "up", str(lab), "-N", name])
        assert r.exit_code == 0, r.output
        assert "ran 3 startup commands, 1 left running" in r.output, r.output
        assert "192.0.2.1/32" in lo_addrs(f"{name}-r1")
        assert "192.0.2.11/32" in lo_addrs(f"{name}-h1")
        # The long-lived command: recorded with pid and start time, in h1's namespace.
        (rec,) = exec_records(name)
        assert rec.data["node"] == "h1" and rec.data["argv"] == ["sleep", "300"]
        sleeper = proc.RecordedProcess(rec.data["pid"], rec.data["start"])
        assert sleeper.alive()
        assert os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == os.stat(f"/run/netns/{name}-h1").st_ino
        log = nsexec.log_dir(name) / "h1.log"
        assert "$ ip addr add 192.0.2.11/32 dev lo\n" in log.read_text()
        # Up again from the same lab: nothing changes, no command runs twice.
        r = runner.invoke(root, ["net", "up", str(lab), "-N", name])
        assert r.exit_code == 0 and "nothing changed" in r.output, r.output
        assert sleeper.alive() and len(exec_records(name)) == 1
    finally:
        r = runner.invoke(root, ["net", "down", name])
    assert r.exit_code == 0, r.output
    assert not sleeper.alive()
    assert not nsexec.log_dir(name).exists()
    assert leftovers(name) == clean(name)


def test_a_failing_command_stops_net_up_naming_node_command_and_line(tmp_path):
    name = "mfnex2"
    lab = tmp_path / "bad.clab.yml"
    lab.write_text(LAB.replace("- sleep 300", "- ip route add 203.0.113.0/24 via 198.51.100.1"))
    text = convert([lab]).text
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "203.0.113.0/24" in t)
    runner = CliRunner()
    try:
        r = runner.invoke(root, ["net", "up", str(lab), "-N", name])
        assert r.exit_code != 0
        assert re.search(rf"{re.escape(str(lab))}\.fleet:{line}: node h1: startup command "
                         rf"'ip route add 203.0.113.0/24 via 198.51.100.1' exited \d+: .+", r.output), r.output
        # The commands before it ran; nothing of it is left recorded.
        assert "192.0.2.11/32" in lo_addrs(f"{name}-h1")
        assert exec_records(name) == []
    finally:
        r = runner.invoke(root, ["net", "down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)


def test_a_command_that_cannot_be_started_is_reported(tmp_path):
    name = "mfnex3"
    fleet = tmp_path / "nx.fleet"
    fleet.write_text('switch lan\nhost a on lan\nhost b on lan {\n  exec "/nonexistent/mfnex-tool --flag"\n}\n')
    runner = CliRunner()
    try:
        r = runner.invoke(root, ["net", "up", str(fleet), "-N", name])
        assert r.exit_code != 0
        assert re.search(rf"{re.escape(str(fleet))}:4: node b: startup command "
                         rf"'/nonexistent/mfnex-tool --flag' exited \d+", r.output), r.output
    finally:
        r = runner.invoke(root, ["net", "down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)
    assert Path(live.run_base(name)).exists() is False


def test_megafleet_up_runs_the_commands_on_its_host(tmp_path):
    """`megafleet up` builds each host's share of the plan (manifest.split, the
    host side's apply): the startup commands travel with it."""
    name = "mfnex4"
    fleet = tmp_path / "ex.fleet"
    fleet.write_text('pool p 10.9.0.0/16\nswitch lan\nhost a on lan exec "ip addr add 192.0.2.31/32 dev lo"\nhost b on lan\n'
                     "reachable a b\n")
    runner = CliRunner()
    try:
        r = runner.invoke(root, ["up", str(fleet), "-N", name])
        assert r.exit_code == 0, r.output
        assert "192.0.2.31/32" in lo_addrs(f"{name}-a")
    finally:
        r = runner.invoke(root, ["down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)


def test_an_edited_description_runs_only_the_commands_it_adds(tmp_path):
    """`megafleet up` of an edited file changes the running testbed in place
    (experiment.reconcile): a command added to a node runs there; the one it
    already had does not run again (it would fail: the address exists)."""
    name = "mfnex6"
    fleet = tmp_path / "ed.fleet"
    first = ('pool p 10.9.0.0/16\nswitch lan\nhost a on lan exec "ip addr add 192.0.2.51/32 dev lo"\n'
             "host b on lan\nreachable a b\n")
    runner = CliRunner()
    try:
        fleet.write_text(first)
        r = runner.invoke(root, ["up", str(fleet), "-N", name])
        assert r.exit_code == 0, r.output
        inode = os.stat(f"/run/netns/{name}-a").st_ino
        fleet.write_text(first.replace('192.0.2.51/32 dev lo"', '192.0.2.51/32 dev lo" exec "ip addr add '
                                       '192.0.2.52/32 dev lo"'))
        r = runner.invoke(root, ["up", str(fleet), "-N", name])
        assert r.exit_code == 0, r.output
        addrs = lo_addrs(f"{name}-a")
        assert "192.0.2.51/32" in addrs and "192.0.2.52/32" in addrs
        assert os.stat(f"/run/netns/{name}-a").st_ino == inode
    finally:
        r = runner.invoke(root, ["down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)


def test_a_daemon_a_command_leaves_behind_is_stopped_by_down(tmp_path):
    name = "mfnex7"
    pidfile = tmp_path / "daemon.pid"
    fleet = tmp_path / "d.fleet"
    fleet.write_text(f"switch lan\nhost a on lan exec \"sh -c 'sleep 301 & echo $! > {pidfile}'\"\n")
    runner = CliRunner()
    try:
        r = runner.invoke(root, ["net", "up", str(fleet), "-N", name])
        assert r.exit_code == 0, r.output
        daemon = proc.RecordedProcess.of(int(pidfile.read_text()))
        assert os.stat(f"/proc/{daemon.pid}/ns/net").st_ino == os.stat(f"/run/netns/{name}-a").st_ino
        assert exec_records(name) == []        # sh exited 0: done
    finally:
        r = runner.invoke(root, ["net", "down", name])
    assert r.exit_code == 0, r.output
    assert not daemon.alive()
    assert leftovers(name) == clean(name)


def test_a_failing_command_under_megafleet_up_names_the_statements_line(tmp_path):
    """`megafleet up` applies each host's manifest (host.apply), which has the
    plan but not the description: the manifest carries each node's exec
    file:line, so the failure names it as `net up` does. The same for a command
    a reconciling `up` of an edited file adds."""
    name = "mfnex8"
    fleet = tmp_path / "f.fleet"
    fleet.write_text('pool p 10.9.0.0/16\nswitch lan\nhost a on lan {\n  exec "ip addr add 192.0.2.61/32 dev lo"\n'
                     '  exec "ip route add 203.0.113.0/24 via 198.51.100.1"\n}\nhost b on lan\n')
    runner = CliRunner()
    try:
        r = runner.invoke(root, ["up", str(fleet), "-N", name, "--no-ksm", "--no-verify"])
        assert r.exit_code != 0
        assert re.search(rf"{re.escape(str(fleet))}:5: node a: startup command "
                         rf"'ip route add 203.0.113.0/24 via 198.51.100.1' exited \d+", r.output), r.output
        assert "192.0.2.61/32" in lo_addrs(f"{name}-a")      # the command before it ran
    finally:
        r = runner.invoke(root, ["down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)

    first = 'pool p 10.9.0.0/16\nswitch lan\nhost a on lan\nhost b on lan\n'
    try:
        fleet.write_text(first)
        r = runner.invoke(root, ["up", str(fleet), "-N", name, "--no-ksm", "--no-verify"])
        assert r.exit_code == 0, r.output
        fleet.write_text(first + 'host c on lan {\n  exec "/nonexistent/mfnex-tool"\n}\n')
        r = runner.invoke(root, ["up", str(fleet), "-N", name, "--no-ksm", "--no-verify"])
        assert r.exit_code != 0
        assert re.search(rf"{re.escape(str(fleet))}:6: node c: startup command '/nonexistent/mfnex-tool' "
                         rf"exited \d+", r.output), r.output
    finally:
        r = runner.invoke(root, ["down", name])
    assert r.exit_code == 0, r.output
    assert leftovers(name) == clean(name)
