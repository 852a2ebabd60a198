"""Pure logic of the vm package: admission, budget, specs, state, console parsing,
command lines and domain XML."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trio

from megafleet.imagegen.contract import GuestConfig, NicConfig
from megafleet.vm import admission
from megafleet.vm.engine import ConsoleChanges, ConsoleWatcher, console_tail, kernel_panic, find_ready
from megafleet.vm.spec import (BootReport, GuestResult, GuestSpec, NicSpec, SpecError,
                                   percentile, validate, validate_all)
from megafleet.vm.state import GuestRecord, GuestStatus, VmState


def test_parallel_boots_follows_cpus_and_load():
    assert admission.parallel_boots("tcg", 2, 0.0) == 8
    assert admission.parallel_boots("kvm", 4, 1.0) == 64
    assert admission.parallel_boots("container", 2, 0.5) == 128
    # Each runnable task of others beyond the CPUs takes one boot away...
    assert admission.parallel_boots("tcg", 4, 7.0) == 13
    # ...down to half, so our boots still progress on a busy host.
    assert admission.parallel_boots("tcg", 2, 40.0) == 4
    assert admission.parallel_boots("container", 2, 0.0, maximum=10) == 10


def test_load_tracker_discounts_our_boots_and_smooths():
    tracker = admission.LoadTracker(weight=0.5)
    assert tracker.update(runnable=9, ours=8) == 0.0   # only us (and the sampler)
    assert tracker.update(runnable=13, ours=8) == 2.0  # others: 4, averaged with 0
    assert admission.host_runnable()[1] >= 1


def test_budget_refuses_before_anything_and_credits_ksm():
    memory = admission.MemoryPicture(total_mb=1000, available_mb=900, ksm_saved_mb=0)
    need = admission.check_budget([("a", "qemu", 128)], [], 1000, memory)
    assert need == 128 + admission.QEMU_OVERHEAD_MB
    with pytest.raises(admission.BudgetError, match="refusing to boot 5 guest"):
        admission.check_budget([(f"g{i}", "qemu", 128) for i in range(5)],
                               [("qemu", 128)], 1000, memory)
    # KSM already saving 200 MiB (of the running guest's cost) makes the same boot fit.
    saved = admission.MemoryPicture(total_mb=1000, available_mb=900, ksm_saved_mb=200)
    admission.check_budget([(f"g{i}", "qemu", 128) for i in range(5)], [("qemu", 128)], 1000, saved)
    # Containers are charged their small fixed cost, not a RAM size.
    admission.check_budget([(f"c{i}", "container", 128) for i in range(200)], [], 900, memory)


def test_read_memory_parses_meminfo(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 2048000 kB\nMemFree: 100 kB\nMemAvailable: 1024000 kB\n")
    (tmp_path / "ksm").mkdir()
    (tmp_path / "ksm" / "pages_sharing").write_text("2560\n")
    m = admission.read_memory(tmp_path / "meminfo", tmp_path / "ksm")
    assert (m.total_mb, m.available_mb) == (2000, 1000)
    assert m.ksm_saved_mb == 2560 * 4096 // (1 << 20)


@pytest.mark.parametrize("spec, message", [
    (GuestSpec(name="9bad", image="tiny"), "invalid guest name"),
    (GuestSpec(name="ok", image="tiny", driver="xen"), "driver: unknown driver 'xen'"),
    (GuestSpec(name="ok", image="tiny", mem_mb=4), "mem_mb: mem 4M is below the qemu driver.s minimum of 96M"),
    (GuestSpec(name="ok", image="tiny", driver="container", mem_mb=8), "mem_mb: mem 8M is below the container"),
    (GuestSpec(name="ok", image="tiny", vcpus=0), "vcpus: 0"),
    (GuestSpec(name="ok", image="tiny", nics=[NicSpec(mac="zz")]), r"nics\[0\]: mac"),
    (GuestSpec(name="ok", image="tiny", nics=[NicSpec(mac="52:54:00:00:00:01", kind="veth", ifname="v0")]),
     "qemu driver cannot attach a 'veth'"),
    (GuestSpec(name="ok", image="tiny", nics=[NicSpec(mac="52:54:00:00:00:01", ifname="a; rm -rf")]),
     "ifname"),
    (GuestSpec(name="ok", image="tiny", driver="container",
               nics=[NicSpec(mac="52:54:00:00:00:01", kind="veth", ifname="v0", peer="x/y")]), "peer"),
    (GuestSpec(name="ok", image="tiny", config=GuestConfig(name="other")), "differs"),
    (GuestSpec(name="ok", image="tiny", config=GuestConfig(name="ok", gateway="300.1.1.1")), "config"),
])
def test_bad_specs_name_guest_and_field(spec, message):
    with pytest.raises(SpecError, match=message):
        validate(spec)


def test_image_by_hash_accepted_and_odd_names_refused():
    validate(GuestSpec(name="ok", image="117ae40fe7d3d447"))
    with pytest.raises(SpecError, match="invalid image name"):
        validate(GuestSpec(name="ok", image="../etc"))


def test_duplicate_names_refused():
    with pytest.raises(SpecError, match="listed twice"):
        validate_all([GuestSpec(name="a", image="tiny"), GuestSpec(name="a", image="tiny")])


def test_spec_round_trips_through_dict():
    spec = GuestSpec(name="web1", image="tiny", driver="container", mem_mb=64,
                     nics=(NicSpec(mac="52:54:00:00:00:01", kind="veth", ifname="mfvh0"),),
                     config=GuestConfig(name="web1", nics=(NicConfig("52:54:00:00:00:01", ("10.0.0.2/24",)),),
                                        gateway="10.0.0.1", routes=(("10.9.0.0/16", "10.0.0.254"),)))
    again = GuestSpec.from_dict(spec.to_dict())
    assert again.guest_config().kernel_args() == spec.guest_config().kernel_args()
    assert again.nics == spec.nics and again.mem_mb == 64
    assert again == spec


def test_spec_dict_is_asdict_in_json_shape():
    """to_dict is written out field by field: it must say what asdict says
    (a field added to a spec class and not to to_dict fails here) and equal its
    own JSON round trip (diff_json compares it with a manifest read back from
    JSON: a tuple there made every guest of a running testbed look changed)."""
    spec = GuestSpec(name="r1", image="tiny", driver="qemu", mem_mb=96, vcpus=2,
                     nics=(NicSpec(mac="52:54:00:00:00:01", kind="tap", ifname="mfvt0", bridge="br0", mtu=1400),
                           NicSpec(mac="52:54:00:00:00:02", kind="vde", vde_socket="/run/x.sock", peer="p")),
                     config=GuestConfig(name="r1", nics=(NicConfig("52:54:00:00:00:01", ("10.0.0.2/24", "fd00::2/64"),
                                                                   1400),),
                                        gateway="10.0.0.1", gateway6="fd00::1", routes=(("10.9.0.0/16", "10.0.0.254"),),
                                        agent_interval=2.5, services=("sshd",), forward=True))
    for s in (spec, GuestSpec(name="bare", image="tiny")):
        data = s.to_dict()
        assert data == json.loads(json.dumps(dataclasses.asdict(s)))
        assert data == json.loads(json.dumps(data))


def test_percentiles_and_report():
    assert percentile([], 50) is None
    assert percentile([2.0], 95) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    report = BootReport(results=[GuestResult("a", "qemu", "ready", boot_s=1.0),
                                 GuestResult("b", "qemu", "ready", boot_s=3.0),
                                 GuestResult("c", "qemu", "failed", reason="x"),
                                 GuestResult("d", "qemu", "already")])
    d = report.to_dict()
    assert (d["ready"], d["failed"], d["already"], d["boot_p50_s"]) == (2, 1, 1, 2.0)


def test_state_rows_round_trip(tmp_path):
    state = VmState(tmp_path / "vm.sqlite")
    state.put_many([GuestRecord(name=f"mfvs{i}", driver="qemu", image="tiny", spec={"i": i},
                                state="starting", handle={"gdir": "/x"}) for i in range(3)])
    state.update("mfvs1", state="failed", reason="boom", console_tail="panic", attempts=2)
    rec = state.get("mfvs1")
    assert (rec.state, rec.reason, rec.console_tail, rec.attempts, rec.handle) == (
        "failed", "boom", "panic", 2, {"gdir": "/x"})
    assert [r.name for r in state.list("mfvs[02]")] == ["mfvs0", "mfvs2"]
    # The engine's view of the same rows: no spec, its memory from it.
    state.update("mfvs2", pid=4242, pid_start=17, boot_s=1.5)
    statuses = {g.name: g for g in state.statuses()}
    assert state.names() == set(statuses) == {"mfvs0", "mfvs1", "mfvs2"}
    assert statuses["mfvs2"] == GuestStatus("mfvs2", "qemu", "starting", 4242, 17, 1.5, 0, 0, {"gdir": "/x"})
    state.put_many([GuestRecord(name="mfvs3", driver="container", image="tiny", spec={"mem_mb": 96},
                                state="running")])
    assert [g.mem_mb for g in state.statuses() if g.name == "mfvs3"] == [96]
    # What the collector reads at every pass, without parsing specs.
    state.update("mfvs0", handle={"gdir": "/x", "agent": "/x/agent.log"})
    assert state.handle_values("agent") == {"mfvs0": "/x/agent.log"}
    with pytest.raises(ValueError):
        state.handle_values("agent') --")
    assert set(state.updated()) == {"mfvs0", "mfvs1", "mfvs2", "mfvs3"}
    assert state.updated()["mfvs0"] == state.get("mfvs0").updated
    assert [(r.name, r.spec, r.state) for r in state.list("mfvs3", specs=False)] == [("mfvs3", {}, "running")]
    assert state.list("mfvs3")[0].spec == {"mem_mb": 96}
    state.delete_many(["mfvs3"])
    with pytest.raises(ValueError):
        state.update("mfvs0", state="exploded")
    state.delete_many(["mfvs0", "mfvs1", "mfvs2"])
    assert state.list() == []


def test_console_watcher_reads_incrementally(tmp_path):
    log = tmp_path / "console.log"
    watcher = ConsoleWatcher(log)
    assert watcher.poll() is None  # no file yet
    log.write_bytes(b"[    0.1] booting\r\nMEGAFLEET-RE")
    assert watcher.poll() is None  # partial line is kept, not parsed
    with open(log, "ab") as f:
        f.write(b"ADY name=web1 uptime=1.25 mode=vm\n")
    ready = watcher.poll()
    assert ready.name == "web1" and ready.uptime == 1.25
    assert find_ready(log).name == "web1"
    assert console_tail(log, lines=1) == "MEGAFLEET-READY name=web1 uptime=1.25 mode=vm"


def test_console_changes_wake_the_wait_of_that_guest_only(tmp_path):
    """Real inotify: a write to one guest's console.log (also its creation)
    sets that guest's armed event; other files and other guests' do not."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    async def main() -> None:
        changes = ConsoleChanges()
        assert changes.enabled
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(changes.run)
                for path, text, woken_a, woken_b in ((a / "agent.log", "x", False, False),
                                                     (b / "console.log", "created", False, True),
                                                     (a / "console.log", "created", True, False),
                                                     (a / "console.log", "created and more", True, False)):
                    ea, eb = changes.arm(a), changes.arm(b)
                    path.write_text(text)
                    with trio.move_on_after(0.5):
                        await (ea if woken_a else eb).wait()
                    await trio.sleep(0.05)
                    assert (ea.is_set(), eb.is_set()) == (woken_a, woken_b), path
                changes.disarm(a)
                changes.disarm(b)
                nursery.cancel_scope.cancel()
        finally:
            changes.close()

    trio.run(main)


