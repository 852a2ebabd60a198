"""`megafleet doctor`: what this host can do, checked for real.

Each check tries the thing rather than guessing from files: KVM is judged by
booting a guest (see megafleet.qemu.probe_accel), network permissions by creating
and removing a throwaway namespace with a bridge and a tap inside it (so nothing
appears on the host's own network), libvirtd by asking it its version.

JSON keys (each a dict with at least "ok" and "detail"): qemu, accel, ksm,
network, libvirtd, telemetry. `accel` also has "accel" ("kvm" or "tcg").
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import click

from megafleet import paths, proc
from megafleet.ledger import Ledger
from megafleet.names import check_name

KSM_RUN = Path("/sys/kernel/mm/ksm/run")


def check_qemu() -> dict:
    from megafleet.qemu import QEMU

    path = shutil.which(QEMU)
    if not path:
        return {"ok": False, "detail": f"{QEMU} not found (apt-get install qemu-system-x86)"}
    version = proc.run([path, "--version"], check=False, timeout=10).stdout.splitlines()
    return {"ok": True, "detail": (version[0] if version else path), "path": path}


def check_accel(refresh: bool = False) -> dict:
    from megafleet.qemu import probe_accel

    accel, reason = probe_accel(refresh=refresh)
    # TCG is a working fallback, not a failure: guests boot, only slower.
    return {"ok": True, "accel": accel, "detail": reason}


def check_ksm() -> dict:
    if not KSM_RUN.exists():
        return {"ok": False, "detail": f"{KSM_RUN} missing (kernel without KSM)"}
    current = KSM_RUN.read_text().strip()
    try:
        # Writing the current value back proves write access and changes nothing.
        KSM_RUN.write_text(current)
    except OSError as exc:
        return {"ok": False, "detail": f"{KSM_RUN} not writable: {exc.strerror}", "run": current}
    return {"ok": True, "detail": f"sysfs writable (run={current})", "run": current}


def _remove_stale_namespaces(ledger: Ledger) -> None:
    """Namespaces of doctor runs that crashed (their pid is in the name)."""
    for res in ledger.list(owner="imagegen", kind="netns"):
        pid = res.key.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue  # a doctor running right now
        if Path(f"/run/netns/{res.key}").exists():
            proc.run(["ip", "netns", "del", check_name(res.key, "namespace")], check=False, timeout=10)
        ledger.forget("imagegen", "netns", res.key)


def check_network() -> dict:
    """Create a namespace with a bridge and a tap in it, then remove it."""
    if not shutil.which("ip"):
        return {"ok": False, "detail": "iproute2 ('ip') not found"}
    ns = check_name(f"mfi-doctor-{os.getpid()}", "namespace")
    ledger = Ledger()
    _remove_stale_namespaces(ledger)
    ledger.record("imagegen", "netns", ns, what="doctor check")
    done = []
    try:
        proc.run(["ip", "netns", "add", ns], timeout=10)
        done.append("namespace")
        proc.run(["ip", "-n", ns, "link", "add", "mfi-br0", "type", "bridge"], timeout=10)
        done.append("bridge")
        proc.run(["ip", "-n", ns, "tuntap", "add", "dev", "mfi-tap0", "mode", "tap"], timeout=10)
        done.append("tap")
        proc.run(["ip", "-n", ns, "link", "set", "mfi-tap0", "master", "mfi-br0"], timeout=10)
        return {"ok": True, "detail": "can create namespaces, bridges and taps"}
    except (proc.CommandFailed, OSError) as exc:
        return {"ok": False, "detail": f"could create {', '.join(done) or 'nothing'}; failed next: {exc}"}
    finally:
        if "namespace" in done or Path(f"/run/netns/{ns}").exists():
            proc.run(["ip", "netns", "del", ns], check=False, timeout=10)
        ledger.forget("imagegen", "netns", ns)


def check_libvirtd() -> dict:
    virsh = shutil.which("virsh")
    if not virsh:
        return {"ok": False, "detail": "virsh not found (apt-get install libvirt-clients)"}
    try:
        result = proc.run([virsh, "-c", "qemu:///system", "version", "--daemon"], check=False,
                          timeout=10)
    except Exception as exc:  # a hung daemon: timeout
        return {"ok": False, "detail": f"libvirtd did not answer: {exc}"}
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        return {"ok": False, "detail": f"not reachable ({tail}); start it with scripts/libvirtd-up"}
    daemon = [l for l in result.stdout.splitlines() if "daemon" in l.lower()]
    return {"ok": True, "detail": daemon[0].strip() if daemon else "reachable"}


def check_telemetry() -> dict:
    uri = os.environ.get("MEGAFLEET_MONGO_URI")
    if not uri:
        db = paths.state_dir() / "telemetry.sqlite"
        return {"ok": True, "store": "sqlite", "detail": f"SQLite (default): {db}"}
    try:
        import pymongo

        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000)
        client.admin.command("ping")
        client.close()
        return {"ok": True, "store": "mongodb", "detail": "MongoDB at MEGAFLEET_MONGO_URI answers"}
    except Exception as exc:
        return {"ok": False, "store": "mongodb",
                "detail": f"MEGAFLEET_MONGO_URI set but unreachable: {type(exc).__name__}"}


CHECKS = {"qemu": check_qemu, "accel": check_accel, "ksm": check_ksm,
          "network": check_network, "libvirtd": check_libvirtd, "telemetry": check_telemetry}


def run_checks(refresh: bool = False) -> dict:
    results = {}
    # The accelerator probe is cached unless `refresh`.
    checks: dict[str, Callable[[], dict]] = {**CHECKS, "accel": functools.partial(check_accel, refresh)}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as exc:  # one broken check must not hide the others
            results[name] = {"ok": False, "detail": f"check failed: {type(exc).__name__}: {exc}"}
    return results


def show_leftovers(json_out: bool) -> None:
    """`doctor --leftovers`: every recorded resource still present."""
    from megafleet import sweep
    from megafleet.up import table

    found = sweep.leftovers()
    if json_out:
        click.echo(json.dumps({"leftovers": [f.to_json() for f in found]}, indent=2))
    elif not found:
        click.echo("nothing recorded is present: no leftovers")
    else:
        click.echo(table([[f.owner, f.kind, f.key, f.state + (" (orphan)" if f.orphan else ""), f.what]
                          for f in found], ["OWNER", "KIND", "KEY", "STATE", "WHAT"]))
        orphans = sum(f.orphan for f in found)
        click.echo(f"\n{len(found)} recorded resources present ({orphans} orphaned); "
                   "'megafleet down' removes testbeds and orphans, 'megafleet vm teardown' guests")
    raise SystemExit(1 if found else 0)


@click.command()
@click.option("--json", "json_out", is_flag=True, help="Print the results as JSON.")
@click.option("--refresh", is_flag=True, help="Probe KVM again (the verdict is cached per boot).")
@click.option("--leftovers", is_flag=True,
              help="Instead of the checks: list everything the ledger records that is still "
                   "present (processes, namespaces, links, cgroups, files, testbeds).")
def doctor(json_out: bool, refresh: bool, leftovers: bool) -> None:
    """Check what this host can do for megafleet.

    \b
    qemu       qemu-system-x86_64 present (and its version)
    accel      whether KVM really runs a guest (probed by booting the tiny image;
               on PVM hosts /dev/kvm opens but guests hang) or the TCG fallback
    ksm        /sys/kernel/mm/ksm writable (memory sharing between guests)
    network    permission for namespaces, bridges and taps (a throwaway
               mfi-doctor-PID namespace is created and removed)
    libvirtd   the libvirt daemon answers (for the libvirt driver)
    telemetry  where telemetry goes: MongoDB (MEGAFLEET_MONGO_URI) or SQLite

    Exit status 0 when every check passes, 1 otherwise.

    \b
    --leftovers lists what megafleet recorded in this host's ledger that still
    exists, one row per resource: OWNER (up, net, vm, imagegen, cgroup...),
    KIND, KEY, STATE (running, present, or recorded for a testbed that is up;
    "orphan" when the command that made it is gone) and WHAT. Exit status 0
    when nothing is left, 1 otherwise.
    """
    if leftovers:
        show_leftovers(json_out)
    results = run_checks(refresh)
    if json_out:
        click.echo(json.dumps(results, indent=2, sort_keys=True))
    else:
        width = max(len(n) for n in results)
        click.echo(f"{'CHECK':<{width}}  {'STATUS':<6}  DETAIL")
        for name, r in results.items():
            status = "ok" if r["ok"] else "FAIL"
            if name == "accel":
                status = r["accel"]
            click.echo(f"{name:<{width}}  {status:<6}  {r['detail']}")
    raise SystemExit(0 if all(r["ok"] for r in results.values()) else 1)
