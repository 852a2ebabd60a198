"""The guests' directories on a tmpfs of megafleet's own when the run directory
is on a disk (megafleet.vm.guestdirs): mounted before the first guest is
recorded, kept while any guest of any engine is, unmounted with the last."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from megafleet import sweep
from megafleet.ledger import Ledger
from megafleet.vm import guestdirs
from megafleet.vm.engine import Engine
from megafleet.vm.spec import GuestSpec
from megafleet.vm.state import VmState

from .vmhelpers import assert_nothing_left


def test_filesystem_of_paths_and_mount_points():
    assert guestdirs.filesystem_of(Path("/proc/self")) == "proc"
    assert guestdirs.filesystem_of(Path("/sys/kernel")) == "sysfs"
    assert guestdirs.is_mount_point(Path("/proc"))
    assert not guestdirs.is_mount_point(Path("/proc/self/fd"))
    assert guestdirs._unescape(r"/a\040b\134c") == "/a b\\c"


@pytest.fixture
def disk_run_dir(monkeypatch, root_only):
    """Run and state directories of this test alone, the run directory on a disk
    filesystem (/var/tmp), where the engine mounts its tmpfs."""
    base = Path(tempfile.mkdtemp(prefix="mfgd-", dir="/var/tmp"))
    if guestdirs.filesystem_of(base) in guestdirs.MEMORY_FILESYSTEMS:
        pytest.skip(f"/var/tmp is a {guestdirs.filesystem_of(base)} here: nothing to mount over")
    (base / "run").mkdir()
    (base / "state").mkdir()
    monkeypatch.setenv("MEGAFLEET_RUN", str(base / "run"))
    monkeypatch.setenv("MEGAFLEET_STATE", str(base / "state"))
    yield base
    if guestdirs.is_mount_point(base / "run" / "vm"):       # a failed test's: do not leak it
        trio.run(lambda: Engine().teardown("*"))
    shutil.rmtree(base, ignore_errors=True)


def _specs(prefix: str, n: int) -> list[GuestSpec]:
    return [GuestSpec(name=f"{prefix}{i}", image="tiny", driver="container") for i in range(n)]


def test_a_tmpfs_holds_the_guests_while_any_engine_has_one(tiny, disk_run_dir):
    first, second = Engine(timeout_s=120), Engine(timeout_s=120)
    base = guestdirs.guests_dir()
    assert not guestdirs.is_mount_point(base)
    report = trio.run(lambda: first.apply(_specs("mfgda", 3)))
    assert len(report.ready) == 3, [(r.name, r.reason) for r in report.failed]
    # Mounted, recorded in the ledger, seen as present by `doctor --leftovers`,
    # and the guests' consoles are on it.
    assert guestdirs.is_mount_point(base) and guestdirs.filesystem_of(base) == "tmpfs"
    assert [r.key for r in Ledger().list("vm", "mount")] == [str(base)]
    assert any(left.kind == "mount" and left.key == str(base) for left in sweep.leftovers())
    assert guestdirs.filesystem_of(base / "mfgda0" / "console.log") == "tmpfs"
    assert "MEGAFLEET-READY name=mfgda0" in (base / "mfgda0" / "console.log").read_text()

    # A second engine's guests share it; the first one's teardown leaves it.
    report = trio.run(lambda: second.apply(_specs("mfgdb", 2)))
    assert len(report.ready) == 2, [(r.name, r.reason) for r in report.failed]
    trio.run(lambda: first.teardown("mfgda*"))
    assert guestdirs.is_mount_point(base)
    assert "MEGAFLEET-READY name=mfgdb1" in (base / "mfgdb1" / "console.log").read_text()
    assert_nothing_left("mfgda")

    # The last guest's teardown unmounts it and forgets the record.
    trio.run(lambda: second.teardown("mfgdb*"))
    assert not guestdirs.is_mount_point(base)
    assert Ledger().list("vm", "mount") == [] and VmState().count() == 0
    assert not any(left.kind == "mount" for left in sweep.leftovers())
    assert_nothing_left("mfgdb")


def test_directories_from_before_are_not_hidden_by_a_mount(tiny, disk_run_dir):
    # A guest directory already there (a run before this rule): a tmpfs over it
    # would hide it from its teardown, so the engine keeps plain directories.
    stray = guestdirs.guests_dir() / "mfgdold"
    stray.mkdir()
    engine = Engine(timeout_s=120)
    try:
        report = trio.run(lambda: engine.apply(_specs("mfgdc", 1)))
        assert len(report.ready) == 1
        assert not guestdirs.is_mount_point(guestdirs.guests_dir()) and stray.is_dir()
    finally:
        trio.run(lambda: engine.teardown("mfgdc*"))
    assert_nothing_left("mfgdc")


def test_a_boot_ended_during_the_kvm_probe_has_recorded_and_mounted_nothing(tiny, disk_run_dir,
                                                                            monkeypatch):
    # The accelerator is probed before the guests are recorded: a `vm boot`
    # killed during the probe (a guest of its own, up to 12 s on a PVM host)
    # leaves no guest records and no tmpfs that `down` would not sweep. The
    # probe stands in here by checking what is on record when it runs, then
    # ending the boot the way a kill does: nothing after it runs.
    from megafleet.vm import qemu_driver

    seen = {}

    def probe_accel():
        seen["mounted"] = guestdirs.is_mount_point(guestdirs.guests_dir())
        seen["guests"] = VmState().count()
        seen["records"] = len(Ledger().list("vm"))
        raise RuntimeError("the boot ends during the probe")

    monkeypatch.setattr(qemu_driver, "_accel_cache", None)
    monkeypatch.delenv("MEGAFLEET_ACCEL", raising=False)
    monkeypatch.setattr(qemu_driver, "probe_accel", probe_accel)
    engine = Engine(timeout_s=120)
    spec = GuestSpec(name="mfgdk0", image="tiny", driver="qemu")
    with pytest.raises(RuntimeError, match="during the probe"):
        trio.run(lambda: engine.apply([spec]))
    assert seen == {"mounted": False, "guests": 0, "records": 0}
    assert not guestdirs.is_mount_point(guestdirs.guests_dir())
    assert VmState().count() == 0 and Ledger().list("vm") == []
    assert_nothing_left("mfgdk")