def test_qemu_command_line(tmp_path):
    from megafleet.vm.qemu_driver import guest_argv

    spec = GuestSpec(name="mfva", image="tiny", mem_mb=96,
                     nics=[NicSpec(mac="52:54:00:AA:00:01", ifname="mfvtap0"),
                           NicSpec(mac="52:54:00:aa:00:02", kind="vde", vde_socket="/run/sw1")])
    argv = guest_argv(spec, Path("/k"), Path("/i"), tmp_path, "tcg")
    joined = " ".join(argv)
    assert argv[argv.index("-m") + 1] == "96"
    assert "-nodefaults" in argv and "mem-merge=on" in joined and "tb-size=32" in joined
    assert f"path={tmp_path}/console.log" in joined and f"unix:{tmp_path}/qmp.sock" in joined
    assert "ifname=mfvtap0" in joined and "mac=52:54:00:aa:00:01" in joined
    assert "vde,id=n1,sock=/run/sw1" in joined
    assert argv[-2:] == ["-pidfile", str(tmp_path / "pid")]
    append = argv[argv.index("-append") + 1]
    assert "panic=-1" in append and "megafleet.name=mfva" in append


def test_libvirt_domain_xml(tmp_path):
    from megafleet.vm.libvirt_driver import domain_xml

    spec = GuestSpec(name="mfvl", image="tiny", driver="libvirt", mem_mb=128,
                     nics=[NicSpec(mac="52:54:00:00:00:09", ifname="mfvtap9")])
    dom = ET.fromstring(domain_xml(spec, Path("/k"), Path("/i"), tmp_path, "tcg"))
    assert dom.get("type") == "qemu" and dom.findtext("name") == "mfvl"
    assert dom.findtext("os/kernel") == "/k" and "megafleet.name=mfvl" in dom.findtext("os/cmdline")
    assert dom.find("devices/serial/source").get("path") == str(tmp_path / "console.log")
    assert dom.find("devices/channel/target").get("name") == "org.megafleet.agent"
    # Three virtio-serial ports (console's, agent, exec), not QEMU's 31.
    controller = dom.find("devices/controller[@type='virtio-serial']")
    assert controller is not None and controller.get("ports") == "3"
    assert dom.find("devices/interface/target").get("dev") == "mfvtap9"
    assert dom.find("devices/interface/target").get("managed") == "no"
    assert dom.find("features/tcg/tb-cache").text == "32"
    kvm = ET.fromstring(domain_xml(spec, Path("/k"), Path("/i"), tmp_path, "kvm"))
    assert kvm.get("type") == "kvm" and kvm.find("features") is None


