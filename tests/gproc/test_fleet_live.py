"""gproc against a real fleet: 20 network namespaces, each with its own sshd,
reached over real SSH; the agents are real `megafleet agent` processes."""

from __future__ import annotations

import hashlib
import json
import os
import signal

import pytest
import trio

from megafleet.gproc import Fleet, inventory
from tests.gproc.conftest import wait_no_agents

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(240)]


def test_exec_on_20_hosts_tagged_and_gathered(testfleet):
    inv = testfleet.inventory
    streamed = []

    async def main():
        async with Fleet.connect(inv, fanout=4) as fleet:
            assert {s.state for s in fleet.status.values()} == {"up"}
            assert len(fleet.status) == 20
            # Each host prints its own name (the namespace name): output is tagged.
            report = await fleet.exec(["ip", "netns", "identify"],
                                      on_output=lambda h, fd, data: streamed.append((h, fd, data)))
            same = await fleet.exec(["echo", "same words"])
            failing = await fleet.exec(["sh", "-c", "exit 3"], hosts=[inv.hosts[2].name, inv.hosts[3].name])
            no_shell = await fleet.exec(["echo", "$HOME;", "`id`"], hosts=[inv.hosts[0].name])
            shell = await fleet.exec("echo $((6*7))", shell=True, hosts=[inv.hosts[0].name])
            return report, same, failing, no_shell, shell

    report, same, failing, no_shell, shell = trio.run(main)
    assert report.ok and len(report.results) == 20
    for name, r in report.results.items():
        assert r.rc == 0 and r.stdout.decode().strip() == name
    assert {h for h, fd, _ in streamed} == {h.name for h in inv.hosts}
    assert all(fd == 1 for _, fd, _ in streamed)
    # clush -b style: identical output folded into one group listing all hosts.
    assert same.gathered() == [([h.name for h in inv.hosts], "same words\n")]
    assert [r.rc for r in failing.results.values()] == [3, 3]
    assert all(r.status == "failed" and r.error == "exited 3" for r in failing.results.values())
    assert no_shell.results[inv.hosts[0].name].stdout == b"$HOME; `id`\n"
    assert shell.results[inv.hosts[0].name].stdout == b"42\n"
    assert wait_no_agents(testfleet) == {}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _blob_and_dest(inv, tmp_path) -> tuple:
    """A 20 MB random file, a directory per host, and the push destination
    template that puts the file in its host's directory."""
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(20 << 20))
    for h in inv.hosts:
        (tmp_path / h.name).mkdir()
    return src, str(tmp_path / "{host}" / "blob.bin")


def test_push_20mb_to_20_hosts_then_skip(testfleet, tmp_path):
    inv = testfleet.inventory
    src, dest = _blob_and_dest(inv, tmp_path)

    async def main():
        async with Fleet.connect(inv, fanout=4) as fleet:
            first = await fleet.push(str(src), dest)
            second = await fleet.push(str(src), dest)
            return first, second

    first, second = trio.run(main)
    assert first.ok, first.to_json()["counts"]
    assert not any(r.skipped for r in first.results.values())
    want = _sha(src)
    for h in inv.hosts:
        assert _sha(tmp_path / h.name / "blob.bin") == want
        assert os.listdir(tmp_path / h.name) == ["blob.bin"]      # no temporary file left
    assert second.ok and all(r.skipped for r in second.results.values())
    assert wait_no_agents(testfleet) == {}


