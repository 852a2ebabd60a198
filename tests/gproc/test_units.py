"""Pure logic of gproc: framing, tree layout, inventory parsing, handler registry,
report folding. No SSH here (see test_fleet_live.py)."""

from __future__ import annotations

import pytest
import trio

from megafleet.gproc import handlers, inventory, protocol, tree
from megafleet.gproc.fleet import HostResult, Report


class Pipe:
    """An in-memory byte stream that hands out data in small, uneven pieces."""

    def __init__(self, data: bytes, piece: int = 7):
        self.data, self.piece = data, piece

    async def receive_some(self, max_bytes: int) -> bytes:
        out, self.data = self.data[:min(self.piece, max_bytes)], self.data[min(self.piece, max_bytes):]
        return out


def read_all(data: bytes, **limits):
    async def main():
        reader = protocol.FrameReader(Pipe(data), **limits)
        frames = []
        while (frame := await reader.read()) is not None:
            frames.append(frame)
        return frames
    return trio.run(main)


def test_frames_roundtrip_across_partial_reads():
    data = (protocol.encode({"t": "req", "id": "1", "argv": ["ls", "-l"]})
            + protocol.encode({"t": "chunk", "id": "1"}, b"\x00\xff" * 1000)
            + protocol.encode({"t": "end", "id": "1"}))
    frames = read_all(data)
    assert [h["t"] for h, _ in frames] == ["req", "chunk", "end"]
    assert frames[0][0]["argv"] == ["ls", "-l"]
    assert frames[1][1] == b"\x00\xff" * 1000


def test_frame_limits_are_enforced_before_reading():
    with pytest.raises(protocol.ProtocolError, match="payload of 11 bytes exceeds the limit of 10"):
        protocol.encode({"t": "chunk"}, b"x" * 11, max_payload=10)
    big = protocol.encode({"t": "chunk"}, b"x" * 100)
    with pytest.raises(protocol.ProtocolError, match="payload length 100 exceeds the limit of 50"):
        read_all(big, max_payload=50)
    header = protocol.encode({"t": "req", "pad": "y" * 200})
    with pytest.raises(protocol.ProtocolError, match="header length"):
        read_all(header, max_header=64)


def test_truncated_or_garbage_frames_are_errors():
    frame = protocol.encode({"t": "req"}, b"abc")
    with pytest.raises(protocol.ProtocolError, match="ended inside a frame"):
        read_all(frame[:-1])
    with pytest.raises(protocol.ProtocolError, match="not JSON"):
        read_all(protocol.PREFIX.pack(3, 0) + b"{{{")
    with pytest.raises(protocol.ProtocolError, match="string 't'"):
        read_all(protocol.PREFIX.pack(2, 0) + b"[]")
    with pytest.raises(protocol.ProtocolError, match="without a type"):
        protocol.encode({"id": 1})


def _hosts(n):
    return [{"name": f"h{i}"} for i in range(n)]


@pytest.mark.parametrize("n,fanout,depth", [(1, 8, 1), (8, 8, 1), (9, 8, 2), (64, 8, 2),
                                            (128, 8, 3), (128, 128, 1), (20, 4, 2), (4, 1, 4)])
def test_layout_covers_every_host_once_with_bounded_fanout(n, fanout, depth):
    subtrees = tree.layout(_hosts(n), fanout)
    names = [name for st in subtrees for name in tree.names(st)]
    assert sorted(names) == sorted(f"h{i}" for i in range(n))

    def widths(sts):
        yield len(sts)
        for st in sts:
            yield from widths(st["children"])
    assert max(widths(subtrees)) <= fanout
    assert tree.depth(subtrees) == depth


def test_layout_is_a_heap_with_few_inner_agents():
    subtrees = tree.layout(_hosts(20), 4)
    assert [st["host"]["name"] for st in subtrees] == ["h0", "h1", "h2", "h3"]
    assert [list(tree.names(st)) for st in subtrees][1] == ["h1", "h8", "h9", "h10", "h11"]
    assert tree.prune(subtrees[1], {"h9"}) and not tree.prune(subtrees[1], {"h0"})

    def inner(sts):
        return sum((1 if st["children"] else 0) + inner(st["children"]) for st in sts)
    # 128 hosts, fanout 8: 15 agents relay, 113 are leaves.
    assert inner(tree.layout(_hosts(128), 8)) == 15
    # A wider first level: 16 below the root, then 3 per agent.
    wide = tree.layout(_hosts(64), 3, root_fanout=16)
    assert len(wide) == 16 and [c["host"]["name"] for c in wide[0]["children"]] == ["h16", "h17", "h18"]
    assert sorted(n for st in wide for n in tree.names(st)) == sorted(f"h{i}" for i in range(64))
    assert tree.depth(wide) == 2 and inner(wide) == 16
    with pytest.raises(ValueError, match="fanout"):
        tree.layout(_hosts(3), 0)


