"""`megafleet ksm`: look at and tune Kernel Samepage Merging on this host."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from megafleet.ksm.sysfs import KnobError, KsmError, KsmSysfs, meminfo, parse_assignment, ordered

_HELP_CTX = {"help_option_names": ["-h", "--help"]}


def _fail(message: str) -> None:
    click.echo(f"megafleet ksm: {message}", err=True)
    sys.exit(1)


@click.group(context_settings=_HELP_CTX)
def ksm() -> None:
    """Kernel Samepage Merging for fleets of similar guests.

    Identical guests booted from one image hold many identical pages; KSM merges
    them so that a host fits more guests. This group reads the kernel's counters
    in /sys/kernel/mm/ksm, sets its knobs, and runs megafleet's tuning daemon,
    which scans hard while merging pays (a bulk boot) and stops spending CPU
    once the savings level off.

    \b
    Commands:
      status     saved memory, sharing ratio, ksmd CPU, knobs
      set        set knobs by hand (KNOB=VALUE ...)
      run        the tuning daemon (restores the original knobs when it stops)
      announce   tell a running daemon about a bulk boot or a teardown
      restore    put back knobs a crashed daemon left changed
    """


@ksm.command(context_settings=_HELP_CTX)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 60),
              help="Seconds over which ksmd's CPU share is measured.")
def status(as_json: bool, interval: float) -> None:
    """Show what KSM saves on this host and how it is tuned.

    \b
    saved       memory no longer duplicated: (pages_sharing + ksm_zero_pages)
                x page size
    profit      the kernel's general_profit: saved minus KSM's own metadata
    sharing     pages_sharing / pages_shared: sites per shared page
    ksmd CPU    ksmd's CPU use over --interval seconds, percent of one CPU

    Reading needs no privileges. --json prints every counter and knob as well.
    The kernel updates these counters only while ksmd scans (run=1): with
    ksmd stopped they describe the last scan.
    """
    from megafleet.ksm.daemon import sample_of

    sysfs = KsmSysfs()
    try:
        first = sample_of(sysfs.read(), meminfo(), None)
        time.sleep(interval)
        sample = sample_of(sysfs.read(), meminfo(), first)
    except KsmError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(sample, sort_keys=True))
        return
    c, k = sample["counters"], sample["knobs"]
    ratio = sample["sharing_ratio"]
    cpu = sample["ksmd_cpu_pct"]
    rows = [
        ("saved", f"{sample['saved_mb']:.1f} MB"),
        ("profit", "-" if sample["general_profit_mb"] is None else f"{sample['general_profit_mb']:.1f} MB"),
        ("sharing ratio", "-" if ratio is None else f"{ratio:.2f}"),
        ("ksmd CPU", "ksmd not found" if cpu is None else f"{cpu:.1f} % of one CPU"),
        ("ksmd CPU total", "-" if sample["ksmd_cpu_s"] is None else f"{sample['ksmd_cpu_s']:.2f} s"),
        ("full scans", str(c.get("full_scans", "-"))),
    ]
    click.echo("KSM on this host")
    for name, value in rows:
        click.echo(f"  {name:<16} {value}")
    click.echo("counters")
    for name in sorted(c):
        click.echo(f"  {name:<36} {c[name]}")
    click.echo("knobs")
    for name in sorted(k):
        click.echo(f"  {name:<36} {k[name]}")


@ksm.command(name="set", context_settings=_HELP_CTX)
@click.argument("assignments", nargs=-1, required=True, metavar="KNOB=VALUE...")
@click.option("--json", "as_json", is_flag=True, help="Print what changed as JSON.")
def set_knobs(assignments: tuple[str, ...], as_json: bool) -> None:
    """Set KSM knobs by hand, e.g. `megafleet ksm set run=1 pages_to_scan=1000`.

    Every assignment is validated and write permission is checked before the
    first write, so a bad value or a missing privilege changes nothing. Knobs
    are written in the kernel's required order (advisor_mode first, run last).
    A running `megafleet ksm run` daemon will override what you set here.

    \b
    Knobs: run (0 stop, 1 run, 2 stop and unmerge everything), pages_to_scan,
    sleep_millisecs, max_page_sharing, use_zero_pages, smart_scan,
    stable_node_chains_prune_millisecs, advisor_mode (none|scan-time),
    advisor_max_cpu, advisor_target_scan_time, advisor_min_pages_to_scan,
    advisor_max_pages_to_scan.
    """
    sysfs = KsmSysfs()
    try:
        settings = dict(parse_assignment(a) for a in assignments)
        sysfs.check_can_write(list(settings))
        before = {knob: sysfs.read_one(knob) for knob in settings}
        for knob, value in ordered(settings):
            sysfs.write(knob, value)
        after = {knob: sysfs.read_one(knob) for knob in settings}
    except (KnobError, KsmError) as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps({k: {"before": before[k], "after": after[k]} for k in settings}))
        return
    for knob in settings:
        click.echo(f"{knob:<36} {before[knob]} -> {after[knob]}")


@ksm.command(context_settings=_HELP_CTX)
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.2, 60),
              help="Seconds between samples and decisions.")
@click.option("--storm-cpu", default=0.9, show_default=True, type=click.FloatRange(0.05, 0.95),
              help="Share of one CPU ksmd may use while merging a bulk boot.")
@click.option("--pay", "pay_mb", default=20.0, show_default=True, type=click.FloatRange(0),
              help="MB saved per ksmd CPU-second below which scanning stops paying.")
@click.option("--steady", type=click.Choice(["pause", "advisor"]), default="pause", show_default=True,
              help="Once savings level off: stop ksmd (merged pages stay merged) or hand "
                   "over to the kernel's scan-time advisor with a long target.")
@click.option("--record", type=click.Path(dir_okay=False, writable=True),
              help="Append every observation and decision to this JSON-lines file (a trace).")
@click.option("--json", "as_json", is_flag=True, help="Print every sample as one JSON line.")
@click.option("--duration", type=click.FloatRange(0), help="Stop after this many seconds.")
def run(interval: float, storm_cpu: float, pay_mb: float, steady: str, record: str | None,
        as_json: bool, duration: float | None) -> None:
    """Run the KSM tuning daemon in the foreground until SIGTERM or Ctrl-C.

    \b
    Prints a line when the mode or a knob changes, and every 30 s; --json
    prints every sample. Modes:
      probe     a short hard scan to see whether merging pays
      storm     scan hard: a bulk boot was announced or memory grew
      steady    savings levelled off: ksmd stopped, merged pages stay merged
      pressure  little memory left: keep scanning (kernel advisor if present)

    The host's original knobs are recorded before the first change (in
    $MEGAFLEET_STATE/ksm-originals.json) and restored when the daemon stops,
    also on SIGTERM; after a crash, `megafleet ksm restore` puts them back.
    Events arrive on $MEGAFLEET_RUN/ksm.sock (see `megafleet ksm announce`).

    Needs root. KSM's counters only change while ksmd scans: while steady,
    the saving shown is as of the last scan (the periodic probes refresh it).
    """
    import trio

    from megafleet.ksm import policy
    from megafleet.ksm.daemon import Daemon

    try:
        config = policy.Config(sample_interval_s=interval, storm_cpu=storm_cpu,
                               pay_mb_per_cpu_s=pay_mb, steady=steady)
    except ValueError as e:
        _fail(str(e))
    last_mode = [None]
    last_line = [0.0]

    def show(sample: dict) -> None:
        if as_json:
            click.echo(json.dumps(sample, sort_keys=True))
            return
        # A line when something changes, else one every 30 s: the daemon runs
        # for days with its output in a log file.
        if (sample["mode"] == last_mode[0] and not sample["changed"]
                and sample["t"] - last_line[0] < 30):
            return
        last_line[0] = sample["t"]
        cpu = sample["ksmd_cpu_pct"]
        line = (f"{time.strftime('%H:%M:%S')} {sample['mode']:<8} saved {sample['saved_mb']:8.1f} MB"
                f"  ksmd {'-' if cpu is None else f'{cpu:5.1f}'} %"
                f"  pages_to_scan {sample['knobs'].get('pages_to_scan')}"
                f"  run {sample['knobs'].get('run')}")
        if sample["mode"] != last_mode[0] or sample["changed"]:
            line += f"  ({sample['reason']})"
        last_mode[0] = sample["mode"]
        click.echo(line)

    async def main() -> None:
        daemon = Daemon(config=config, on_sample=show, record=Path(record) if record else None)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return
                nursery.start_soon(stop_on_signal)
                if duration is not None:
                    nursery.cancel_scope.deadline = trio.current_time() + duration
                await daemon.run()

    try:
        trio.run(main)
    except KsmError as e:
        _fail(str(e))
    except BaseExceptionGroup as group:   # raised from inside the daemon's nursery
        matched, _ = group.split(KsmError)
        if matched is None:
            raise
        _fail("; ".join(str(e) for e in _leaves(matched)))
    if not as_json:
        click.echo("stopped; original KSM knobs restored", err=True)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


@ksm.command(context_settings=_HELP_CTX)
@click.argument("kind", type=click.Choice(["boot", "teardown"]))
@click.argument("count", type=click.IntRange(0))
def announce(kind: str, count: int) -> None:
    """Tell the running daemon that COUNT guests are about to boot (boot) or were
    torn down (teardown). The vm engine does this itself; this command is for
    scripts and experiments. Exits 1 when no daemon runs on this host."""
    from megafleet.ksm.daemon import send_event, socket_path

    try:
        delivered = send_event(kind, count)
    except (KsmError, OSError) as e:
        _fail(str(e))
    if not delivered:
        _fail(f"no daemon listens on {socket_path()}; start one with `megafleet ksm run`")
    click.echo(f"announced {kind} of {count}")


@ksm.command(context_settings=_HELP_CTX)
def restore() -> None:
    """Put back the original KSM knobs that a daemon recorded and, having
    crashed or been killed, could not restore itself. Does nothing when nothing
    is recorded. Refused while a daemon runs (it restores its own on exit)."""
    from megafleet.ksm.daemon import AlreadyRunning, _release_lock, _take_lock
    from megafleet.ksm.keeper import KnobKeeper

    try:
        lock = _take_lock()
    except AlreadyRunning as e:
        _fail(f"{e}; stop it instead (it restores the knobs on SIGTERM)")
    try:
        restored = KnobKeeper(KsmSysfs()).restore()
    except KsmError as e:
        _fail(str(e))
    finally:
        _release_lock(lock)
    if not restored:
        click.echo("nothing to restore")
    for knob, value in restored.items():
        click.echo(f"{knob:<36} restored to {value}")