def test_inner_agent_killed_mid_push_children_reattached(testfleet, tmp_path):
    inv = testfleet.inventory
    src, dest = _blob_and_dest(inv, tmp_path)
    names = [h.name for h in inv.hosts]
    # fanout 4 over 20 hosts: heads are hosts 0..3; host 1's children are 8..11.
    victim, orphans = names[1], names[8:12]

    async def main():
        async with Fleet.connect(inv, fanout=4) as fleet:
            assert [st["host"]["name"] for st in fleet.layout] == names[:4]
            pid = testfleet.agent_pid(1)
            assert pid is not None

            async def kill_when_receiving():
                # The victim is receiving (its temporary file exists): kill its agent.
                while not any(".mfpush." in f for f in os.listdir(tmp_path / victim)):
                    await trio.sleep(0.01)
                os.kill(pid, signal.SIGKILL)

            async with trio.open_nursery() as n:
                n.start_soon(kill_when_receiving)
                report = await fleet.push(str(src), dest)
                n.cancel_scope.cancel()
            after = await fleet.exec(["true"])
            return report, fleet.reattachments, after, dict(fleet.status)

    report, reattachments, after, status = trio.run(main)
    counts = report.counts()
    assert counts == {"ok": 19, "failed": 1, "unreachable": 0}, report.to_json()
    assert report.results[victim].status == "failed"
    assert f"agent on {victim} lost" in report.results[victim].error
    want = _sha(src)
    for name in names:
        if name != victim:
            assert _sha(tmp_path / name / "blob.bin") == want
    assert not (tmp_path / victim / "blob.bin").exists()     # atomic: no partial file
    # The orphans were re-attached directly below the root and got the file from it.
    assert len(reattachments) == 1 and reattachments[0]["lost"] == victim
    assert sorted(reattachments[0]["up"]) == sorted(orphans)
    assert status[victim].state == "lost"
    # The tree keeps working for later operations.
    assert after.hosts("ok") == [n for n in names if n != victim]
    assert after.results[victim].status == "unreachable"
    assert wait_no_agents(testfleet) == {}
    # The killed agent left its temporary file; the next push there removes it
    # and delivers the file.
    assert any(".mfpush." in f for f in os.listdir(tmp_path / victim))

    async def again():
        async with Fleet.connect(inv, hosts=[victim]) as fleet:
            return await fleet.push(str(src), dest)

    assert trio.run(again).ok
    assert os.listdir(tmp_path / victim) == ["blob.bin"] and _sha(tmp_path / victim / "blob.bin") == want
    assert wait_no_agents(testfleet) == {}


def test_unknown_host_key_is_refused(testfleet, tmp_path):
    inv = testfleet.inventory
    # A known_hosts without host 1's key: host 1 must be refused, never trusted.
    lines = testfleet.known_hosts.read_text().splitlines()
    stranger = inv.hosts[1]
    partial = tmp_path / "known_hosts"
    partial.write_text("".join(l + "\n" for l in lines if not l.startswith(stranger.address + " ")))
    hosts = list(inv.hosts[:4])
    text = inventory.render(hosts, identity=inv.identity, known_hosts=str(partial))
    path = tmp_path / "hosts.toml"
    path.write_text(text)
    inv2 = inventory.load(path)

    async def main():
        # fanout 1: a chain 0 -> 1 -> 2 -> 3; host 1 is an inner node, refused by host 0's agent.
        async with Fleet.connect(inv2, fanout=1) as fleet:
            report = await fleet.exec(["true"])
            return dict(fleet.status), report

    status, report = trio.run(main)
    assert status[stranger.name].state == "unreachable"
    assert "host key not trusted" in status[stranger.name].error
    assert str(partial) in status[stranger.name].error
    assert report.results[stranger.name].status == "unreachable"
    # Its subtree was re-attached around it.
    assert report.hosts("ok") == [hosts[0].name, hosts[2].name, hosts[3].name]
    assert wait_no_agents(testfleet) == {}


def test_unreachable_host_and_cancel_leave_no_orphans(testfleet):
    inv = testfleet.inventory
    names = [h.name for h in inv.hosts]
    down = inv.hosts[19]

    async def main():
        # A host whose port is closed: a fleet of 6 with host 19 not answering.
        dead = inventory.Host(down.name, "127.0.0.1", 9, "root", (), 0, down.agent)
        inv6 = inventory.Inventory(tuple(list(inv.hosts[:5]) + [dead]), inv.identity, inv.known_hosts)
        with trio.move_on_after(60):
            async with Fleet.connect(inv6, fanout=2, connect_timeout=5) as fleet:
                assert fleet.status[down.name].state == "unreachable"
                report = await fleet.exec(["true"])
                assert report.results[down.name].status == "unreachable"
                assert report.hosts("ok") == names[:5]
                # Ctrl-C (here: a cancel) during a long command: everything stops.
                with trio.move_on_after(2):
                    await fleet.exec(["sleep", "300"])
                return True

    assert trio.run(main)
    assert wait_no_agents(testfleet) == {}
    # No `sleep 300` survived either: nothing at all runs in the namespaces but sshd.
    assert all(testfleet.pids_in(i) == [testfleet.sshd[testfleet.netns(i)].pid] for i in range(6))


