"""The `megafleet net` commands that need no root: check, show, draw, export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from megafleet.cli import root

REPO = Path(__file__).resolve().parents[2]
CAMPUS = str(REPO / "examples" / "campus.fleet")
ERRORS = Path(__file__).parent / "errors"


def run(*args: str):
    return CliRunner().invoke(root, ["net", *args], catch_exceptions=False)


def test_check_ok_and_json():
    r = run("check", CAMPUS)
    assert r.exit_code == 0 and "ok: 6 switches, 0 vms, 13 hosts, 2 routers" in r.output
    data = json.loads(run("check", CAMPUS, "--json").output)
    assert data["ok"] and data["counts"]["host"] == 13


def test_check_reports_errors_with_exit_1():
    r = CliRunner().invoke(root, ["net", "check", str(ERRORS / "several.fleet")])
    assert r.exit_code == 1
    assert "several.fleet:3:17: error: unknown property 'vcpus' for host" in r.stderr
    assert r.stderr.rstrip().endswith("4 errors")


def test_parameters_from_the_command_line():
    data = json.loads(run("check", CAMPUS, "-D", "hosts=20", "--json").output)
    assert data["counts"]["host"] == 43
    r = CliRunner().invoke(root, ["net", "check", CAMPUS, "-D", "hosts"])
    assert r.exit_code == 2 and "expected NAME=VALUE" in r.stderr


def test_show_tables_and_json():
    r = run("show", CAMPUS)
    assert r.exit_code == 0
    assert "NETWORK" in r.output and "dmz.v30" in r.output and "ROUTER" in r.output
    data = json.loads(run("show", CAMPUS, "--json").output)
    assert {r["router"]: r["routing"] for r in data["routers"]} == {"gw": ["ospf"], "edge": ["ospf"]}
    core = next(n for n in data["networks"] if n["network"] == "core")
    assert core["subnets"] == ["10.0.0.0/24"] and core["routers"] == ["edge", "gw"]


def test_export_json(tmp_path):
    out = tmp_path / "net.json"
    assert run("export", CAMPUS, "--json", "-o", str(out)).exit_code == 0
    data = json.loads(out.read_text())
    printer = next(n for n in data["nodes"] if n["name"] == "printer")
    assert printer["ifaces"][0]["addresses"][0] == "10.1.2.200/24"
    assert printer["gateways"]["ipv4"] == "10.1.2.1"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz not installed")
def test_draw_svg_and_png(tmp_path):
    for suffix in ("svg", "png"):
        out = tmp_path / f"topo.{suffix}"
        r = run("draw", CAMPUS, "-o", str(out))
        assert r.exit_code == 0, r.output
        head = out.read_bytes()[:1000]
        assert (b"<svg" in head) if suffix == "svg" else head.startswith(b"\x89PNG")


def test_draw_rejects_unknown_format(tmp_path):
    r = CliRunner().invoke(root, ["net", "draw", CAMPUS, "-o", str(tmp_path / "x.gif")])
    assert r.exit_code == 1 and "unknown format 'gif'" in r.output


def test_help_pages():
    for cmd in ("check", "show", "draw", "export", "up", "down", "list"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output
