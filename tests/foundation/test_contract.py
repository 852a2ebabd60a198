import pytest

from megafleet.imagegen.contract import (AgentLine, BadLine, GuestConfig, NicConfig,
                                         ReadyLine, parse_line)


def test_ready_line_parses_through_console_noise():
    line = "\r[    3.1] MEGAFLEET-READY name=web1 uptime=3.42\r"
    parsed = parse_line(line)
    assert parsed == ReadyLine("web1", 3.42, {"name": "web1", "uptime": "3.42"})


def test_agent_line_parses_all_fields():
    line = ("MEGAFLEET-AGENT v=1 name=web1 seq=7 up=73.10 load=0.00,0.01,0.50 "
            "mem=60212,48712,51200 if=eth0:1280:12:980:9,lo:0:0:0:0 "
            "addr=eth0:10.0.0.5/24,eth0:fd00::5/64 extra=kept")
    parsed = parse_line(line)
    assert isinstance(parsed, AgentLine)
    assert parsed.name == "web1" and parsed.seq == 7 and parsed.uptime == 73.10
    assert parsed.load == (0.0, 0.01, 0.5)
    assert (parsed.mem_total_kb, parsed.mem_free_kb, parsed.mem_available_kb) == (60212, 48712, 51200)
    assert parsed.interfaces["eth0"].rx_bytes == 1280
    assert parsed.interfaces["eth0"].tx_packets == 9
    assert parsed.addresses["eth0"] == ("10.0.0.5/24", "fd00::5/64")
    assert parsed.fields["extra"] == "kept"


def test_unmarked_lines_are_ignored_and_bad_marked_lines_raise():
    assert parse_line("[    0.000000] Linux version 6.1.0") is None
    with pytest.raises(BadLine, match="malformed MEGAFLEET-AGENT"):
        parse_line("MEGAFLEET-AGENT v=1 name=x up=notanumber")


def test_kernel_args_are_validated_and_stable():
    cfg = GuestConfig(name="web1",
                      nics=(NicConfig("52:54:00:AA:00:01", ("10.0.0.5/24",), mtu=1450),),
                      gateway="10.0.0.1", routes=(("10.9.0.0/16", "10.0.0.254"),),
                      agent_interval=2)
    assert cfg.kernel_args() == [
        "megafleet.name=web1",
        "megafleet.net=52:54:00:aa:00:01,10.0.0.5/24,mtu=1450",
        "megafleet.gw=10.0.0.1",
        "megafleet.route=10.9.0.0/16,10.0.0.254",
        "megafleet.agent=2",
    ]
    with pytest.raises(ValueError, match="invalid guest name"):
        GuestConfig(name="a b; rm -rf /").kernel_args()
    with pytest.raises(ValueError, match="invalid MAC"):
        GuestConfig(name="x", nics=(NicConfig("zz"),)).kernel_args()
