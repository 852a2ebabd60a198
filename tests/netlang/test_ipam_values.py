"""Pure helpers: address arithmetic, pools, value parsing."""

from __future__ import annotations

import pytest

from megafleet.netlang import ipam, values


def test_subnet_parsing_and_capacity():
    s = ipam.parse_subnet("10.0.0.0/24")
    assert (s.family, s.plen, s.capacity(), ipam.fmt(4, s.first_host())) == (4, 24, 254, "10.0.0.1")
    assert ipam.parse_subnet("10.0.0.0/31").capacity() == 2
    assert ipam.parse_subnet("fd00::/64").capacity() == 2**64 - 1
    assert "host bits set" in ipam.parse_subnet("10.0.0.1/24")
    assert "not a subnet" in ipam.parse_subnet("10.0.0.0")


def test_addresses():
    assert ipam.parse_addr("10.0.0.5/24") == (4, 0x0A000005, 24)
    assert ipam.parse_addr("fd00::1") == (6, 0xFD00 << 112 | 1, None)
    assert ipam.parse_addr("10.0.0.5/33") is None
    assert ipam.looks_like_address("10.0.0.1") and not ipam.looks_like_address("lan1")


def test_pool_allocation_is_aligned_and_skips_taken_ranges():
    pool = ipam.Pool("p", ipam.parse_subnet("10.0.0.0/22"), 24)
    taken = ipam.Taken()
    fixed = ipam.parse_subnet("10.0.1.0/24")
    taken.add(fixed.net, fixed.last)
    got = [str(pool.allocate(24, taken)) for _ in range(3)]
    assert got == ["10.0.0.0/24", "10.0.2.0/24", "10.0.3.0/24"]
    assert pool.allocate(24, taken) is None
    small = ipam.Pool("q", ipam.parse_subnet("10.1.0.0/24"), 24)
    t = ipam.Taken()
    assert str(small.allocate(30, t)) == "10.1.0.0/30"
    assert str(small.allocate(26, t)) == "10.1.0.64/26"     # aligned, not 10.1.0.4


@pytest.mark.parametrize("text,mib", [("64M", 64), ("1G", 1024), ("512", 512), ("2GiB", 2048)])
def test_sizes(text, mib):
    assert values.mem_mib(text) == mib


def test_rates_durations_percentages():
    assert values.rate_bit("100mbit") == 100_000_000
    assert values.rate_bit("1gbit") == 10**9
    assert values.rate_bit("10mbps") == 80_000_000
    assert values.duration_us("20ms") == 20_000 and values.duration_us("1.5s") == 1_500_000
    assert values.percent("0.1%") == 0.1
    for bad, fn in (("fast", values.rate_bit), ("20", values.duration_us), ("120%", values.percent),
                    ("64Q", values.mem_mib)):
        with pytest.raises(ValueError):
            fn(bad)