HANDLERS = '''
from megafleet.gproc import handlers

@handlers.handler("mfgtest.apply")
async def apply(payload, ctx):
    await ctx.emit({"phase": "start", "host": ctx.host})
    if payload.get("fail"):
        raise RuntimeError("manifest refused: " + payload["fail"])
    return {"host": ctx.host, "vms": payload["vms"] * 2}

@handlers.handler("mfgtest.slow")
async def slow(payload, ctx):
    import trio
    await trio.sleep(600)
'''


def test_call_carries_per_host_manifests_to_registered_handlers(testfleet, tmp_path):
    # The handler module lives outside megafleet: the agents find it through the
    # module list of the request (PYTHONPATH set by the inventory's agent command).
    (tmp_path / "mfg_test_handlers.py").write_text(HANDLERS)
    hosts = [inventory.Host(h.name, h.address, h.port, h.user, h.labels, h.capacity,
                            ("env", f"PYTHONPATH={tmp_path}") + h.agent)
             for h in testfleet.inventory.hosts[:7]]
    inv = inventory.Inventory(tuple(hosts), testfleet.inventory.identity, testfleet.inventory.known_hosts)
    manifests = {h.name: {"vms": i} for i, h in enumerate(hosts)}
    manifests[hosts[3].name] = {"vms": 0, "fail": "no bridge br0"}
    events = []

    async def main():
        async with Fleet.connect(inv, fanout=2) as fleet:
            report = await fleet.call("mfgtest.apply", per_host=manifests, modules=["mfg_test_handlers"],
                                      on_event=lambda h, data: events.append((h, data)))
            unknown = await fleet.call("mfgtest.nothing", {}, hosts=[hosts[0].name])
            ping = await fleet.call("gproc.ping")
            # A handler that overruns its timeout: failed on every host (inner
            # agents and leaves alike), nothing hangs.
            slow = await fleet.call("mfgtest.slow", {}, modules=["mfg_test_handlers"], timeout=2)
            # The manifests as JSON texts: relays pass them on, each host decodes its own.
            encoded = await fleet.call("mfgtest.apply", per_host={h: json.dumps(m) for h, m in manifests.items()},
                                       modules=["mfg_test_handlers"], encoded=True)
            return report, unknown, ping, slow, encoded

    report, unknown, ping, slow, encoded = trio.run(main)
    assert {h: (r.status, r.value, r.error) for h, r in encoded.results.items()} == \
        {h: (r.status, r.value, r.error) for h, r in report.results.items()}
    assert slow.counts() == {"ok": 0, "failed": 7, "unreachable": 0}
    assert {r.error for r in slow.results.values()} == {"timed out after 2 s"}
    for i, h in enumerate(hosts):
        r = report.results[h.name]
        if i == 3:
            assert r.status == "failed" and r.error == "RuntimeError: manifest refused: no bridge br0"
        else:
            assert (r.status, r.value) == ("ok", {"host": h.name, "vms": 2 * i}), r.error
    assert sorted(events) == sorted((h.name, {"phase": "start", "host": h.name}) for h in hosts)
    assert unknown.results[hosts[0].name].status == "failed"
    assert "no handler named 'mfgtest.nothing'" in unknown.results[hosts[0].name].error
    assert ping.ok and {r.value["host"] for r in ping.results.values()} == {h.name for h in hosts}
    assert wait_no_agents(testfleet) == {}
