"""`megafleet telemetry`: run the collector on this host and query the fleet's
telemetry."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

import click

from megafleet.collect import docs as D
from megafleet.collect import queries as Q
from megafleet.collect.filters import BadFilter, parse_filter_text
from megafleet.collect.stores import URI_ENV, StoreRejected, StoreUnavailable, open_store


# --- output ----------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds") + "Z"
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]], empty: str) -> None:
    """Print rows as an aligned table: columns are (key, heading)."""
    if not rows:
        click.echo(empty)
        return
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows)
               for k, _ in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    click.echo(line([h for _, h in columns]))
    for c in cells:
        click.echo(line(c))


def emit(rows: Any, as_json: bool, show) -> None:
    if as_json:
        click.echo(json.dumps(_plain(rows), indent=None, sort_keys=False))
    else:
        show()


class _Context:
    def __init__(self, uri: str | None):
        self.uri = uri
        self.ttl_seconds: int | None = None
        self._store = None

    def store(self):
        if self._store is None:
            try:
                self._store = open_store(self.uri, ttl_seconds=self.ttl_seconds)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        return self._store


def _since(text: str | None):
    try:
        return Q.parse_since(text)
    except Q.BadQuery as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--since") from None


def _run_query(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (BadFilter, Q.BadQuery) as exc:
        raise click.UsageError(str(exc)) from None
    except (StoreUnavailable, StoreRejected) as exc:
        raise click.ClickException(f"telemetry store: {exc}") from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (one document) instead of a table.")
host_option = click.option("--host", default=None, help="Only this host.")


# --- the group -------------------------------------------------------------------

@click.group()
@click.option("--telemetry", "uri", envvar=URI_ENV, default=None, metavar="URI",
              help=f"Where telemetry is stored: mongodb://HOST:PORT/DB, or sqlite:PATH. "
                   f"Default: ${URI_ENV}, else SQLite in the state directory.")
@click.pass_context
def telemetry(ctx: click.Context, uri: str | None) -> None:
    """Fleet telemetry: samples of guests, interfaces, hosts and switches, and
    events (boots, teardowns, errors), stored in MongoDB or SQLite.

    \b
    Queries:
      status       guests by state per host (newest sample of each guest)
      boot-times   boot time p50/p95/p99 by host and image   (--plot cdf.png)
      top          guests by CPU or memory
      ksm          KSM saving over time                      (--plot ksm.png)
      net          busiest links (and traffic by protocol with --protocols)
      events       boots, teardowns, errors, drop reports
      find         any documents, by a MongoDB filter
      info         the store and what it supports
      prune        remove old telemetry (where the server has no TTL)
    Collecting:
      run          sample this host for a while (the agent does this itself)

    Times are UTC. Durations such as --since take 30s, 10m, 2h, 1d or an ISO
    date. Every query takes --json for scripts.

    \b
    Examples:
      megafleet telemetry status
      megafleet telemetry events --since 10m --kind error
      megafleet telemetry boot-times --plot boot-cdf.png
      megafleet telemetry find --filter '{"meta.kind": "guest", "rss_kb": {"$gt": 100000}}'
      MEGAFLEET_MONGO_URI=mongodb://127.0.0.1:27017/fleet megafleet telemetry top --by mem
    """
    ctx.obj = _Context(uri)


@telemetry.command()
@click.option("--window", default="2m", show_default=True,
              help="Consider guest samples this recent (a guest not sampled within it is not counted).")
@host_option
@json_option
@click.pass_obj
def status(obj: _Context, window: str, host: str | None, as_json: bool) -> None:
    """Guests by state per host.

    Each guest counts once, in the state of its newest sample within --window.
    """
    rows = _run_query(Q.status, obj.store(), _since(window), host)
    states = sorted({r["state"] for r in rows})
    pivot: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = pivot.setdefault(r["host"], {"host": r["host"], "total": 0})
        entry[r["state"]] = r["guests"]
        entry["total"] += r["guests"]
    emit(rows, as_json, lambda: table(list(pivot.values()),
                                      [("host", "HOST")] + [(s, s.upper()) for s in states]
                                      + [("total", "TOTAL")],
                                      "no guest samples in the window"))


@telemetry.command("boot-times")
@click.option("--since", default="1d", show_default=True, help="Boots since (30s, 10m, 2h, 1d, ISO date, all).")
@host_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the boot-time CDF (one curve per image) to this PNG file.")
@json_option
@click.pass_obj
def boot_times(obj: _Context, since: str, host: str | None, plot_path: str | None,
               as_json: bool) -> None:
    """Boot time percentiles by host and image.

    From `boot` events: BOOTS counts successful boots (their durations give
    P50/P95/P99, nearest rank), FAILED the boots that failed.
    """
    when = _since(since)
    rows = _run_query(Q.boot_times, obj.store(), when, host)
    emit(rows, as_json, lambda: table(rows, [
        ("host", "HOST"), ("image", "IMAGE"), ("boots", "BOOTS"), ("failures", "FAILED"),
        ("p50_s", "P50_S"), ("p95_s", "P95_S"), ("p99_s", "P99_S"), ("max_s", "MAX_S")],
        "no boot events"))
    if plot_path:
        from megafleet.collect.plot import PlotUnavailable, boot_cdf

        try:
            boot_cdf(_run_query(Q.boot_durations, obj.store(), when, host), plot_path)
        except (PlotUnavailable, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"wrote {plot_path}", err=as_json)


@telemetry.command()
@click.option("--by", type=click.Choice(["cpu", "mem"]), default="cpu", show_default=True,
              help="cpu: percent of one core over the last interval; mem: resident memory.")
@click.option("-n", "--limit", default=10, show_default=True, help="How many guests (0: all).")
@click.option("--window", default="2m", show_default=True, help="Consider samples this recent.")
@host_option
@json_option
@click.pass_obj
def top(obj: _Context, by: str, limit: int, window: str, host: str | None, as_json: bool) -> None:
    """Guests using the most CPU or memory (newest sample of each guest)."""
    rows = _run_query(Q.top, obj.store(), by, _since(window), limit, host)
    emit(rows, as_json, lambda: table(rows, [
        ("host", "HOST"), ("guest", "GUEST"), ("image", "IMAGE"), ("state", "STATE"),
        ("cpu_pct", "CPU_%"), ("rss_kb", "RSS_KB"), ("time", "SAMPLED")], "no guest samples"))


@telemetry.command()
@click.option("--since", default="1h", show_default=True, help="Samples since (30s, 10m, 2h, 1d, ISO date, all).")
@host_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also write KSM saving over time (one line per host) to this PNG file.")
@json_option
@click.pass_obj
def ksm(obj: _Context, since: str, host: str | None, plot_path: str | None, as_json: bool) -> None:
    """KSM saving over time, from the host samples.

    SAVED is (pages_sharing + ksm_zero_pages) x page size, as the ksm package
    defines it.
    """
    rows = _run_query(Q.ksm, obj.store(), _since(since), host)
    shown = [dict(r, saved_mib=round(r["saving_bytes"] / 2**20, 1)) for r in rows]
    emit(rows, as_json, lambda: table(shown, [
        ("time", "TIME"), ("host", "HOST"), ("saved_mib", "SAVED_MIB"),
        ("pages_shared", "SHARED"), ("pages_sharing", "SHARING")], "no KSM samples"))
    if plot_path:
        from megafleet.collect.plot import PlotUnavailable, ksm_saving

        try:
            ksm_saving(rows, plot_path)
        except (PlotUnavailable, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"wrote {plot_path}", err=as_json)


@telemetry.command()
@click.option("--since", default="10m", show_default=True, help="Samples since (30s, 10m, 2h, 1d, ISO date, all).")
@click.option("-n", "--limit", default=10, show_default=True, help="How many links (0: all).")
@click.option("--protocols", is_flag=True, help="Show traffic by switch and protocol (from the sniff) instead.")
@host_option
@json_option
@click.pass_obj
def net(obj: _Context, since: str, limit: int, protocols: bool, host: str | None,
        as_json: bool) -> None:
    """The busiest links: interfaces (taps, bridges, veths, vxlans) by mean
    throughput, with bytes, packets, drops and errors over the window."""
    when = _since(since)
    if protocols:
        rows = _run_query(Q.sniff, obj.store(), when, host)
        rows = rows[:limit] if limit else rows
        emit(rows, as_json, lambda: table(rows, [
            ("host", "HOST"), ("switch", "SWITCH"), ("protocol", "PROTOCOL"),
            ("packets", "PACKETS"), ("bytes", "BYTES")], "no sniff samples"))
        return
    rows = _run_query(Q.net, obj.store(), when, limit, host)
    emit(rows, as_json, lambda: table(rows, [
        ("host", "HOST"), ("iface", "IFACE"), ("type", "TYPE"), ("mean_bps", "MEAN_B/S"),
        ("max_bps", "MAX_B/S"), ("bytes", "BYTES"), ("packets", "PACKETS"), ("drops", "DROPS"),
        ("errors", "ERRORS")], "no interface samples"))


@telemetry.command()
@click.option("--since", default="10m", show_default=True, help="Events since (30s, 10m, 2h, 1d, ISO date, all).")
@click.option("--kind", default=None,
              help="A level (info, warning, error) or an event name (boot, teardown, ready, drops, ...).")
@host_option
@click.option("--guest", default=None, help="Only events about this guest.")
@click.option("-n", "--limit", default=0, help="Only the newest N (0: all).")
@json_option
@click.pass_obj
def events(obj: _Context, since: str, kind: str | None, host: str | None, guest: str | None,
           limit: int, as_json: bool) -> None:
    """Events, oldest first: boots (with durations or failure reasons),
    teardowns, agent and sampler errors, drop reports, spool warnings."""
    rows = _run_query(Q.events, obj.store(), _since(since), kind, host, guest, limit)

    def detail(e: dict) -> str:
        parts = []
        for key in ("duration_s", "reason", "message", "dropped", "uptime_s"):
            if e.get(key) is not None:
                parts.append(f"{key}={_cell(e[key])}")
        return " ".join(parts)

    shown = [{"time": e["time"], "host": e["meta"]["host"], "guest": e["meta"].get("guest"),
              "level": e.get("level"), "event": e.get("event"), "detail": detail(e)}
             for e in rows]
    emit(rows, as_json, lambda: table(shown, [
        ("time", "TIME"), ("host", "HOST"), ("guest", "GUEST"), ("level", "LEVEL"),
        ("event", "EVENT"), ("detail", "DETAIL")], "no events"))


@telemetry.command()
@click.option("--filter", "filter_text", default="{}", show_default=True,
              help='A MongoDB filter, e.g. \'{"meta.kind": "guest", "rss_kb": {"$gt": 100000}}\'. '
                   'Dates as {"$date": "2026-01-01T00:00:00Z"}.')
@click.option("--collection", type=click.Choice(list(D.COLLECTIONS)), default=D.SAMPLES,
              show_default=True)
@click.option("-n", "--limit", default=20, show_default=True, help="At most N documents (0: all).")
@json_option
@click.pass_obj
def find(obj: _Context, filter_text: str, collection: str, limit: int, as_json: bool) -> None:
    """Documents matching a MongoDB filter, oldest first.

    \b
    On MongoDB/FerretDB every operator the server knows works. The SQLite store
    takes $eq $ne $gt $gte $lt $lte $in $nin $exists $and $or and rejects others.
    Documents: _id, time, meta {kind, host, guest|iface|switch, image, type}, then
    the measurements (see `megafleet.collect.docs`).
    """
    try:
        flt = parse_filter_text(filter_text)
    except BadFilter as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--filter") from None
    docs = _run_query(obj.store().find, collection, flt, limit)
    if as_json:
        click.echo(json.dumps(_plain(docs)))
        return
    if not docs:
        click.echo("no documents match")
    for d in docs:
        click.echo(json.dumps(_plain(d), sort_keys=False))


@telemetry.command()
@json_option
@click.pass_obj
def info(obj: _Context, as_json: bool) -> None:
    """The store in use, what its server supports (time-series collections,
    TTL), and how many documents it holds."""
    store = obj.store()
    try:
        store.ping()
        counts = {c: store.count(c) for c in D.COLLECTIONS}
    except StoreUnavailable as exc:
        raise click.ClickException(f"telemetry store: {exc}") from None
    result = {"store": repr(store), **store.features, **counts}
    emit(result, as_json, lambda: table([result], [(k, k.upper()) for k in result], ""))


@telemetry.command()
@click.option("--older-than", "older_than", required=True,
              help="Remove documents older than this (30m, 12h, 7d, or an ISO date).")
@click.option("--events/--no-events", "with_events", default=False, show_default=True,
              help="Also remove old events (by default only samples go).")
@json_option
@click.pass_obj
def prune(obj: _Context, older_than: str, with_events: bool, as_json: bool) -> None:
    """Remove old telemetry.

    MongoDB servers with TTL support expire samples themselves when the
    collector was started with a TTL (see `info`); this does the same on any
    store (SQLite, FerretDB).
    """
    try:
        cutoff = Q.parse_since(older_than)
    except Q.BadQuery as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--older-than") from None
    if cutoff is None:
        raise click.BadParameter("give a duration or a date", param_hint="--older-than")
    store = obj.store()
    collections = list(D.COLLECTIONS) if with_events else [D.SAMPLES]
    removed = {c: _run_query(store.delete_before, c, cutoff) for c in collections}
    result = {"before": cutoff, **removed}
    emit(result, as_json, lambda: click.echo(
        ", ".join(f"{n} {c}" for c, n in removed.items()) + f" removed (older than {_cell(cutoff)} UTC)"))


@telemetry.command("run")
@click.option("--host", "host_name", default=None, help="Host name in the documents (default: this machine's).")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--interval", type=float, default=10.0, show_default=True, help="Seconds between samples.")
@click.option("--switch", "switches", multiple=True, metavar="[NAME=]BRIDGE",
              help="Sniff this bridge, reported as switch NAME (default: the bridge's name); "
                   "repeatable; needs root.")
@click.option("--vm/--no-vm", "with_vm", default=True, show_default=True,
              help="Sample the guests of the vm engine on this host.")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False), default=None,
              help="Spool directory while the store is away (default: in the state directory).")
@click.option("--ttl", default=None,
              help="Let the server expire samples after this long (7d, 12h), where it supports "
                   "TTL indexes; see `info`. Otherwise use `prune`.")
@click.option("--guest-samples", type=click.Choice(["per-guest", "aggregate"]), default="per-guest",
              show_default=True,
              help="One sample per guest and interval, or one document per interval for all of this "
                   "host's guests (counts by state, CPU and RSS totals): for thousands of guests per "
                   "host; boot events stay per guest.")
@click.pass_obj
def run_command(obj: _Context, host_name: str | None, duration: float | None, interval: float,
                switches: tuple[str, ...], with_vm: bool, spool_dir: str | None,
                ttl: str | None, guest_samples: str) -> None:
    """Sample this host (guests, interfaces, host, KSM, switches) into the store.

    Prints the pipeline's counters every interval (to stderr). The same
    collector (megafleet.collect.collector.Collector) can run inside a host's
    agent; this command runs it on its own. When the store is away, samples are
    spooled to disk and replayed when it returns; nothing accepted is lost.

    \b
    Examples:
      megafleet telemetry run --duration 60 --interval 5
      megafleet telemetry --telemetry mongodb://127.0.0.1:27017/fleet run --switch br0
    """
    import math
    import signal
    import socket

    import trio

    from megafleet.collect.collector import Collector
    from megafleet.collect.spool import SpoolBusy
    from megafleet.names import InvalidName

    host_name = host_name or socket.gethostname().split(".")[0]
    if ttl is not None:
        try:
            obj.ttl_seconds = int(Q.parse_duration(ttl))
        except Q.BadQuery as exc:
            raise click.BadParameter(str(exc), param_hint="--ttl") from None
    if interval <= 0:
        raise click.BadParameter("must be positive", param_hint="--interval")
    source = agent_logs = containers = None
    if with_vm:
        try:
            from megafleet.collect.sources import (vm_agent_logs, vm_container_source,
                                                   vm_guest_source)
            from megafleet.vm.engine import Engine

            engine = Engine()
            source, agent_logs = vm_guest_source(engine), vm_agent_logs(engine)
            containers = vm_container_source(engine)
        except ImportError:
            click.echo("vm engine not available: guests are not sampled", err=True)
    try:
        collector = Collector(host_name, obj.store(), spool_dir=spool_dir, guest_source=source,
                              agent_logs=agent_logs, agent_interval=min(interval, 5.0),
                              container_source=containers,
                              guest_interval=interval, iface_interval=interval,
                              host_interval=interval, sniff_interval=interval,
                              switches=switches, guest_aggregate=guest_samples == "aggregate")
    except InvalidName as exc:
        raise click.BadParameter(str(exc)) from None
    except SpoolBusy as exc:
        raise click.ClickException(str(exc)) from None

    async def report_progress(started: float) -> None:
        while True:
            await trio.sleep(interval)
            c = collector.pipeline.counters
            click.echo(f"[{time.monotonic() - started:6.1f}s] accepted={c.accepted} "
                       f"stored={c.stored} dropped={c.dropped} spooled={c.spooled} "
                       f"replayed={c.replayed} queued={collector.pipeline.pending()}", err=True)

    async def main() -> None:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            # SIGTERM (how `megafleet down` stops us) and Ctrl-C both end in a
            # flush: what is queued is stored, or spooled if the store is away.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                with trio.move_on_after(duration if duration is not None else math.inf):
                    async with trio.open_nursery() as inner:
                        inner.start_soon(report_progress, started)
                        async for signum in signals:
                            click.echo(f"{signal.Signals(signum).name}: stopping, flushing "
                                       "telemetry", err=True)
                            break
                        inner.cancel_scope.cancel()
            collector.stop()
        c = collector.pipeline.counters
        click.echo(f"stopped: accepted={c.accepted} stored={c.stored} dropped={c.dropped} "
                   f"spooled={c.spooled} (spool: {collector.spool.dir})", err=True)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(130)
