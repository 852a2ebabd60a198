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
