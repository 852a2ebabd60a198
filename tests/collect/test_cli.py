"""`megafleet telemetry` against real stores holding the conformance dataset."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from megafleet.cli import root
from megafleet.collect.stores import MongoStore, SqliteStore

from . import dataset


@pytest.fixture
def sqlite_uri(tmp_path):
    store = SqliteStore(tmp_path / "t.sqlite")
    dataset.load(store)
    store.close()
    return f"sqlite:{tmp_path / 't.sqlite'}"


def cli(*args: str):
    result = CliRunner().invoke(root, ["telemetry", *args], catch_exceptions=False)
    return result


def test_queries_print_tables_and_json(sqlite_uri):
    out = cli("--telemetry", sqlite_uri, "status", "--window", "all")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["HOST", "BOOTING", "FAILED", "RUNNING", "STOPPED", "TOTAL"]
    assert lines[1].split() == ["mfc-h1", "1", "1", "3", "1", "6"]

    out = cli("--telemetry", sqlite_uri, "boot-times", "--since", "all", "--json")
    rows = json.loads(out.output)
    assert {(r["host"], r["image"], r["boots"]) for r in rows} >= {("mfc-h1", "tiny", 3)}

    out = cli("--telemetry", sqlite_uri, "top", "--by", "mem", "-n", "2", "--window", "all")
    assert out.exit_code == 0 and "mfc-g15" in out.output.splitlines()[1]

    out = cli("--telemetry", sqlite_uri, "events", "--since", "all", "--kind", "error")
    assert "no readiness line in 60 s" in out.output and "sampler-error" in out.output

    out = cli("--telemetry", sqlite_uri, "net", "--since", "all", "-n", "1", "--json")
    assert [r["iface"] for r in json.loads(out.output)] == ["mfctap1"]

    out = cli("--telemetry", sqlite_uri, "net", "--since", "all", "--protocols")
    assert "ipv4_icmp" in out.output

    out = cli("--telemetry", sqlite_uri, "find", "--filter",
              '{"meta.kind": "guest", "rss_kb": {"$gte": 55100}}', "--json")
    assert {d["meta"]["guest"] for d in json.loads(out.output)} == {"mfc-g15"}


def test_plots_are_written(sqlite_uri, tmp_path):
    cdf, ksm = tmp_path / "cdf.png", tmp_path / "ksm.png"
    assert cli("--telemetry", sqlite_uri, "boot-times", "--since", "all",
               "--plot", str(cdf)).exit_code == 0
    assert cli("--telemetry", sqlite_uri, "ksm", "--since", "all",
               "--plot", str(ksm)).exit_code == 0
    for png in (cdf, ksm):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    bad = cli("--telemetry", sqlite_uri, "ksm", "--since", "all", "--plot", str(tmp_path / "k.jpg"))
    assert bad.exit_code != 0 and "must end in .png" in bad.output


def test_bad_input_is_named(sqlite_uri):
    out = cli("--telemetry", sqlite_uri, "find", "--filter", '{"x": {"$regex": "^a"}}')
    assert out.exit_code == 2 and "$regex is not supported by the SQLite store" in out.output
    out = cli("--telemetry", sqlite_uri, "find", "--filter", '{"x": ')
    assert out.exit_code == 2 and "--filter" in out.output and "not valid JSON" in out.output
    out = cli("--telemetry", sqlite_uri, "events", "--since", "ten minutes")
    assert out.exit_code == 2 and "--since" in out.output
    out = cli("--telemetry", "postgres://x", "status")
    assert out.exit_code == 2 and "mongodb://" in out.output


@pytest.mark.mongo
def test_same_output_on_ferretdb(sqlite_uri, ferretdb):
    uri = ferretdb.uri
    store = MongoStore(uri)
    dataset.load(store)
    try:
        for args in (["status", "--window", "all"], ["boot-times", "--since", "all"],
                     ["top", "--window", "all"], ["ksm", "--since", "all"],
                     ["net", "--since", "all"], ["events", "--since", "all"],
                     ["find", "--filter", '{"state": {"$ne": "running"}}', "-n", "0"]):
            on_sqlite = cli("--telemetry", sqlite_uri, *args, "--json")
            on_ferret = cli("--telemetry", uri.rsplit("/", 1)[0] + "/" + store.db.name, *args,
                            "--json")
            assert on_sqlite.exit_code == on_ferret.exit_code == 0, on_ferret.output
            assert json.loads(on_sqlite.output) == json.loads(on_ferret.output), args
        info = cli("--telemetry", uri.rsplit("/", 1)[0] + "/" + store.db.name, "info", "--json")
        assert json.loads(info.output)["server"].startswith("FerretDB")
    finally:
        store.client.drop_database(store.db.name)
        store.close()


def test_run_flushes_on_sigterm(tmp_path):
    """`telemetry run` as host.py starts it: SIGTERM stops it cleanly, with what
    it had queued stored and its final counters written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from megafleet.collect import docs as D
    from megafleet.proc import RecordedProcess

    db = tmp_path / "t.sqlite"
    env = dict(os.environ, MEGAFLEET_STATE=str(tmp_path / "state"))
    child = subprocess.Popen([sys.executable, "-m", "megafleet", "telemetry", "--telemetry",
                              f"sqlite:{db}", "run", "--host", "mfc-run", "--no-vm",
                              "--interval", "0.5", "--spool", str(tmp_path / "spool")],
                             env=env, stderr=subprocess.PIPE, text=True)
    proc = RecordedProcess.of(child.pid)
    try:
        # Signal it once it is collecting (startup may be slow on a loaded machine).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if db.exists():
                probe = SqliteStore(db)
                ready = probe.count(D.SAMPLES, {"meta.kind": "host"}) >= 3
                probe.close()
                if ready:
                    break
            time.sleep(0.2)
        proc.signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
    finally:
        proc.stop()
    assert child.returncode == 0, err
    assert "SIGTERM: stopping, flushing telemetry" in err and "stopped: accepted=" in err
    store = SqliteStore(db)
    assert store.count(D.SAMPLES, {"meta.kind": "host", "meta.host": "mfc-run"}) >= 3
    final = store.find(D.SAMPLES, {"meta.kind": "pipeline"})[-1]
    assert final["queued"] == 0 and final["dropped"] == 0
    assert not list((tmp_path / "spool").glob("*.seg"))
    store.close()
