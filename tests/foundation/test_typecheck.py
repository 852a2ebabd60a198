"""The static type check scripts/test runs (mypy, configured in pyproject.toml):
it passes over megafleet/, and with the project's configuration it catches a
tuple whose annotation says one number of fields where the code builds another
(issue 13: a plan's link tuple was annotated with 7 fields and built with 6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def mypy(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_a_tuple_of_the_wrong_arity_is_an_error(tmp_path):
    snippet = tmp_path / "arity.py"
    snippet.write_text("links: list[tuple[str, str, str, str, list[int], int, float]] = []\n"
                       "links.append(('a', 'b', 'c', 'd', 1500, 0.5))\n")
    r = mypy(str(snippet))
    assert r.returncode == 1 and "arity.py:2: error" in r.stdout, r.stdout


@pytest.mark.slow
def test_megafleet_type_checks():
    r = mypy()
    assert r.returncode == 0, r.stdout[-3000:]
