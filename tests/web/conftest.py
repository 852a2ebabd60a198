"""Fixtures of the web tests: a real testbed (a small campus on containers, OSPF
routers in namespaces, one QEMU guest) brought up with `megafleet up`, and a real
`megafleet web` server on a free loopback port in front of it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.up.conftest import REPO, TAG, links_in, megafleet, megafleet_json, netns_with

TESTBED = f"mfw{TAG}"

# The campus example, smaller (staff and lab LANs of 3), plus one QEMU guest in the DMZ.
FLEET = (REPO / "examples" / "campus-ospf.fleet").read_text().replace(
    'image tiny from "images/tiny.toml"', f'image tiny from "{REPO}/examples/images/tiny.toml"'
) + "\nvm q1 image tiny mem 128M on dmz\n"

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """`megafleet web` as a user runs it: a child process; `info` is its --json line.
    `base` is the URL to reach it by (https when it was given --cert)."""

    def __init__(self, *args: str):
        if "--listen" not in args:
            args = ("--listen", f"127.0.0.1:{free_port()}", *args)
        self.listen = args[args.index("--listen") + 1]
        # Its log goes to a file: a pipe nobody reads would stop the server when full.
        self.log = tempfile.NamedTemporaryFile(prefix="mfw-log-", suffix=".txt")
        self.proc = subprocess.Popen([sys.executable, "-m", "megafleet", "web", "--json", "--poll", "0.5", *args],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"megafleet web did not start: {Path(self.log.name).read_text()}")
        self.info = json.loads(line)
        scheme = "https" if "--cert" in args else "http"
        self.base = f"{scheme}://127.0.0.1:{self.listen.rsplit(':', 1)[1]}"
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", int(self.listen.rsplit(":", 1)[1])), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("megafleet web is not listening")
                time.sleep(0.1)

    def bearer(self, level: str) -> dict[str, str]:
        """The Authorization header of the token it made for `level` (read, control, exec)."""
        return {"Authorization": f"Bearer {self.info['tokens'][level]}"}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="package")
def campus(tmp_path_factory):
    """The testbed, up; torn down after the package's tests, and checked gone."""
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, containers, QEMU)")
    path = tmp_path_factory.mktemp("web") / "campus.fleet"
    path.write_text(FLEET)
    try:
        r = megafleet("up", str(path), "-N", TESTBED, "-D", "staff=3", "-D", "lab=3", "--no-ksm",
                      "--boot-timeout", "120", "--json", check=False, timeout=600)
        try:
            summary = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"megafleet up failed:\n{r.stderr[-3000:]}") from None
        assert summary["ready"] == summary["guests"], summary
        yield {"path": path, "summary": summary}
    finally:
        megafleet("down", TESTBED, check=False)
    assert netns_with(TESTBED) == [] and links_in(None, TESTBED) == []
    from megafleet.vm.engine import Engine
    assert [v.name for v in Engine().list("*") if v.name.startswith(("q1", "pc", "lab", "www"))] == []


@pytest.fixture(scope="package")
def server(campus):
    web = WebServer()
    yield web
    web.stop()
