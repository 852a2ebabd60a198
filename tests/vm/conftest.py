"""Fixtures of the vm tests: real images (built once, cached), an engine whose
guests are reaped by this process, and a check that nothing is left behind."""

from __future__ import annotations

import pytest

from megafleet.vm.driver import become_subreaper

from .vmhelpers import HERE, REPO


@pytest.fixture(scope="session")
def tiny():
    from megafleet.imagegen import store
    return store.build(REPO / "examples" / "images" / "tiny.toml")


@pytest.fixture(scope="session")
def panic_image(tiny):
    from megafleet.imagegen import store
    return store.build(HERE / "images" / "panic.toml")


@pytest.fixture(autouse=True)
def reaper():
    # Guests orphaned by a killed engine are re-parented to this process (not to
    # PID 1, which does not reap here), so no zombie outlives a test.
    become_subreaper()
