"""The guest daemon (megafleet/imagegen/guest/guestd.c) as imagegen builds it:
static, byte-identical from the same source, agent lines in the contract's
format, and no process left when it has nothing to serve. Run on the host (the
daemon reads /proc and /sys like in a guest); the guest side is tested by the
boot tests and tests/vm (agent lines, exec round trips, idle CPU)."""

from __future__ import annotations

import struct
import subprocess
import time

from megafleet.imagegen import build
from megafleet.imagegen.contract import AgentLine, parse_line


def _built(tmp_path):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    data = build.build_guestd(work)
    assert list(work.iterdir()) == []          # sources and outputs removed
    return data


def test_static_and_reproducible(tmp_path):
    first, second = _built(tmp_path), _built(tmp_path)
    assert first == second
    assert first[:5] == b"\x7fELF\x02"         # ELF, 64-bit
    # Static: no program header of type PT_INTERP (3), so no dynamic loader.
    phoff, = struct.unpack_from("<Q", first, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", first, 0x36)
    types = [struct.unpack_from("<I", first, phoff + i * phentsize)[0] for i in range(phnum)]
    assert types and 3 not in types


def test_agent_lines_follow_the_contract(tmp_path):
    binary = tmp_path / "guestd"
    binary.write_bytes(_built(tmp_path))
    binary.chmod(0o755)
    (tmp_path / "agent").symlink_to("guestd")   # the name decides the role
    proc = subprocess.Popen([str(tmp_path / "agent"), "mfi-gd", "0.2", "container"],
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.kill()
        proc.wait()
    parsed = [parse_line(line) for line in lines]
    assert all(isinstance(p, AgentLine) and p.name == "mfi-gd" for p in parsed)
    assert [p.seq for p in parsed] == [0, 1, 2]
    assert parsed[0].mem_total_kb > 0 and parsed[0].uptime > 0
    lo = parsed[-1]
    assert "lo" in lo.interfaces and "127.0.0.1/8" in lo.addresses["lo"]
    assert "lo:65536" in lo.fields["mtu"].split(",")
    assert all(" " not in v for v in lo.fields.values())


def test_nothing_to_serve_exits_at_once(tmp_path):
    # Agent interval 0 and no exec port (the host has no virtio ports): no
    # process stays behind in such a guest.
    binary = tmp_path / "guestd"
    binary.write_bytes(_built(tmp_path))
    binary.chmod(0o755)
    t = time.monotonic()
    r = subprocess.run([str(binary), "mfi-gd", "0"], capture_output=True, timeout=10)
    assert r.returncode == 0 and time.monotonic() - t < 5
