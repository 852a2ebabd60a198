"""Pure checks of the container network messages (megafleet.vm.cnet) and of the
request the container driver sends its launcher."""

from __future__ import annotations

import socket
import struct

from megafleet.imagegen.contract import GuestConfig, NicConfig
from megafleet import rtnl
from megafleet.vm import cnet
from megafleet.vm.container_driver import net_request
from megafleet.vm.spec import GuestSpec, NicSpec


def _attrs(msg: bytes, header: int) -> dict[int, bytes]:
    out, offset = {}, 16 + header
    while offset + 4 <= len(msg):
        length, kind = struct.unpack_from("=HH", msg, offset)
        out[kind] = msg[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def test_move_message_carries_namespace_name_mac_mtu_and_up():
    msg = cnet.move_message(7, 42, "eth0", "52:54:00:aa:bb:cc", 3, up=True, mtu=1400)
    length, kind, flags, seq, _ = struct.unpack_from("=LHHLL", msg)
    assert length == len(msg) and kind == rtnl.RTM_NEWLINK and seq == 3
    assert flags & rtnl.NLM_F_ACK
    _, _, index, iflags, change = struct.unpack_from("=BxHiII", msg, 16)
    assert (index, iflags, change) == (7, rtnl.IFF_UP, rtnl.IFF_UP)
    attrs = _attrs(msg, 16)
    assert struct.unpack("=I", attrs[rtnl.IFLA_NET_NS_FD])[0] == 42
    assert attrs[rtnl.IFLA_IFNAME] == b"eth0\0"
    assert attrs[rtnl.IFLA_ADDRESS] == bytes.fromhex("525400aabbcc")
    assert struct.unpack("=I", attrs[rtnl.IFLA_MTU])[0] == 1400
    down = cnet.move_message(7, 42, "eth0", "52:54:00:aa:bb:cc", 1)
    assert struct.unpack_from("=BxHiII", down, 16)[3:] == (0, 0) and rtnl.IFLA_MTU not in _attrs(down, 16)


def test_addr_and_route_messages():
    v4 = cnet.addr_message(5, "10.1.2.3/22", 1)
    family, plen, _, _, index = struct.unpack_from("=BBBBI", v4, 16)
    assert (family, plen, index) == (socket.AF_INET, 22, 5)
    assert _attrs(v4, 8)[rtnl.IFA_LOCAL] == bytes([10, 1, 2, 3])
    v6 = cnet.addr_message(5, "fd00::7/64", 2)
    assert struct.unpack_from("=BB", v6, 16) == (socket.AF_INET6, 64)
    assert struct.unpack("=I", _attrs(v6, 8)[rtnl.IFA_FLAGS])[0] == rtnl.IFA_F_NODAD
    default = cnet.route_message(None, "10.1.0.1", 3)
    assert struct.unpack_from("=BB", default, 16) == (socket.AF_INET, 0)
    assert rtnl.RTA_DST not in _attrs(default, 12)
    route = cnet.route_message("10.99.0.0/16", "10.1.0.1", 4)
    attrs = _attrs(route, 12)
    assert attrs[rtnl.RTA_DST] == bytes([10, 99, 0, 0]) and attrs[rtnl.RTA_GATEWAY] == bytes([10, 1, 0, 1])


def test_net_request_matches_nics_to_their_config_by_mac():
    spec = GuestSpec(name="c1", image="tiny", driver="container",
                     nics=[NicSpec(mac="52:54:00:00:00:02", kind="veth", ifname="h1", peer="p1"),
                           NicSpec(mac="52:54:00:00:00:01", kind="veth", ifname="h0", peer="p0")],
                     config=GuestConfig(name="c1", nics=(NicConfig("52:54:00:00:00:01", ("10.0.0.2/24",), 1400),),
                                        gateway="10.0.0.1", routes=(("10.9.0.0/16", "10.0.0.1"),),
                                        forward=True))
    req = net_request(spec)
    assert req["nics"] == [
        {"dev": "p1", "name": "eth0", "mac": "52:54:00:00:00:02", "bridge": None, "addresses": [], "mtu": None},
        {"dev": "p0", "name": "eth1", "mac": "52:54:00:00:00:01", "bridge": None, "addresses": ["10.0.0.2/24"],
         "mtu": 1400}]
    config = cnet.NetConfig.from_json(req)
    assert config.gateway == "10.0.0.1" and config.routes == (("10.9.0.0/16", "10.0.0.1"),) and config.forward
    assert config.nics[1] == cnet.Nic("p0", "eth1", "52:54:00:00:00:01", ("10.0.0.2/24",), 1400)


def test_no_ipv6_link_local_address_is_the_links_own_setting():
    """addrgenmode none on the link (IFLA_AF_SPEC / AF_INET6), not the
    addr_gen_mode sysctl, whose write spins on the rtnl lock."""
    msg = cnet.no_ipv6_ll_message(7, 1)
    spec = _attrs(msg, 16)[rtnl.IFLA_AF_SPEC | rtnl.NLA_F_NESTED]
    length, kind = struct.unpack_from("=HH", spec)
    assert kind == socket.AF_INET6 | rtnl.NLA_F_NESTED and length == len(spec)
    _, inner_kind = struct.unpack_from("=HH", spec, 4)
    assert (inner_kind, spec[8]) == (cnet.IFLA_INET6_ADDR_GEN_MODE, cnet.IN6_ADDR_GEN_MODE_NONE)
    assert struct.unpack_from("=BxHiII", msg, 16)[2:] == (7, 0, 0)      # the link stays down


def test_veth_message_creates_the_far_end_inside_the_namespace():
    msg = cnet.veth_message("mfh1", 9, "eth0", "52:54:00:aa:bb:cc", 42, 5, mtu=1400)
    length, kind, flags, seq, _ = struct.unpack_from("=LHHLL", msg)
    assert length == len(msg) and kind == rtnl.RTM_NEWLINK and seq == 5
    assert flags & rtnl.NLM_F_CREATE and flags & rtnl.NLM_F_EXCL
    assert struct.unpack_from("=BxHiII", msg, 16)[2:] == (0, 0, 0)      # down unless asked
    up = cnet.veth_message("mfh1", 9, "eth0", "52:54:00:aa:bb:cc", 42, 5, up=True)
    assert struct.unpack_from("=BxHiII", up, 16)[2:] == (0, rtnl.IFF_UP, rtnl.IFF_UP)
    attrs = _attrs(msg, 16)
    assert attrs[rtnl.IFLA_IFNAME] == b"mfh1\0" and struct.unpack("=I", attrs[rtnl.IFLA_MASTER])[0] == 9
    info = _attrs(b"\0" * 16 + attrs[rtnl.IFLA_LINKINFO | rtnl.NLA_F_NESTED], 0)
    assert info[rtnl.IFLA_INFO_KIND] == b"veth\0"
    peer = _attrs(b"\0" * 16 + info[rtnl.IFLA_INFO_DATA | rtnl.NLA_F_NESTED], 0)[cnet.VETH_INFO_PEER]
    peer_attrs = _attrs(b"\0" * 16 + peer, 16)          # after the peer's own ifinfomsg
    assert peer_attrs[rtnl.IFLA_IFNAME] == b"eth0\0"
    assert peer_attrs[rtnl.IFLA_ADDRESS] == bytes.fromhex("525400aabbcc")
    assert struct.unpack("=I", peer_attrs[rtnl.IFLA_NET_NS_FD])[0] == 42
    assert struct.unpack("=I", peer_attrs[rtnl.IFLA_MTU])[0] == 1400
    for a in (attrs, peer_attrs):       # one queue each way from the start: no cut, no grace period
        assert struct.unpack("=I", a[rtnl.IFLA_NUM_TX_QUEUES])[0] == struct.unpack("=I", a[rtnl.IFLA_NUM_RX_QUEUES])[0] == 1
