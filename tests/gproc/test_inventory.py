"""Host ranges in ClusterShell's NodeSet notation, Slurm allocations, and the
folded report of `hosts check` (pure logic; the live range test is in
test_inventory_live.py)."""

from __future__ import annotations

import pytest

from megafleet.gproc import inventory
from megafleet.gproc.cli import CheckRow, check_rows, fold_rows, reason
from megafleet.gproc.fleet import HostResult, Report


def fake_resolver(name: str) -> str:
    # Stands for DNS in these unit tests only: names are not resolvable here.
    return "192.0.2." + str(sum(map(ord, name)) % 250 + 1)


RANGES = """\
[defaults]
user = "root"
capacity = 4

[[range]]
hosts = "node[0001-0004]"
address = "10.1.0.[11-14]"
labels = ["a"]

[[range]]
hosts = "rack[1-2]-n[01-03]"
capacity = 32
mem_mb = 65536

[[host]]
name = "lone"
address = "10.9.9.9"
"""


def test_nodeset_ranges_expand_with_per_range_defaults(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text(RANGES)
    inv = inventory.parse(path.read_text(), str(path), resolver=fake_resolver)
    names = [h.name for h in inv.hosts]
    assert names == ["lone", "node0001", "node0002", "node0003", "node0004",
                     "rack1-n01", "rack1-n02", "rack1-n03", "rack2-n01", "rack2-n02", "rack2-n03"]
    by = inv.by_name
    assert [by[f"node000{i}"].address for i in range(1, 5)] == [f"10.1.0.{10 + i}" for i in range(1, 5)]
    assert by["node0003"].labels == ("a",) and by["node0003"].capacity == 4      # file default
    assert by["rack2-n03"].capacity == 32 and by["rack2-n03"].mem_mb == 65536    # range default
    assert by["rack1-n02"].address == fake_resolver("rack1-n02")                 # resolved by name
    assert by["lone"].capacity == 4 and by["lone"].mem_mb == 0
    assert inventory.fold(names[1:5]) == "node[0001-0004]"
    assert inventory.expand("rack[1-4]-n[01-32]")[:2] == ["rack1-n01", "rack1-n02"]
    assert len(inventory.expand("rack[1-4]-n[01-32]")) == 128


@pytest.mark.parametrize("bad, why", [
    ('hosts = "node[0001-"', "missing bracket"),
    ('hosts = "node[9-3]"', "bad range"),
])
def test_a_bad_range_names_file_line_and_range(tmp_path, bad, why):
    path = tmp_path / "hosts.toml"
    path.write_text(f'[defaults]\nuser = "root"\n\n[[range]]\ncapacity = 2\n{bad}\n')
    with pytest.raises(inventory.InventoryError) as e:
        inventory.load(path)
    text = str(e.value)
    assert text.startswith(f"{path}:6: range[0].hosts: bad host range ")
    assert bad.split("= ")[1].strip('"') in text and why in text


def test_address_count_must_match_and_names_must_be_unique(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text('[[range]]\nhosts = "n[1-3]"\naddress = "10.0.0.[1-2]"\n')
    with pytest.raises(inventory.InventoryError, match=r":2: range\[0\]: 3 hosts \(n\[1-3\]\) but 2 addresses"):
        inventory.load(path)
    path.write_text('[[host]]\nname = "n2"\naddress = "10.0.0.9"\n\n'
                    '[[range]]\nhosts = "n[1-3]"\naddress = "10.0.0.[1-3]"\n')
    with pytest.raises(inventory.InventoryError, match=r":5: range\[0\]: host 'n2' is already given by host\[0\]"):
        inventory.load(path)
    path.write_text('[[range]]\nhosts = "n[1-2]"\naddress = "10.0.0.[1-2]"\ncolour = "red"\n')
    with pytest.raises(inventory.InventoryError, match=r":1: range\[0\]: unknown key\(s\) colour"):
        inventory.load(path)


SLURM = {"SLURM_JOB_NODELIST": "cn[001-003],gpu7", "SLURM_JOB_CPUS_PER_NODE": "16(x3),64",
         "SLURM_CPUS_ON_NODE": "16", "SLURM_MEM_PER_NODE": "128000"}


def test_a_fake_slurm_allocation_expands_to_its_hosts():
    inv = inventory.from_slurm(SLURM, resolver=fake_resolver)
    assert [h.name for h in inv.hosts] == ["cn001", "cn002", "cn003", "gpu7"]
    assert [h.capacity for h in inv.hosts] == [16 * inventory.GUESTS_PER_CPU] * 3 + [64 * inventory.GUESTS_PER_CPU]
    assert {h.mem_mb for h in inv.hosts} == {128000}
    assert inv.by_name["gpu7"].address == fake_resolver("gpu7")
    # Only SLURM_CPUS_ON_NODE: the same for every node.
    inv = inventory.from_slurm({"SLURM_JOB_NODELIST": "cn[1-2]", "SLURM_CPUS_ON_NODE": "8"}, resolver=fake_resolver)
    assert [h.capacity for h in inv.hosts] == [8 * inventory.GUESTS_PER_CPU] * 2
    with pytest.raises(inventory.InventoryError, match="SLURM_JOB_NODELIST is not set"):
        inventory.from_slurm({}, resolver=fake_resolver)
    with pytest.raises(inventory.InventoryError, match=r"SLURM_JOB_NODELIST: bad host range 'cn\[1-'"):
        inventory.from_slurm({"SLURM_JOB_NODELIST": "cn[1-"}, resolver=fake_resolver)


def test_the_inventory_file_overrides_what_slurm_says(tmp_path, monkeypatch):
    path = tmp_path / "site.toml"
    path.write_text('[defaults]\nuser = "mf"\nidentity = "key"\n\n'
                    '[[range]]\nhosts = "cn[002-003]"\naddress = "10.2.0.[2-3]"\ncapacity = 500\n')
    inv = inventory.from_slurm(SLURM, str(path), resolver=fake_resolver)
    assert [h.user for h in inv.hosts] == ["mf"] * 4
    assert inv.identity == str(tmp_path / "key")
    assert inv.by_name["cn001"].capacity == 16 * inventory.GUESTS_PER_CPU     # from Slurm
    assert inv.by_name["cn002"].capacity == 500                              # the file's
    assert inv.by_name["cn003"].address == "10.2.0.3"
    # `--hosts slurm` goes through load(), reading the real environment.
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "2")
    inv = inventory.load("slurm")
    assert [(h.name, h.address, h.capacity) for h in inv.hosts] == [("localhost", "127.0.0.1",
                                                                      2 * inventory.GUESTS_PER_CPU)]


def test_up_offers_use_the_ranges_capacity_and_memory(tmp_path):
    from megafleet.up import Target

    path = tmp_path / "hosts.toml"
    path.write_text('[[range]]\nhosts = "n[1-3]"\naddress = "10.0.0.[1-3]"\ncapacity = 7\nmem_mb = 3000\n')
    offers = Target(str(path)).offers()
    assert [(o.name, o.capacity, o.mem_mb) for o in offers] == [(f"n{i}", 7, 3000) for i in (1, 2, 3)]


def test_hosts_check_folds_equal_causes_over_ranges():
    names = [f"node{i:04d}" for i in range(1, 13)]
    inv = inventory.Inventory(tuple(inventory.Host(n, f"10.0.0.{i}") for i, n in enumerate(names, 1)))
    results = {n: HostResult(n, "ok", value={"load": 0.1, "uname": "Linux"}) for n in names}
    for i in (3, 4, 5, 9):
        n = names[i - 1]
        results[n] = HostResult(n, "unreachable",
                                f"{n} (root@10.0.0.{i}:22): Connect call failed ('10.0.0.{i}', 22)")
    results[names[6]] = HostResult(names[6], "unreachable",
                                   f"{names[6]} (root@10.0.0.7:22): host key not trusted (Host key is "
                                   "not trusted for host 10.0.0.7); it is not in known_hosts: refusing to connect")
    ping = Report("call", results, 1.0)
    ok = [n for n, r in results.items() if r.status == "ok"]
    have = Report("call", {n: HostResult(n, "ok", value=["abc123def4567890"] if n in names[:2] else [])
                           for n in ok}, 1.0)

    class Img:
        name, hash = "tiny", "abc123def4567890"

    rows = fold_rows(check_rows(inv, ping, have, [Img()]))
    table = [(inventory.fold(r.hosts), r.status, r.detail) for r in rows]
    assert table == [
        ("node[0006,0008,0010-0012]", "ok", "answered"),
        ("node[0003-0005,0009]", "unreachable", "connection refused"),
        ("node[0001-0002]", "image", "missing tiny (abc123def456)"),
        ("node0007", "unreachable", "host key changed or unknown (not in known_hosts)"),
    ]
    assert reason("n1", "10.0.0.1", "n1 (root@10.0.0.1:22): SSH disconnected: bye from 10.0.0.1") == \
        "SSH disconnected: bye from <address>"
    assert isinstance(rows[0], CheckRow)
