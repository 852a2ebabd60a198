"""Changing a running testbed by editing its file: `diff` lists exactly what
differs (with file:line), `up` applies only that, and the guests that stay keep
their pids (and the namespaces that stay, their inodes)."""

from __future__ import annotations

import json
import os

import pytest

from tests.experiment.test_live import nothing_left
from tests.up.conftest import REPO, TAG, megafleet, megafleet_json

T = f"mfx{TAG}r"

BASE = f"""image tiny from "{REPO}/examples/images/tiny.toml"
pool p 10.72.0.0/16
switch lanA
switch lanB
router r1 {{
  iface lanA auto
  iface lanB auto
}}
host h1 on lanA
host h2 on lanA
link h2 -- lanB
vm g[1..3] image tiny driver container mem 64M on lanA
reachable h1 g1
"""


def pids() -> dict[str, int]:
    from megafleet.vm.engine import Engine
    return {v.name: v.pid for v in Engine().list("g*") if v.state == "running"}


def ns_inode(node: str) -> int:
    return os.stat(f"/run/netns/{T}-{node}").st_ino


def test_diff_and_up_after_adding_ten_guests_and_deleting_one_link(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = tmp_path / "rc.fleet"
    path.write_text(BASE)
    try:
        assert megafleet_json("up", str(path), "-N", T, "--no-ksm", timeout=600)["ok"]
        before, inodes = pids(), {n: ns_inode(n) for n in ("h1", "h2", "r1")}
        assert sorted(before) == ["g1", "g2", "g3"]
        # Nothing differs from the file it runs.
        same = megafleet("diff", str(path), "-N", T)
        assert "0 to add, 0 to remove, 0 to change" in same.stdout

        path.write_text(BASE.replace("vm g[1..3]", "vm g[1..13]").replace("link h2 -- lanB\n", ""))
        r = megafleet("diff", str(path), "-N", T, "--json", check=False)
        assert r.returncode == 1
        rows = json.loads(r.stdout)["rows"]
        added = {(x["kind"], x["name"]) for x in rows if x["change"] == "+"}
        removed = {(x["kind"], x["name"]) for x in rows if x["change"] == "-"}
        changed = {(x["kind"], x["name"]) for x in rows if x["change"] == "~"}
        new = [f"g{i}" for i in range(4, 14)]
        assert added == {("guest", g) for g in new} | {("port", f"{g} -- lanA") for g in new}
        assert removed == {("port", "h2 -- lanB")}
        assert changed == {("ns-config", "h2 (addresses, routes)")}
        vm_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.startswith("vm g"))
        assert {x["loc"] for x in rows if x["change"] == "+"} == {f"{path}:{vm_line}"}

        summary = megafleet_json("up", str(path), "-N", T, "--no-ksm", timeout=600)
        assert summary["ok"] and summary["ready"] == 13
        after = pids()
        assert sorted(after) == sorted(["g1", "g2", "g3"] + new)
        assert {g: after[g] for g in before} == before            # running guests untouched
        assert {n: ns_inode(n) for n in inodes} == inodes
        out = megafleet("exec", "h2", "-t", T, "--", "ip", "-o", "link").stdout
        assert "eth1" not in out and "eth0" in out
        assert "0 to add, 0 to remove, 0 to change" in megafleet("diff", str(path), "-N", T).stdout
        # And back: the ten guests go, the link comes back, g1..g3 still untouched.
        path.write_text(BASE)
        assert megafleet_json("up", str(path), "-N", T, "--no-ksm", timeout=600)["ok"]
        assert pids() == before
        assert "eth1" in megafleet("exec", "h2", "-t", T, "--", "ip", "-o", "link").stdout
    finally:
        megafleet("down", T, check=False)
    nothing_left(T)
    assert pids() == {} or not any(k.startswith("g") for k in pids())
