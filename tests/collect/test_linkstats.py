"""The rtnetlink link dump, on real interfaces in a namespace of its own (the
child process's: its links go with it, nothing is left on the host)."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys

import pytest

from megafleet.collect.linkstats import parse_links

CHILD = r"""
import json, subprocess
from megafleet.collect.linkstats import read_links
run = lambda *a: subprocess.run(a, check=True, capture_output=True)
run("ip", "link", "set", "lo", "up")
run("ip", "link", "add", "mflk-br", "type", "bridge")
run("ip", "link", "add", "mflk-v0", "type", "veth", "peer", "name", "mflk-v1")
run("ip", "link", "set", "mflk-v0", "master", "mflk-br")
run("ip", "tuntap", "add", "mode", "tap", "mflk-tap")
run("ip", "tuntap", "add", "mode", "tun", "mflk-tun")
run("ip", "link", "add", "mflk-vx", "type", "vxlan", "id", "42", "dstport", "4789", "local", "127.0.0.1")
batch = "".join(f"link add mflk-p{n} type veth peer name mflk-q{n}\n" for n in range(1, PAIRS + 1))
subprocess.run(["ip", "-batch", "-"], input=batch.encode(), check=True, capture_output=True)
run("ping", "-c", "3", "-i", "0.2", "-q", "127.0.0.1")
print(json.dumps([[l.index, l.name, l.kind, l.rx_packets, l.tx_packets, l.rx_bytes, l.tx_bytes]
                  for l in read_links()]))
"""


def _in_own_netns(pairs: int) -> list:
    code = f"PAIRS = {pairs}\n" + CHILD
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_every_link_with_its_kind_and_counters():
    links = {name: (index, kind, rxp, txp, rxb, txb)
             for index, name, kind, rxp, txp, rxb, txb in _in_own_netns(1)}
    assert {name: v[1] for name, v in links.items()} == {
        "lo": "other", "mflk-br": "bridge", "mflk-v0": "veth", "mflk-v1": "veth",
        "mflk-tap": "tap", "mflk-tun": "tun", "mflk-vx": "vxlan",
        "mflk-p1": "veth", "mflk-q1": "veth"}
    # Three pings to 127.0.0.1 and their replies: six packets each way on lo.
    _, _, rxp, txp, rxb, txb = links["lo"]
    assert rxp == txp >= 6 and rxb == txb >= 6 * 84
    assert sorted(v[0] for v in links.values()) == [v[0] for v in links.values()]  # index order


def test_a_dump_longer_than_one_read():
    links = _in_own_netns(600)      # ~1.5 KB each: some 60 reads of 32 KiB
    assert len(links) == 7 + 1200
    assert len({index for index, *_ in links}) == len(links)


def test_an_error_message_raises_with_the_kernel_reason():
    # NLMSG_ERROR carrying -EPERM, as the kernel answers a refused dump.
    message = struct.pack("=LHHLLi", 36, 2, 0, 1, 0, -errno.EPERM) + b"\0" * 16
    with pytest.raises(OSError) as refused:
        parse_links(message)
    assert refused.value.errno == errno.EPERM
    done = struct.pack("=LHHLLi", 20, 3, 0, 1, 0, 0)
    assert parse_links(done) == ([], True)
