"""Fixtures of the `megafleet up` tests: a two-host test fleet (network
namespaces with their own sshd, from gproc's testfleet) and helpers to run the
CLI and to look for leftovers on every host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TAG = os.getpid() % 1000


def megafleet(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (a fresh process, argv only)."""
    result = subprocess.run([sys.executable, "-m", "megafleet", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"megafleet {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def megafleet_json(*args: str, check: bool = True, timeout: float = 300) -> dict:
    return json.loads(megafleet(*args, "--json", check=check, timeout=timeout).stdout)


def links_in(netns: str | None, prefix: str) -> list[str]:
    argv = ["ip", "-o", "link", "show"] if netns is None else ["ip", "-n", netns, "-o", "link", "show"]
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(prefix)]


def netns_with(prefix: str, fleet=None, host: str | None = None) -> list[str]:
    """Named namespaces with this prefix, as the root mount namespace sees them or,
    given a test host, as that host's sshd (and the agents it starts) sees them:
    `ip netns exec` gives sshd a mount namespace of its own."""
    if host is None:
        try:
            return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix))
        except FileNotFoundError:
            return []
    pid = fleet.sshd[host].pid
    out = subprocess.run(["nsenter", "-t", str(pid), "-m", "ls", "-1", "/run/netns"],
                         capture_output=True, text=True).stdout
    return sorted(n for n in out.split() if n.startswith(prefix))


@pytest.fixture(scope="module")
def fleet2():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, sshd)")
    from megafleet.gproc.testfleet import TestFleet, leftovers

    prefix = f"mfuf{TAG}"
    work = Path(tempfile.mkdtemp(prefix="mfu-"))
    fleet = TestFleet(prefix, 2, work / "fleet", subnet=f"10.148.{TAG % 250}.0/24")
    try:
        fleet.inventory = fleet.up()
        fleet.host_state = str(work / "h" / "{host}")
        yield fleet
    finally:
        fleet.down()
        shutil.rmtree(work, ignore_errors=True)
    assert leftovers(prefix) == []


# The collect tests' FerretDB (a real MongoDB-protocol server), for `up --telemetry mongodb://...`.
from tests.collect.conftest import ferretdb  # noqa: E402,F401
