"""Pure checks of the host-side container telemetry (megafleet.collect.containers)
against a fake /proc tree: the agent document it makes, per-guest intervals,
guests that are gone."""

from __future__ import annotations

from pathlib import Path

from megafleet.collect.containers import (ContainerInfo, ContainerSampler, parse_if_inet6,
                                          parse_net_dev)
from megafleet.collect.samplers import CLOCK_TICKS

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
  eth0:    5000      40    0    0    0     0          0         0     3000      30    0    0    0     0       0          0
"""
IF_INET6 = ("00000000000000000000000000000001 01 80 10 80       lo\n"
            "fe80000000000000505400fffe000001 02 40 20 80     eth0\n")


def _stat(pid: int, ticks: tuple[int, int, int, int], start: int, rss: int) -> str:
    fields = ["S"] + ["0"] * 10 + [str(t) for t in ticks] + ["0"] * 4 + [str(start), "0", str(rss)]
    return f"{pid} (init) " + " ".join(fields) + " 0 0\n"


def _fake_proc(tmp: Path) -> Path:
    proc = tmp / "proc"
    (proc / "100" / "net").mkdir(parents=True)
    (proc / "100" / "task" / "100").mkdir(parents=True)
    (proc / "101" / "task" / "101").mkdir(parents=True)
    (proc / "uptime").write_text("1000.00 1500.00\n")
    (proc / "loadavg").write_text("0.50 0.25 0.10 1/100 200\n")
    (proc / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 400 kB\nMemAvailable: 600 kB\n")
    (proc / "100" / "stat").write_text(_stat(100, (10, 5, 3, 2), 90000, 50))
    (proc / "100" / "net" / "dev").write_text(NET_DEV)
    (proc / "100" / "net" / "if_inet6").write_text(IF_INET6)
    (proc / "100" / "task" / "100" / "children").write_text("101 ")
    (proc / "101" / "stat").write_text(_stat(101, (1, 1, 0, 0), 90010, 10))
    (proc / "101" / "task" / "101" / "children").write_text("")
    return proc


def test_parsers():
    stats = parse_net_dev(NET_DEV)
    assert stats["eth0"].rx_bytes == 5000 and stats["eth0"].tx_packets == 30 and stats["lo"].rx_packets == 2
    assert parse_if_inet6(IF_INET6) == {"lo": ("::1/128",), "eth0": ("fe80::5054:ff:fe00:1/64",)}


def test_agent_document_from_the_host(tmp_path):
    proc = _fake_proc(tmp_path)
    guests = [ContainerInfo("c1", 100, 90000, 5.0, {"eth0": ("10.0.0.2/24",)}),
              ContainerInfo("off", 100, 90000, 0.0),           # agent disabled: nothing
              ContainerInfo("gone", 100, 12345, 5.0)]          # pid reused: nothing
    sampler = ContainerSampler("h1", lambda: guests, interval=5.0, proc=proc)
    (doc,) = sampler.sample(1_000_000)
    assert doc["meta"] == {"kind": "agent", "host": "h1", "guest": "c1"}
    assert doc["_id"] == "agent:h1:c1:0:1000000"
    assert doc["seq"] == 0 and doc["source"] == "host"
    assert doc["up_s"] == round(1000.0 - 90000 / CLOCK_TICKS, 2)
    assert (doc["load1"], doc["load5"], doc["load15"]) == (0.5, 0.25, 0.1)
    assert (doc["mem_total_kb"], doc["mem_free_kb"], doc["mem_available_kb"]) == (1000, 400, 600)
    assert doc["ifaces"]["eth0"] == {"rx_bytes": 5000, "rx_packets": 40, "tx_bytes": 3000, "tx_packets": 30}
    assert doc["addresses"] == {"lo": "127.0.0.1/8,::1/128", "eth0": "10.0.0.2/24,fe80::5054:ff:fe00:1/64"}
    assert doc["cpu_s"] == round((10 + 5 + 3 + 2 + 1 + 1) / CLOCK_TICKS, 3)
    assert doc["rss_kb"] > 0
    # Its interval is 5 s: nothing at the next tick of a 1 s sampler, then seq 1.
    assert sampler.sample(1_001_000) == []
    (again,) = sampler.sample(1_005_000)
    assert again["seq"] == 1