GOOD = """
[defaults]
user = "root"
agent = "/opt/venv/bin/python -m megafleet agent"
identity = "keys/fleet"
known_hosts = "/etc/megafleet/known_hosts"

[[host]]
name = "n1"
address = "10.0.0.1"
labels = ["rack1", "gpu"]
capacity = 100

[[host]]
name = "n2"
address = "node2.example"
port = 2222
labels = ["rack1"]
agent = ["megafleet", "agent"]
"""


def test_inventory_parses_defaults_and_selection(tmp_path):
    inv = inventory.parse(GOOD, "hosts.toml", tmp_path)
    n1, n2 = inv.hosts
    assert n1.agent == ("/opt/venv/bin/python", "-m", "megafleet", "agent")
    assert n2.agent == ("megafleet", "agent") and n2.port == 2222 and n1.port == 22
    assert inv.identity == str(tmp_path / "keys/fleet")
    assert [h.name for h in inv.select(labels=["gpu"])] == ["n1"]
    assert [h.name for h in inv.select(names=["n2"], labels=["rack1"])] == ["n2"]
    with pytest.raises(inventory.InventoryError, match="no host named zz"):
        inv.select(names=["zz"])
    again = inventory.parse(inventory.render(list(inv.hosts), identity=inv.identity), "r.toml")
    assert again.hosts == inv.hosts


@pytest.mark.parametrize("text,message", [
    ('[[host]]\nname = "a"\naddress = "10.0.0.1"\nport = "22"',
     r"hosts.toml: host\[0\] \(a\).port: expected an integer 1-65535, got '22'"),
    ('[[host]]\naddress = "10.0.0.1"', r"host\[0\]: missing key 'name'"),
    ('[[host]]\nname = "a b"\naddress = "10.0.0.1"', r"host\[0\].name: invalid host name"),
    ('[[host]]\nname = "a"\naddress = "10.0.0.1"\ncolour = 1', r"host\[0\]: unknown key\(s\) colour"),
    ('[[host]]\nname = "a"\naddress = "10.0.0.1"\n[[host]]\nname = "a"\naddress = "10.0.0.2"',
     r"host\[1\].name: 'a' is already used by host\[0\]"),
    ('[[host]]\nname = "a"\naddress = "x;rm -rf"', r"host\[0\] \(a\).address: 'x;rm -rf' is neither"),
    ('[[host]]\nname = "a"\naddress = "10.0.0.1"\nagent = "\'unclosed"', r"\(a\).agent: cannot split"),
    ('[defaults]\nfanout = 3', r"defaults: unknown key\(s\) fanout"),
    ('[[host]\nname = "a"', r"hosts.toml: .*line 1"),
])
def test_inventory_errors_name_file_entry_and_key(text, message):
    with pytest.raises(inventory.InventoryError, match=message):
        inventory.parse(text, "hosts.toml")


def test_inventory_load_missing_file(tmp_path):
    with pytest.raises(inventory.InventoryError, match="cannot read inventory"):
        inventory.load(tmp_path / "nope.toml")


def test_handler_registry_and_module_names():
    @handlers.handler("test.double")
    async def double(payload, ctx):
        await ctx.emit({"seen": payload})
        return payload * 2

    events = []

    async def emit(data):
        events.append(data)

    fn = handlers.lookup("test.double")
    assert trio.run(fn, 21, handlers.Context("h1", emit)) == 42
    assert events == [{"seen": 21}]
    assert "gproc.ping" in handlers.known()
    assert handlers.lookup("test.double", ["json"]) is double      # named modules are imported first
    with pytest.raises(handlers.UnknownHandler, match="no handler named 'test.nope'"):
        handlers.lookup("test.nope")
    with pytest.raises(handlers.UnknownHandler, match="invalid handler module name"):
        handlers.lookup("test.double", ["os; rm"])
    assert handlers.expand_dest("/srv/{host}/img", "n1") == "/srv/n1/img"


def test_report_gathers_identical_outputs_like_clush():
    results = {
        "a": HostResult("a", "ok", rc=0, stdout=b"5.10\n"),
        "b": HostResult("b", "ok", rc=0, stdout=b"5.10\n"),
        "c": HostResult("c", "ok", rc=0, stdout=b"6.1\n"),
        "d": HostResult("d", "unreachable", error="no route"),
    }
    report = Report("exec", results, 1.0)
    assert report.gathered() == [(["a", "b"], "5.10\n"), (["c"], "6.1\n"), (["d"], "[unreachable] no route\n")]
    assert report.counts() == {"ok": 3, "failed": 0, "unreachable": 1}
    assert not report.ok and report.hosts("ok") == ["a", "b", "c"]
    assert report.to_json()["hosts"]["a"]["stdout"] == "5.10\n"
