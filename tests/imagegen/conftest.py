"""Shared fixtures: the tiny example image, built once per test session into the
shared test cache (a cache hit on later runs)."""

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "images"


@pytest.fixture(scope="session")
def tiny_image():
    from megafleet.imagegen import store

    return store.build(EXAMPLES / "tiny.toml")
