"""`megafleet vm`: boot, list, stop and tear down guests on this host in bulk."""

from __future__ import annotations

import json
import sys

import click
import trio

from megafleet.vm.admission import BudgetError
from megafleet.vm.driver import DEFAULT_DRIVER
from megafleet.vm.spec import DRIVERS, GuestResult, GuestSpec, SpecError


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _engine(**options):
    from megafleet.vm.engine import Engine
    return Engine(**options)


@click.group()
def vm() -> None:
    """Boot, list, stop and tear down guests on this host, in bulk.

    \b
    Drivers:
      qemu       one QEMU process per guest (KVM when it really works, else TCG)
      libvirt    transient libvirt domains (URI $MEGAFLEET_LIBVIRT_URI,
                 default qemu:///system)
      container  namespaces + overlay of the image's root file system; thousands
                 per host

    State is kept in $MEGAFLEET_STATE (vm.sqlite and the ledger); guest
    directories (console logs, sockets, writable layers) in $MEGAFLEET_RUN/vm.
    """


@vm.command()
@click.option("--image", required=True, help="Image name (as built by `megafleet image build`).")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 100000),
              help="How many guests.")
@click.option("--prefix", default="vm", show_default=True,
              help="Guest names are PREFIX1 .. PREFIXN.")
@click.option("--driver", type=click.Choice(DRIVERS), default=DEFAULT_DRIVER, show_default=True)
@click.option("--mem", "mem_mb", default=128, show_default=True, type=int,
              help="Guest RAM in MiB (qemu, libvirt).")
@click.option("--vcpus", default=1, show_default=True, type=int)
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, type=float,
              help="Seconds one attempt may take to print its ready line.")
@click.option("--retries", default=1, show_default=True, type=click.IntRange(0, 10),
              help="Further attempts after a failed one.")
@click.option("--max-parallel", type=click.IntRange(1, 10000), default=None,
              help="Upper bound on guests booting at once (default: from CPUs and load).")
@click.option("--mem-budget", "mem_budget_mb", type=click.IntRange(1), default=None,
              help="Host memory budget in MiB (default 90%% of RAM, or $MEGAFLEET_VM_MEM_BUDGET).")
@click.option("--json", "as_json", is_flag=True, help="Print the boot report as JSON.")
def boot(image, count, prefix, driver, mem_mb, vcpus, timeout_s, retries, max_parallel,
         mem_budget_mb, as_json) -> None:
    """Boot COUNT guests of IMAGE named PREFIX1..PREFIXN and wait until each has
    printed its ready line.

    Guests already running under those names are left alone. Boots run under
    admission control (a bounded number at once, adapted to CPUs and load); each
    attempt has a timeout, failed attempts are retried, and every failure is
    reported with its reason and the tail of the guest's console. The summary
    gives boot-time p50/p95. Exit status 1 if any guest failed.

    \b
    Example:
      megafleet vm boot --image tiny --count 200 --prefix web --driver container
    """
    specs = [GuestSpec(name=f"{prefix}{i}", image=image, driver=driver, mem_mb=mem_mb,
                       vcpus=vcpus) for i in range(1, count + 1)]
    try:
        engine = _engine(timeout_s=timeout_s, retries=retries, max_parallel=max_parallel,
                         mem_budget_mb=mem_budget_mb)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    show = sys.stderr.isatty() and not as_json

    def progress(done: int, total: int, result: GuestResult) -> None:
        if as_json:
            return
        if result.outcome == "failed":
            click.echo(f"\r{result.name}: FAILED after {result.attempts} attempt(s): {result.reason}",
                       err=True)
        if show:
            width = 30
            filled = int(width * done / total)
            click.echo(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", err=True, nl=False)
        elif done == total or done % max(1, total // 10) == 0:
            click.echo(f"booted {done}/{total}", err=True)

    try:
        report = trio.run(lambda: engine.apply(specs, progress=progress))
    except (SpecError, BudgetError) as exc:
        raise click.ClickException(str(exc)) from None
    if show:
        click.echo("", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        summary = report.to_dict()
        p50, p95 = summary["boot_p50_s"], summary["boot_p95_s"]
        click.echo(f"{len(report.ready)} ready, {len(report.failed)} failed, "
                   f"{len(report.already)} already running, in {report.wall_s:.1f} s; "
                   f"boot time p50 {p50 if p50 is not None else '-'} s, "
                   f"p95 {p95 if p95 is not None else '-'} s")
        for r in report.failed:
            click.echo(f"\n{r.name}: {r.reason}\n--- console tail ---\n{r.console_tail or '(empty)'}")
    if report.failed:
        sys.exit(1)


@vm.command(name="ls")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of guests.")
def ls_command(pattern, as_json) -> None:
    """List guests matching PATTERN (shell wildcards, default all): name, driver,
    state, pid, resident memory and boot time.

    The state is checked against /proc, not just recalled: a guest whose process
    is gone shows as 'exited', one that became ready while no engine watched it
    shows as 'running'."""
    views = _engine().list(pattern)
    if as_json:
        click.echo(json.dumps([v.to_dict() for v in views]))
        return
    rows = [[v.name, v.driver, v.state, str(v.pid or "-"), _human_bytes(v.rss_bytes),
             f"{v.boot_s:.2f} s" if v.boot_s is not None else "-",
             (v.reason or "")[:60]] for v in views]
    click.echo(_table(["NAME", "DRIVER", "STATE", "PID", "RSS", "BOOT", "REASON"], rows))


def _stop(pattern: str, force: bool, as_json: bool) -> None:
    names = trio.run(lambda: _engine().stop(pattern, force=force))
    if as_json:
        click.echo(json.dumps({"stopped": names}))
    else:
        click.echo(f"{'killed' if force else 'stopped'} {len(names)} guest(s)")


@vm.command()
@click.argument("pattern")
@click.option("--json", "as_json", is_flag=True)
def stop(pattern, as_json) -> None:
    """Stop the running guests matching PATTERN, all in parallel: QMP quit for
    qemu, a graceful destroy for libvirt, SIGTERM for containers (SIGKILL after
    a grace period). Their records stay until `vm teardown`."""
    _stop(pattern, False, as_json)


@vm.command()
@click.argument("pattern")
@click.option("--json", "as_json", is_flag=True)
def kill(pattern, as_json) -> None:
    """Kill the running guests matching PATTERN at once (SIGKILL, libvirt
    destroy), all in parallel. Their records stay until `vm teardown`."""
    _stop(pattern, True, as_json)


@vm.command()
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True)
def teardown(pattern, as_json) -> None:
    """Remove the guests matching PATTERN (default all) and everything recorded
    for them: processes, libvirt domains, sockets, console logs, writable layers,
    records. Works after a crash of the engine; running it twice is harmless.
    Also stops what killed commands left (a KVM probe's QEMU, scratch)."""
    names = trio.run(lambda: _engine().teardown(pattern))
    from megafleet import sweep
    sweep.sweep()
    if as_json:
        click.echo(json.dumps({"removed": names}))
    else:
        click.echo(f"removed {len(names)} guest(s)")
