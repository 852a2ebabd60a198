"""Bulk boot benchmark of the vm engine; prints one JSON line.

Each figure is measured against its reference in the same run:

- qemu: N guests booted by the engine (admission control, readiness by the ready
  line) vs. the *same* QEMU command lines started by a plain loop with no
  orchestration at all, readiness detected the same way (``bare``: the limit).
  ``qemu_vs_bare`` = qemu_wall_s / bare_wall_s (target <= 1.15).
  ``host_cpu_s`` is the CPU time (user + system) the guests' QEMU processes and
  the engine consumed until all were ready. ``rss_per_vm_bytes`` is the mean
  resident size of a guest's QEMU once all are ready.
- libvirt: domains created by the engine's libvirt driver vs. the same domain
  XML created by a ``virsh create`` loop, ready lines detected the same way.
  ``libvirt_vs_virsh`` = libvirt_wall_s / virsh_wall_s (target <= 1.0), medians
  of --libvirt-rounds alternating rounds (``libvirt_rounds``: [engine, virsh]
  per round).
- containers: 1,000 container guests up (all ready) and down (teardown complete).

Usage: .venv/bin/python bench/boot.py [--qemu-n 32] [--libvirt-n 8] [--libvirt-rounds 5] [--containers-n 1000]
       [--phases containers,libvirt,qemu]
(as root; starts libvirtd with scripts/libvirtd-up). The host is shared: other
load on it shows in every figure, which is why each is compared within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _isolate() -> Path:
    """Private state and run directories (the image cache is the shared one)."""
    base = Path(tempfile.mkdtemp(prefix="mfvb-"))
    os.environ["MEGAFLEET_STATE"] = str(base / "s")
    os.environ["MEGAFLEET_RUN"] = str(base / "r")
    os.environ.setdefault("MEGAFLEET_CACHE", str(REPO / ".cache" / "test"))
    return base


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _wait_all_ready(consoles: list[Path], timeout: float,
                    procs: list[subprocess.Popen] | None = None) -> int:
    """Poll console files until each has a ready line (or, when `procs` is given,
    its process has exited). Returns how many never became ready."""
    from megafleet.vm.engine import ConsoleWatcher

    start = time.monotonic()
    watchers = {i: ConsoleWatcher(c) for i, c in enumerate(consoles)}
    failed = 0
    while watchers:
        for i in list(watchers):
            if watchers[i].poll() is not None:
                del watchers[i]
            elif procs is not None and procs[i].poll() is not None:
                del watchers[i]
                failed += 1
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{len(watchers)} guest(s) not ready after {timeout} s")
        time.sleep(0.02)
    return failed


def _note_failures(what: str, report) -> None:
    retried = sum(1 for r in report.results if r.attempts > 1)
    if report.failed or retried:
        first = report.failed[0].reason if report.failed else ""
        print(f"bench: {what}: {len(report.failed)} failed, {retried} needed a retry {first}",
              file=sys.stderr)


def bench_qemu(n: int, timeout: float) -> dict:
    import trio

    from megafleet.imagegen import store
    from megafleet.vm.engine import Engine, guests_dir
    from megafleet.vm.spec import GuestSpec
    from megafleet.vm.qemu_driver import guest_argv, host_accel

    image = store.find("tiny")
    accel = host_accel()
    specs = [GuestSpec(name=f"mfvbq{i}", image="tiny", driver="qemu", mem_mb=128) for i in range(n)]
    out: dict = {"accel": accel, "qemu_n": n}

    # The reference: the same command lines, a plain loop, no orchestration.
    bare_dir = Path(tempfile.mkdtemp(prefix="mfvbare-", dir=guests_dir().parent))
    procs = []
    try:
        t0 = time.monotonic()
        for spec in specs:
            gdir = bare_dir / spec.name
            gdir.mkdir()
            argv = guest_argv(spec, image.kernel, image.initramfs, gdir, accel)
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        failed = _wait_all_ready([bare_dir / s.name / "console.log" for s in specs], timeout, procs)
        if failed:
            print(f"bench: {failed} bare guest(s) died before ready", file=sys.stderr)
        out["bare_wall_s"] = round(time.monotonic() - t0, 3)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        shutil.rmtree(bare_dir, ignore_errors=True)

    engine = Engine(timeout_s=timeout)  # default retries, as `vm boot` runs
    cpu0 = _self_cpu_s()
    try:
        report = trio.run(lambda: engine.apply(specs))
        _note_failures("qemu", report)
        views = engine.list("mfvbq*")
        guest_cpu = sum(_cpu_s(v.pid) for v in views if v.pid)
        out.update(
            qemu_wall_s=round(report.wall_s, 3),
            boot_p50_s=round(report.percentile(50), 3),
            boot_p95_s=round(report.percentile(95), 3),
            rss_per_vm_bytes=int(sum(v.rss_bytes or 0 for v in views) / max(1, len(views))),
            host_cpu_s=round(guest_cpu + _self_cpu_s() - cpu0, 2),
        )
    finally:
        trio.run(lambda: engine.teardown("mfvbq*"))
    out["qemu_vs_bare"] = round(out["qemu_wall_s"] / out["bare_wall_s"], 3)
    return out


def bench_libvirt(n: int, timeout: float, rounds: int) -> dict:
    """`rounds` rounds, each the virsh loop then the engine: on this shared
    2-CPU host one round varies by about 7 % either way, so the figures are the
    medians of the rounds (each round's pair is in the output too)."""
    import statistics

    import trio

    from megafleet.imagegen import store
    from megafleet.vm.engine import Engine, guests_dir
    from megafleet.vm.libvirt_driver import domain_xml
    from megafleet.vm.spec import GuestSpec
    from megafleet.vm.qemu_driver import host_accel

    subprocess.run([str(REPO / "scripts" / "libvirtd-up")], check=True)
    image = store.find("tiny")
    accel = host_accel()
    uri = "qemu:///system"
    virsh_walls, engine_walls = [], []
    for _ in range(rounds):
        # The reference: a `virsh create` loop over the same domain XML.
        ref_specs = [GuestSpec(name=f"mfvbv{i}", image="tiny", driver="libvirt", mem_mb=128) for i in range(n)]
        ref_dir = Path(tempfile.mkdtemp(prefix="mfvvirsh-", dir=guests_dir().parent))
        created = []
        try:
            xmls = []
            for spec in ref_specs:
                gdir = ref_dir / spec.name
                gdir.mkdir()
                xml = gdir / "domain.xml"
                xml.write_text(domain_xml(spec, image.kernel, image.initramfs, gdir, accel))
                xmls.append(xml)
            t0 = time.monotonic()
            for spec, xml in zip(ref_specs, xmls):
                subprocess.run(["virsh", "-q", "-c", uri, "create", str(xml)], check=True,
                               stdout=subprocess.DEVNULL)
                created.append(spec.name)
            _wait_all_ready([ref_dir / s.name / "console.log" for s in ref_specs], timeout)
            virsh_walls.append(time.monotonic() - t0)
        finally:
            for name in created:
                subprocess.run(["virsh", "-q", "-c", uri, "destroy", name], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            shutil.rmtree(ref_dir, ignore_errors=True)

        specs = [GuestSpec(name=f"mfvbl{i}", image="tiny", driver="libvirt", mem_mb=128) for i in range(n)]
        engine = Engine(timeout_s=timeout)
        try:
            report = trio.run(lambda: engine.apply(specs))
            _note_failures("libvirt", report)
            engine_walls.append(report.wall_s)
        finally:
            trio.run(lambda: engine.teardown("mfvbl*"))
    libvirt_wall, virsh_wall = statistics.median(engine_walls), statistics.median(virsh_walls)
    return {"libvirt_wall_s": round(libvirt_wall, 3), "virsh_wall_s": round(virsh_wall, 3),
            "libvirt_vs_virsh": round(libvirt_wall / virsh_wall, 3),
            "libvirt_rounds": [[round(e, 3), round(v, 3)] for e, v in zip(engine_walls, virsh_walls)]}


def bench_containers(n: int, timeout: float) -> dict:
    import trio

    from megafleet.vm.engine import Engine
    from megafleet.vm.spec import GuestSpec

    specs = [GuestSpec(name=f"mfvbc{i}", image="tiny", driver="container") for i in range(n)]
    engine = Engine(timeout_s=timeout)
    try:
        report = trio.run(lambda: engine.apply(specs))
        _note_failures("container", report)
        up = report.wall_s
    finally:
        t0 = time.monotonic()
        trio.run(lambda: engine.teardown("mfvbc*"))
        down = time.monotonic() - t0
    return {"containers_n": n, "containers_up_s": round(up, 3), "containers_down_s": round(down, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu-n", type=int, default=32)
    parser.add_argument("--libvirt-n", type=int, default=8)
    parser.add_argument("--libvirt-rounds", type=int, default=5,
                        help="rounds of (virsh loop, engine); the medians are reported")
    parser.add_argument("--containers-n", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-guest / per-phase seconds")
    parser.add_argument("--phases", default="containers,libvirt,qemu",
                        help="comma-separated subset to run (the others' keys print null)")
    args = parser.parse_args()
    base = _isolate()
    from megafleet.imagegen import store
    from megafleet.vm.driver import become_subreaper

    become_subreaper()  # reap the guests we stop (PID 1 may not)
    store.build(REPO / "examples" / "images" / "tiny.toml")
    result: dict = {}
    try:
        phases = set(args.phases.split(","))
        if "containers" in phases:
            result.update(bench_containers(args.containers_n, args.timeout))
        if "libvirt" in phases:
            result.update(bench_libvirt(args.libvirt_n, args.timeout, args.libvirt_rounds))
        if "qemu" in phases:
            result.update(bench_qemu(args.qemu_n, args.timeout))
    finally:
        while True:  # collect any exited child
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    break
            except ChildProcessError:
                break
        shutil.rmtree(base, ignore_errors=True)
    keys = ["accel", "qemu_n", "qemu_wall_s", "boot_p50_s", "boot_p95_s", "rss_per_vm_bytes",
            "host_cpu_s", "bare_wall_s", "qemu_vs_bare", "libvirt_wall_s", "virsh_wall_s",
            "libvirt_vs_virsh", "libvirt_rounds", "containers_n", "containers_up_s", "containers_down_s"]
    print(json.dumps({k: result.get(k) for k in keys}))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