def test_console_tail_keeps_the_panic_line_above_a_long_call_trace(tmp_path):
    log = tmp_path / "console.log"
    trace = "".join(f"[    3.30{i:04d}]  frame_{i}+0x44/0x5c\n" for i in range(200))
    log.write_text("[    3.1] Run /init as init process\n"
                   "[    3.3] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n"
                   + trace + "[    3.4] ---[ end Kernel panic ]---\n")
    tail = console_tail(log)
    assert tail.startswith("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n...\n")
    assert tail.endswith("---[ end Kernel panic ]---") and "frame_0+" not in tail
    assert kernel_panic(tail) == "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
    assert kernel_panic("no panic here") is None


def test_guest_exec_words_survive_the_guest_shell():
    """The request carries the argv quoted for the shell; the guest's busybox sh
    evaluates it (as the image's exec script does) into exactly that argv."""
    import base64
    import shutil
    import subprocess

    from megafleet.vm.guestexec import request_line

    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (scripts/setup installs busybox-static)")
    argv = ["printf", "%s|", "a  b", "it's", "$HOME", "`id`", "x\ny", "", "*"]
    request_id, words = request_line("0af3", argv).decode().rstrip("\n").split(" ")
    assert request_id == "0af3"
    script = 'CMD=$(echo "$1" | base64 -d); eval "exec $CMD"'
    out = subprocess.run([busybox, "sh", "-c", script, "sh", words], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    assert out == "a  b|it's|$HOME|`id`|x\ny||*|"
    assert base64.b64decode(words)        # one base64 word: no newline in the request


def test_guest_exec_answers_matched_by_id():
    import base64

    from megafleet.vm.guestexec import GuestExecError, parse_answer

    out, err = base64.b64encode(b"hi\n").decode(), ""
    line = f"MEGAFLEET-EXEC id=ab12 rc=3 out={out} err={err}".encode()
    result = parse_answer(line, "ab12")
    assert (result.rc, result.stdout, result.stderr) == (3, b"hi\n", b"")
    assert parse_answer(line, "ffff") is None                     # an earlier request's answer
    assert parse_answer(b"MEGAFLEET-AGENT v=1 name=x", "ab12") is None
    with pytest.raises(GuestExecError, match="malformed"):
        parse_answer(b"MEGAFLEET-EXEC id=ab12 rc=x out= err=", "ab12")


def test_guest_exec_socket_comes_from_the_recorded_handle():
    from megafleet.vm.guestexec import GuestExecError, exec_socket

    assert exec_socket("q1", {"exec": "/run/g/q1/exec.sock"}) == Path("/run/g/q1/exec.sock")
    for handle in ({"pid": 1}, None):      # a container's handle; no record at all
        with pytest.raises(GuestExecError, match="q1: no exec channel recorded"):
            exec_socket("q1", handle)
