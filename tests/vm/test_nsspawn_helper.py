"""The container helper (megafleet/vm/nsspawn.py) when its engine stops reading
it (Ctrl-C or SIGTERM of `up`): it finishes the launches under way and exits,
with no traceback on the user's terminal, and no launcher runs the helper's
own loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megafleet.vm.container_driver import NSSPAWN


def test_helper_whose_engine_is_gone_finishes_quietly(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (PID namespaces)")
    helper = subprocess.Popen([sys.executable, str(NSSPAWN)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    helper.stdout.close()            # the engine is gone: nobody reads the answers
    # A launch that fails (no such root file system): the helper has an error
    # it can no longer pass on.
    reqs = [{"id": f"mfvh{i}", "gdir": str(tmp_path / f"g{i}"), "cmdline": "mf.test=1",
             "init": "/nonexistent/init", "hostname": f"mfvh{i}", "lower": str(tmp_path / "nothing")}
            for i in range(3)]
    helper.stdin.write(b"".join(json.dumps(r).encode() + b"\n" for r in reqs))
    helper.stdin.close()
    assert helper.wait(timeout=60) == 0
    err = helper.stderr.read().decode(errors="replace")
    helper.stderr.close()
    assert "Traceback" not in err and "Error" not in err, err
    # Each launch ran to its end (up to its console) and none started an init:
    # the root file system is mounted before the init is spawned.
    for r in reqs:
        assert (tmp_path / r["gdir"] / "console.log").exists()
        assert not (tmp_path / r["gdir"] / "pid").exists()
