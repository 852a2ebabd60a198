"""Real servers for the collect tests: FerretDB (SQLite backend, in a temporary
directory, on a free loopback port), started and stopped by pid; and a real
MongoDB when MEGAFLEET_TEST_MONGO_URI is set."""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from megafleet.ledger import Ledger
from megafleet.proc import RecordedProcess

FERRETDB = Path(os.environ.get("MEGAFLEET_FERRETDB", "/opt/megafleet/bin/ferretdb"))


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, so a
    crashed or killed test run leaves no FerretDB behind (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: the fault tests
    restart FerretDB on the same port, and a port from the ephemeral range could
    meanwhile be taken as the source port of some other connection."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


class FerretDB:
    """One FerretDB process with its SQLite data in `data_dir`. `stop()` and
    `start()` again keep the data (the fault tests restart the server)."""

    def __init__(self, data_dir: Path, port: int, ledger: Ledger):
        self.data_dir = data_dir
        self.port = port
        self.ledger = ledger
        self.key = f"mfc-ferretdb-{port}"
        self.process: RecordedProcess | None = None
        self.popen: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/mfc{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        argv = [str(FERRETDB), "--handler=sqlite", f"--sqlite-url=file:{self.data_dir}/",
                f"--listen-addr=127.0.0.1:{self.port}", f"--state-dir={self.data_dir}",
                "--debug-addr=-", "--telemetry=disable", "--log-level=warn"]
        log = open(self.data_dir / "ferretdb.log", "ab")
        # Recorded before it runs: a crash leaves a ledger line to clean up from.
        self.ledger.record("collect-test", "process", self.key, argv=argv)
        # The death signal follows the *thread* that started the child: only tie
        # the server to the main thread (tests restart it from worker threads).
        main = threading.current_thread() is threading.main_thread()
        self.popen = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      preexec_fn=die_with_parent if main else None)
        log.close()
        self.process = RecordedProcess.of(self.popen.pid)
        self.ledger.record("collect-test", "process", self.key, argv=argv,
                           pid=self.process.pid, start=self.process.start)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"ferretdb exited {self.popen.returncode}: "
                                   + (self.data_dir / "ferretdb.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"ferretdb did not listen on port {self.port} within 30 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=10)
            if self.popen is not None:
                self.popen.wait(timeout=10)
            self.process = None
        self.ledger.forget("collect-test", "process", self.key)


@pytest.fixture(scope="session")
def ferretdb():
    if not FERRETDB.exists():
        pytest.skip(f"{FERRETDB} is missing: run scripts/ferretdb-install")
    data_dir = Path(tempfile.mkdtemp(prefix="mfc-ferret-"))
    ledger = Ledger()
    server = FerretDB(data_dir, free_port(), ledger)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        assert not any(r.key == server.key for r in ledger.list("collect-test", "process"))
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def private_ferretdb():
    """A FerretDB of its own, for tests that stop and restart the server."""
    if not FERRETDB.exists():
        pytest.skip(f"{FERRETDB} is missing: run scripts/ferretdb-install")
    data_dir = Path(tempfile.mkdtemp(prefix="mfc-ferret-"))
    server = FerretDB(data_dir, free_port(), Ledger())
    server.start()
    try:
        yield server
    finally:
        pid = server.process.pid if server.process else None
        server.stop()
        if pid is not None:
            assert not os.path.exists(f"/proc/{pid}/cmdline") or \
                b"ferretdb" not in open(f"/proc/{pid}/cmdline", "rb").read()
        shutil.rmtree(data_dir, ignore_errors=True)


def store_params() -> list:
    params = ["sqlite", "ferretdb"]
    if os.environ.get("MEGAFLEET_TEST_MONGO_URI"):
        params.append("mongodb")
    return params


@pytest.fixture(params=store_params())
def store(request, tmp_path):
    """Each store kind, empty, in its own database."""
    from megafleet.collect.stores import MongoStore, SqliteStore

    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "telemetry.sqlite")
    elif request.param == "ferretdb":
        s = MongoStore(request.getfixturevalue("ferretdb").uri)
    else:
        base = os.environ["MEGAFLEET_TEST_MONGO_URI"].rstrip("/")
        s = MongoStore(base, database=f"mfc{uuid.uuid4().hex[:8]}")
    try:
        yield s
    finally:
        if request.param != "sqlite":
            s.client.drop_database(s.db.name)
        s.close()
