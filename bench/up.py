"""Benchmark of `megafleet up` / `down`: prints one JSON line.

    campus_up_s, campus_down_s   examples/campus-ospf.fleet on this machine (embedded)
    k1000_up_s, k1000_down_s     examples/lan1000.fleet on 4 namespace hosts with sshd
                                 (gproc test fleet), the switch spanning them by VXLAN
    phases                       seconds per phase of each `up`
    overhead_fraction            campus: (up - reference) / up, where the reference is a
                                 plain `vm boot` of the same guests in the same run: the
                                 vm engine booting the same names, images, drivers and
                                 memory with no network (two of each, alternating;
                                 means). Everything `up` adds (network, routers,
                                 daemons, controller) counts as overhead.
    overhead_fraction_vs_net_vm  the former reference, for comparison: netlang's network
                                 instantiation of the same manifest + the vm engine
                                 booting the same guests on it
    k1000_overhead_fraction      (up - slowest host's net + vm time) / up: what the
                                 controller, gproc and the daemons add

Targets (2-core machine): overhead_fraction <= 0.10; k1000 up <= 90 s, down <= 45 s.
Run as root:  .venv/bin/python bench/up.py [--guests 1000] [--staff 60 --lab 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent


def _dirs(base: Path) -> None:
    # Own state and run directories: nothing here touches a user's testbeds.
    for name, env in (("state", "MEGAFLEET_STATE"), ("run", "MEGAFLEET_RUN")):
        (base / name).mkdir(parents=True, exist_ok=True)
        os.environ[env] = str(base / name)


async def campus_reference(path: Path, defines: dict[str, str]) -> tuple[float, float, float]:
    """The references for the campus: a plain `vm boot` of the same guests (the
    vm engine, the same names, images, drivers, memory and vCPUs, no NICs and no
    network configuration); then the host's work done by the packages directly:
    netlang's network instantiation of the same manifest and the vm engine
    booting the guests on it. Returns (plain boot, net, vm) seconds; everything
    is removed again."""
    from megafleet import host, manifest, up
    from megafleet.ledger import Ledger
    from megafleet.netlang import live
    from megafleet.vm.api import apply as vm_apply
    from megafleet.vm.api import teardown as vm_teardown
    from megafleet.vm.spec import GuestSpec

    out = up.Output(quiet=True)
    net = up.compile_testbed(path, defines)
    plan, placed = up.make_plan(net, "mfubref", up.Target())
    images = up.build_images(net, plan, out)
    (m,) = manifest.split(plan, placed, images={k: i.name for k, i in images.items()}).values()
    p = manifest.plan_from_json(m.net)
    p.digest = m.digest()
    plain = [GuestSpec(name=v.name, image=v.image, driver=v.driver, mem_mb=v.mem_mb, vcpus=v.vcpus)
             for v in p.vms]
    t = time.monotonic()
    report = await vm_apply(plain)
    ref_boot = time.monotonic() - t
    await vm_teardown("*")
    assert not report.failed, [r.reason for r in report.failed][:3]
    ledger = Ledger()
    t = time.monotonic()
    await host.apply_net(p, ledger, lambda s: None)
    ref_net = time.monotonic() - t
    ledger.record(live.OWNER, "vms", p.name, names=[v.name for v in p.vms])
    t = time.monotonic()
    report = await vm_apply(p.vms)
    ref_vm = time.monotonic() - t
    await host._teardown_guests(p.name, ledger, lambda e: None)
    await live.adown(p.name, lambda s: None, ledger)
    assert not report.failed, [r.reason for r in report.failed][:3]
    return ref_boot, ref_net, ref_vm


async def campus(staff: int, lab: int) -> dict:
    """Reference and `up` alternate (reference, up, up, reference) so that load
    changes and the kernel's deferred namespace cleanup weigh on both alike."""
    from megafleet import up

    path = REPO / "examples" / "campus-ospf.fleet"
    defines = {"staff": str(staff), "lab": str(lab)}
    out = up.Output(quiet=True)
    refs, ups, downs, summaries = [], [], [], []

    async def one_up() -> None:
        t = time.monotonic()
        summaries.append(await up.up(path, up.Target(), name="mfubcamp", defines=defines, ksm=False, out=out))
        ups.append(time.monotonic() - t)
        t = time.monotonic()
        result = await up.down("mfubcamp", None, out)
        downs.append(time.monotonic() - t)
        assert result.ok, result

    refs.append(await campus_reference(path, defines))
    await one_up()
    await one_up()
    refs.append(await campus_reference(path, defines))
    up_s = sum(ups) / len(ups)
    reference = sum(b for b, _, _ in refs) / len(refs)
    net_vm = sum(n + v for _, n, v in refs) / len(refs)
    summary = summaries[-1]
    return {"campus_guests": summary.guests, "campus_ready": summary.ready,
            "campus_up_s": round(up_s, 2), "campus_down_s": round(sum(downs) / len(downs), 2),
            "campus_up_runs_s": [round(x, 2) for x in ups],
            "campus_reference_s": [{"vm_boot": round(b, 2), "net": round(n, 2), "vm": round(v, 2)}
                                   for b, n, v in refs],
            "overhead_fraction": round((up_s - reference) / up_s, 3),
            "overhead_fraction_vs_net_vm": round((up_s - net_vm) / up_s, 3),
            "campus_phases": summary.phases}


