"""Shared test set-up: every test run gets its own state and runtime directories,
so nothing a test does touches a user's real megafleet state. The image cache is
shared across runs (it is content-addressed, so sharing is safe and saves
rebuilding and re-downloading)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Short paths: unix sockets live under MEGAFLEET_RUN (107-byte limit).
    run = tempfile.mkdtemp(prefix="mft-")
    state = tempfile.mkdtemp(prefix="mfs-")
    os.environ["MEGAFLEET_RUN"] = run
    os.environ["MEGAFLEET_STATE"] = state
    os.environ.setdefault("MEGAFLEET_CACHE", str(REPO / ".cache" / "test"))
    config._megafleet_dirs = (run, state)


def pytest_unconfigure(config):
    for d in getattr(config, "_megafleet_dirs", ()):
        shutil.rmtree(d, ignore_errors=True)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, bridges, taps, sysfs)")


@pytest.fixture
def root_only():
    need_root()
