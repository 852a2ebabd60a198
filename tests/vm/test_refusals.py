"""Boots refused before anything starts: over the memory budget, unknown image,
bad spec. Nothing may be recorded, created or started."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

from megafleet.ledger import Ledger
from megafleet.vm.admission import BudgetError
from megafleet.vm.engine import Engine, guests_dir
from megafleet.vm.spec import GuestSpec, SpecError
from megafleet.vm.state import OWNER, VmState

from .vmhelpers import REPO, assert_nothing_left, qemu_pids


def _nothing_started(prefix: str) -> None:
    assert_nothing_left(prefix)
    assert not list(guests_dir().glob(prefix + "*"))
    assert qemu_pids(prefix) == []


def test_over_budget_is_refused_before_anything_starts(tiny):
    specs = [GuestSpec(name=f"mfvbud{i}", image="tiny", driver="qemu", mem_mb=512) for i in range(8)]
    with pytest.raises(BudgetError) as info:
        trio.run(lambda: Engine(mem_budget_mb=1024).apply(specs))
    message = str(info.value)
    assert "refusing to boot 8 guest(s)" in message and "1024 MiB" in message
    assert "KSM saves" in message and "Nothing was started" in message
    assert "--mem-budget" in message          # the option of `vm boot`, which this engine serves
    _nothing_started("mfvbud")


def test_cli_reports_budget_and_unknown_image_clearly(tiny):
    base = [sys.executable, "-m", "megafleet", "vm", "boot", "--prefix", "mfvcli", "--driver", "qemu"]
    over = subprocess.run(base + ["--image", "tiny", "--count", "100", "--mem", "4096"],
                          cwd=REPO, capture_output=True, text=True)
    assert over.returncode == 1 and "Error: refusing to boot 100 guest(s)" in over.stderr
    missing = subprocess.run(base + ["--image", "mfvnosuchimage"], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 1
    assert "guest mfvcli1: image: no image named 'mfvnosuchimage'" in missing.stderr
    _nothing_started("mfvcli")


def test_bad_spec_is_refused_whole(tiny):
    specs = [GuestSpec(name="mfvbad1", image="tiny"), GuestSpec(name="mfvbad2", image="tiny", vcpus=99)]
    with pytest.raises(SpecError, match="guest mfvbad2: vcpus: 99"):
        trio.run(lambda: Engine().apply(specs))
    assert VmState().list("mfvbad*") == []
    assert [r for r in Ledger().list(owner=OWNER) if r.data.get("guest", "").startswith("mfvbad")] == []


def test_bad_guest_config_is_refused_before_anything_is_made(tiny):
    """The engine checks a guest's config (its kernel arguments) once it knows
    the guest boots: still before anything is recorded or started."""
    from megafleet.imagegen.contract import GuestConfig

    specs = [GuestSpec(name="mfvcfg1", image="tiny"),
             GuestSpec(name="mfvcfg2", image="tiny", config=GuestConfig(name="mfvcfg2", gateway="300.1.1.1"))]
    with pytest.raises(SpecError, match="guest mfvcfg2: config: .*300.1.1.1"):
        trio.run(lambda: Engine().apply(specs))
    assert VmState().list("mfvcfg*") == []
    assert [r for r in Ledger().list(owner=OWNER) if r.data.get("guest", "").startswith("mfvcfg")] == []