async def k1000(guests: int, hosts: int, work: Path) -> dict:
    from megafleet import up
    from megafleet.gproc import inventory
    from megafleet.gproc.testfleet import TestFleet, leftovers

    fleet = TestFleet("mfub", hosts, work / "fleet", subnet="10.148.251.0/24")
    try:
        inv = await trio.to_thread.run_sync(fleet.up)
        # Room for the whole LAN: a quarter of it per host and some slack.
        per_host = -(-(guests + 2) // hosts) + 8
        fleet.inventory_path.write_text(inventory.render(
            [h.__class__(**{**h.__dict__, "capacity": per_host}) for h in inv.hosts],
            identity=inv.identity, known_hosts=inv.known_hosts))
        target = up.Target(str(fleet.inventory_path), host_state=str(work / "h" / "{host}"))
        out = up.Output(quiet=True)
        path = REPO / "examples" / "lan1000.fleet"
        t = time.monotonic()
        summary = await up.up(path, target, name="mfubk", defines={"guests": str(guests)}, ksm=False,
                              out=out, telemetry=f"sqlite:{work / 'telemetry.sqlite'}")
        up_s = time.monotonic() - t
        t = time.monotonic()
        result = await up.down("mfubk", None, out)
        down_s = time.monotonic() - t
        slowest = max((h.phases.get("net", 0) + h.phases.get("vm", 0))
                      for h in summary.hosts if h.phases is not None)
        return {"k1000_guests": summary.guests, "k1000_ready": summary.ready,
                "k1000_hosts": hosts, "k1000_up_s": round(up_s, 2), "k1000_down_s": round(down_s, 2),
                "k1000_down_ok": result.ok, "k1000_phases": summary.phases,
                "k1000_overhead_fraction": round((up_s - slowest) / up_s, 3)}
    finally:
        await trio.to_thread.run_sync(fleet.down)
        assert leftovers("mfub") == []


async def main(args) -> dict:
    result: dict = {"cpus": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2)}
    if not args.skip_campus:
        result.update(await campus(args.staff, args.lab))
    if not args.skip_k1000:
        result.update(await k1000(args.guests, args.hosts, Path(args.work)))
    result["phases"] = {k: result.pop(f"{k}_phases") for k in ("campus", "k1000") if f"{k}_phases" in result}
    result["targets"] = {"overhead_fraction": 0.10, "k1000_up_s": 90, "k1000_down_s": 45}
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--staff", type=int, default=60, help="campus staff guests per LAN")
    parser.add_argument("--lab", type=int, default=40, help="campus lab guests per LAN")
    parser.add_argument("--skip-campus", action="store_true")
    parser.add_argument("--skip-k1000", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/up.py needs root (namespaces, containers)")
    base = Path(tempfile.mkdtemp(prefix="mfub-"))
    _dirs(base)
    args.work = str(base)
    try:
        print(json.dumps(trio.run(main, args)))
    finally:
        shutil.rmtree(base, ignore_errors=True)
