"""One memory model: what `megafleet plan` places on a host, that host's engine
admits (real placement of a real compiled plan, real admission code); the
per-driver minimum `mem` is refused by `net check` with file:line; budget
errors name the option of the command that printed them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from megafleet import manifest, placement
from megafleet.cli import root
from megafleet.netlang import compile_text
from megafleet.up import Target, make_plan
from megafleet.vm import admission
from megafleet.vm.driver import DRIVER_KINDS
from megafleet.vm.engine import Engine

from .vmhelpers import REPO

ERRORS = REPO / "tests" / "netlang" / "errors"

FLEET = ('image tiny from "tiny.toml"\n'
         "switch lanq subnet 10.1.0.0/22\nswitch lanc subnet 10.2.0.0/18\n"
         "switch lanl subnet 10.3.0.0/24\n"
         "vm q[1..{q}] image tiny mem 96M on lanq\n"
         "vm l[1..{l}] image tiny driver libvirt mem 128M on lanl\n"
         "vm c[1..{c}] image tiny driver container mem 64M on lanc\n"
         "host h[1..3] on lanc\n")


def _net(q: int = 200, l: int = 20, c: int = 2000):
    return compile_text(FLEET.format(q=q, l=l, c=c), name=str(REPO / "tests" / "vm" / "mm.fleet"))


def _admit_host(plan, placed, host: str, budget_mb: int, ksm_sharing: float) -> int:
    """The real admission of everything placed on `host`, as `up` configures
    that host's engine (its offer's budget, the same sharing)."""
    on_host = set(placed.hosts[host])
    specs = [v for v in plan.vms if v.name in on_host]
    engine = Engine(mem_budget_mb=budget_mb, ksm_sharing=ksm_sharing, budget_option="--host-mem")
    return engine.admit(specs)


@pytest.mark.parametrize("sharing", [0.0, 0.3, 0.5])
def test_what_plan_places_on_the_local_host_its_admission_accepts(sharing):
    net = _net()
    # The smallest budget the plan accepts: the sum of the footprints.
    plan, _ = make_plan(net, "mfvmm", Target(host_mem_mb=10 ** 6, ksm_sharing=sharing))
    demands = manifest.demands(net, plan)
    need = sum(placement.demand_mb(d, sharing) for d in demands)
    budget = int(need) + 1
    plan, placed = make_plan(net, "mfvmm", Target(host_mem_mb=budget, ksm_sharing=sharing))
    [host] = [h for h, ns in placed.hosts.items() if ns]
    admitted = _admit_host(plan, placed, host, budget, sharing)
    # The engine counts the guests exactly as placement did (namespaces are not its).
    guests = sum(placement.demand_mb(d, sharing) for d in demands if d.driver)
    assert abs(admitted - guests) <= 1
    # Containers cost their driver's footprint, not their 64M.
    assert sum(1 for d in demands if d.driver == "container") == 2000
    assert guests < 200 * (96 + 48) + 20 * (128 + 48) + 2000 * 64
    # One MiB less and the plan refuses too, naming the options of `up`/`plan`.
    from megafleet.up import UpError
    with pytest.raises(UpError, match="--host-mem MB.*--ksm-sharing"):
        make_plan(net, "mfvmm", Target(host_mem_mb=int(need) - 1, ksm_sharing=sharing))


def test_what_plan_places_on_each_of_several_hosts_their_admission_accepts():
    net = _net(q=300, l=30, c=3000)
    from megafleet.netlang import live
    plan = live.plan(net, "mfvmm")
    demands = manifest.demands(net, plan)
    # ~56,000 MiB of footprints on 57,000 MiB: the QEMU segment must split.
    offers = [placement.HostOffer("h1", 400, 21000), placement.HostOffer("h2", 5000, 18000),
              placement.HostOffer("h3", 5000, 18000)]
    placed = placement.place(demands, offers, ksm_sharing=0.3)
    used = 0
    for offer in offers:
        if placed.hosts[offer.name]:
            used += 1
            _admit_host(plan, placed, offer.name, offer.mem_mb, 0.3)   # raises if refused
    assert used == 3 and len(placed.segment_hosts["lanq"]) >= 2


def test_budget_error_names_the_option_of_the_command():
    memory = admission.MemoryPicture(total_mb=1000, available_mb=900, ksm_saved_mb=0)
    with pytest.raises(admission.BudgetError, match="set another with --host-mem, in MiB"):
        admission.check_budget([("a", "qemu", 2000)], [], 900, memory, budget_option="--host-mem")
    with pytest.raises(admission.BudgetError, match="--mem-budget or MEGAFLEET_VM_MEM_BUDGET"):
        admission.check_budget([("a", "qemu", 2000)], [], 900, memory)
    # `vm boot` has --mem-budget: the option the default message names.
    r = CliRunner().invoke(root, ["vm", "boot", "--help"])
    assert "--mem-budget" in r.output


def test_footprints_come_from_the_one_registry():
    q, c = DRIVER_KINDS["qemu"], DRIVER_KINDS["container"]
    assert admission.guest_cost_mb("qemu", 96, 0.5) == q.footprint_mb(96, 0.5) == 48 + q.overhead_mb
    assert admission.guest_cost_mb("container", 4096, 0.5) == c.overhead_mb
    d = placement.NodeDemand("x", "s", 96, driver="qemu")
    assert placement.demand_mb(d, 0.5) == q.footprint_mb(96, 0.5)


def test_net_check_refuses_mem_below_the_driver_minimum_with_file_and_line():
    path = ERRORS / "mem_below_driver_minimum.fleet"
    r = CliRunner().invoke(root, ["net", "check", str(path)])
    assert r.exit_code == 1
    assert f"{path}:3:4: error: c1: mem 8M is below the container driver's minimum of 16M" in r.output
    assert f"{path}:4:4: error: q1..q2: mem 12M is below the qemu driver's minimum of 96M" in r.output
    assert "ok" not in r.output.split("error")[-1].split()[:1]
