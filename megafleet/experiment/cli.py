"""`megafleet verify | link | node | capture | run-schedule`: experiments on a
running testbed (see megafleet/experiment/__init__.py)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from megafleet.experiment import control
from megafleet.experiment import refs as R

_testbed_option = click.option("--testbed", "-t", metavar="NAME",
                               help="The testbed (default: the only one up).")
_json_option = click.option("--json", "json_mode", is_flag=True, help="Print JSON, for scripts.")


def _run(fn, *args, **kwargs):
    try:
        return control.run(fn, *args, **kwargs)
    except (control.ControlError, R.RefError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted") from None


def _testbed(name: str | None) -> control.Testbed:
    try:
        return control.testbed(name)
    except control.ControlError as exc:
        raise click.ClickException(str(exc)) from None


def _table(rows: list[list], headers: list[str]) -> str:
    from megafleet.up import table
    return table(rows, headers)


def fmt_settings(s: dict) -> str:
    parts = []
    if s.get("delay_us") is not None:
        parts.append(f"delay {s['delay_us'] / 1000:g}ms")
    if s.get("jitter_us") is not None:
        parts.append(f"jitter {s['jitter_us'] / 1000:g}ms")
    if s.get("loss_pct") is not None:
        parts.append(f"loss {s['loss_pct']:g}%")
    if s.get("rate_bit") is not None:
        parts.append(f"rate {s['rate_bit'] / 1e6:g}mbit")
    return " ".join(parts) or "-"


class _Busy(click.ClickException):
    """The testbed's lock is held (exit status 2: `diff`'s 1 says "something differs")."""

    exit_code = 2


def _late_options(words: tuple[str, ...], takes_value: dict[str, str], flags: dict[str, str]) -> tuple[list[str], dict]:
    """Options written after `A -- B` (click stops parsing options at `--`):
    `takes_value` and `flags` map each spelling to its parameter name."""
    rest: list[str] = []
    found: dict[str, Any] = {}            # parameter name -> its value (True for a flag)
    i = 0
    while i < len(words):
        w = words[i]
        if w in takes_value:
            if i + 1 >= len(words):
                raise click.UsageError(f"option {w} needs a value")
            found[takes_value[w]] = words[i + 1]
            i += 2
        elif w in flags:
            found[flags[w]] = True
            i += 1
        else:
            rest.append(w)
            i += 1
    return rest, found


_LINK_VALUE = {"-t": "testbed", "--testbed": "testbed"}
_LINK_FLAGS = {"--json": "json_mode"}


def _link_words(words: tuple[str, ...]) -> tuple[str, str | None, list[str]]:
    """click drops the first `--` of the command line: `r1 -- r2 delay 5ms`
    arrives as [r1, r2, delay, 5ms]. A second word that is not a setting is B."""
    ws = list(words)
    if "--" in ws:
        return R.split_link_words(ws)
    if not ws:
        raise click.UsageError("expected a link: A -- B")
    if len(ws) > 1 and ws[1] not in R.SETTINGS:
        return ws[0], ws[1], ws[2:]
    return ws[0], None, ws[1:]


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------

@click.command("verify")
@click.argument("testbed", required=False)
@click.option("--within", type=click.FloatRange(0), default=0, show_default=True, metavar="SECONDS",
              help="Repeat failing checks for up to this long (routing converging).")
@_json_option
def verify_command(testbed, within, json_mode):
    """Check every `reachable` assertion of TESTBED live: pings from inside the
    nodes (namespaces with ip netns exec, containers with nsenter, QEMU and
    libvirt guests through their exec channel), IPv4 and IPv6, one per source
    node, destination node and address family.

    \b
    Prints every failed check with the assertion's file:line.
    Exit status: 0 when all pass, 1 when any failed.
    """
    from megafleet.experiment import verify

    tb = _testbed(testbed)
    result = _run(verify.converge, tb, within=within)
    v = result.to_json()
    if json_mode:
        click.echo(json.dumps({"testbed": tb.name, **v}))
    else:
        if not v["checks"]:
            click.echo(f"testbed {tb.name}: no reachable assertions")
        for line in verify.summary_lines(result):
            click.echo(line)
    if not v["ok"]:
        sys.exit(1)


# ---------------------------------------------------------------------------
# link
# ---------------------------------------------------------------------------

@click.group("link")
def link():
    """Change a running testbed's links: impairments, cables pulled and plugged.

    \b
    A and B are the language's references: names, ranges (web[1..10]), globs
    (core*), @group; a link is node -- switch, node -- node or switch --
    switch. `A` alone means every link of A.
    Changes take effect at once on live traffic; they are recorded on each
    host, shown by `link show`, and put back by `up` of the same file.
    """


def _print_done(done: list[dict], json_mode: bool, key: str) -> None:
    if json_mode:
        click.echo(json.dumps(done))
        return
    rows = [[d["link"], d["host"], d["iface"], fmt_settings(d["settings"]) if key == "settings" else d[key]]
            for d in done]
    click.echo(_table(rows, ["LINK", "HOST", "IFACE", key.upper()]))


@link.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--clear", is_flag=True,
              help="Every setting not given on the command line goes back to none.")
@_testbed_option
@_json_option
def link_set(words, clear, testbed, json_mode):
    """A -- B [delay D] [jitter J] [loss P%] [rate R]: change a link's impairments.

    \b
    Values: delay/jitter 50ms, 500us, 1s; loss 0.5%; rate 10mbit, 1gbit;
    `none` removes a setting (delay none); --clear removes every setting not
    given. Delay applies in each direction (a ping's round trip grows by
    twice the delay).
    This kernel has no netem: delay, jitter and loss are a VDE wirefilter.
    A link through a switch gets one spliced into its host side the first
    time (about 100 ms); a node -- node link (a veth between two namespaces)
    gets one inside the two namespaces (tc mirred redirects the veth's
    traffic through it); a namespace on a VDE switch is plugged into the
    switch through one (its interface is made again: a brief carrier loss).
    --clear (or none of delay, jitter and loss) takes these two out again.
    Later changes take a few ms. Rate alone is tc tbf. A QEMU guest's port
    on a VDE switch cannot be changed at runtime.

    \b
    Examples:
      megafleet link set r1 -- core delay 50ms jitter 5ms
      megafleet link set 'lab*' -- lab1 loss 5%
      megafleet link set r1 -- core delay none loss none
      megafleet link set r1 -- r2 --clear
    """
    words, late = _late_options(words, _LINK_VALUE, {**_LINK_FLAGS, "--clear": "clear"})
    testbed, json_mode = late.get("testbed", testbed), late.get("json_mode", json_mode)
    clear = late.get("clear", clear)
    a, b, rest = _link_words(words)
    try:
        settings = R.clear_others(R.parse_settings(rest) if rest else R.LinkSettings()) if clear \
            else R.parse_settings(rest)
    except R.RefError as exc:
        raise click.ClickException(str(exc)) from None
    tb = _testbed(testbed)
    done = _run(control.link, tb, "set", a, b, settings)
    _print_done(done, json_mode, "settings")


def _link_state_command(word: str, doc: str):
    """`link down` and `link up`: the same command but for the state it sets."""

    @link.command(word, context_settings={"ignore_unknown_options": True}, help=doc)
    @click.argument("words", nargs=-1, required=True, type=click.UNPROCESSED)
    @_testbed_option
    @_json_option
    def command(words, testbed, json_mode):
        words, late = _late_options(words, _LINK_VALUE, _LINK_FLAGS)
        testbed, json_mode = late.get("testbed", testbed), late.get("json_mode", json_mode)
        a, b, rest = _link_words(words)
        if rest:
            raise click.UsageError(f"unexpected {' '.join(rest)!r} after the link")
        done = _run(control.link, _testbed(testbed), word, a, b)
        _print_done(done, json_mode, "state")

    return command


link_down = _link_state_command(
    "down", "A -- B: pull the cable (both ends lose carrier; addresses stay).\n\n"
    "Routing daemons see the carrier go and reconverge around the link.")
link_up = _link_state_command("up", "A -- B: plug the cable back in.")


@link.command("show")
@click.argument("testbed", required=False)
@click.option("--changed", is_flag=True, help="Only links changed at runtime.")
@_json_option
def link_show(testbed, changed, json_mode):
    """Every link of TESTBED: its state (live) and settings (as changed at
    runtime, else as declared)."""
    rows = _run(control.link_show, _testbed(testbed))
    if changed:
        rows = [r for r in rows if r["changed"]]
    if json_mode:
        click.echo(json.dumps(rows))
        return
    click.echo(_table([[r["link"], r["kind"], r["host"], r["iface"], r["state"], fmt_settings(r["settings"]),
                        "runtime" if r["changed"] else "declared"] for r in rows],
                      ["LINK", "KIND", "HOST", "IFACE", "STATE", "SETTINGS", "FROM"]))


# ---------------------------------------------------------------------------
# node
# ---------------------------------------------------------------------------

@click.command("node")
@click.argument("action", type=click.Choice(["stop", "start", "restart", "kill"]))
@click.argument("pattern")
@_testbed_option
@_json_option
def node_command(action, pattern, testbed, json_mode):
    """Fail and restore nodes: ACTION every node matching PATTERN (a name,
    range, glob or @group).

    \b
    Guests (QEMU, libvirt, containers):
      stop     shut the guest down (QEMU quit, SIGTERM)
      kill     SIGKILL it (a crash)
      start    boot it again from the same spec: same name, MACs, addresses
      restart  stop, then start
    Namespace nodes (hosts, routers): stop/kill stop a router's routing
    daemons (kill: SIGKILL) and pull all the node's cables (a dead box
    forwards nothing); start plugs them back and starts the daemons.
    """
    done = _run(control.node, _testbed(testbed), action, pattern)
    if json_mode:
        click.echo(json.dumps(done))
        return
    click.echo(_table([[d["node"], d["host"], d["action"], f"{d['seconds']:.1f}"] for d in done],
                      ["NODE", "HOST", "ACTION", "SECONDS"]))


# ---------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------

@click.command("capture", context_settings={"ignore_unknown_options": True})
@click.argument("words", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("-w", "write", metavar="FILE", default=None,
              help="Write the pcap to FILE, or '-' for stdout (default: TARGET.pcap).")
@click.option("--count", "-c", type=click.IntRange(1), help="Stop after this many packets.")
@click.option("--duration", type=click.FloatRange(0.1), metavar="SECONDS", help="Stop after this long.")
@click.option("--filter", "bpf", metavar="BPF", help="A tcpdump filter, e.g. 'icmp or arp'.")
@_testbed_option
def capture_command(words, write, count, duration, bpf, testbed):
    """Capture packets of NODE[:IFACE], SWITCH or A -- B into a pcap.

    \b
    NODE[:IFACE]  a node's interface (default eth0); a guest's NIC is seen
                  from its host-side end
    SWITCH        the switch's bridge (on the first host that has it)
    A -- B        the host side of that link
    The capture runs on the host where the interface is and streams back
    through gproc; `-w -` writes to stdout, e.g.
      megafleet capture r1 -- core -w - | wireshark -k -i -
    Stops after --count packets, --duration seconds, or Ctrl-C.
    """
    words, late = _late_options(words, {"-w": "write", "-c": "count", "--count": "count",
                                        "--duration": "duration", "--filter": "bpf", "-t": "testbed",
                                        "--testbed": "testbed"}, {})
    write, testbed, bpf = late.get("write", write), late.get("testbed", testbed), late.get("bpf", bpf)
    try:
        count = int(late["count"]) if "count" in late else count
        duration = float(late["duration"]) if "duration" in late else duration
    except ValueError:
        raise click.UsageError("--count takes a whole number, --duration seconds") from None
    if not words:
        raise click.UsageError("expected what to capture: NODE[:IFACE], SWITCH or A -- B")
    a, b, rest = _link_words(words) if len(words) > 1 else (words[0], None, [])
    if rest:
        raise click.UsageError(f"unexpected {' '.join(rest)!r}")
    text = f"{a} -- {b}" if b is not None else a
    tb = _testbed(testbed)
    try:
        what = control.parse_capture_target(tb.compiled(), text)
    except (R.RefError, control.ControlError) as exc:
        raise click.ClickException(str(exc)) from None
    if write is None:
        write = "".join(c if c.isalnum() or c in "_.-" else "_" for c in text.replace(" -- ", "--")) + ".pcap"
    if write == "-":
        out = sys.stdout.buffer
    else:
        out = open(write, "wb")
    got = {"bytes": 0}

    def sink(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()
        got["bytes"] += len(chunk)

    t0 = time.monotonic()
    try:
        _run(control.capture, tb, what, sink, count=count, duration=duration, bpf=bpf)
    finally:
        if write != "-":
            out.close()
    if write != "-":
        click.echo(f"{write}: {got['bytes']} bytes in {time.monotonic() - t0:.1f} s", err=True)


# ---------------------------------------------------------------------------
# run-schedule
# ---------------------------------------------------------------------------

@click.command("run-schedule")
@click.argument("testbed", required=False)
@click.option("--start", type=float, default=None, metavar="EPOCH",
              help="Epoch time the schedule's offsets count from (default: now).")
@_json_option
def run_schedule_command(testbed, start, json_mode):
    """Run TESTBED's fault schedule (its `at` and `every` statements) now.

    `megafleet up` starts it by itself in the background when the
    description has one. Each action is a `fault` event in telemetry
    (`megafleet telemetry events --kind fault`).
    """
    from megafleet.experiment import schedule

    tb = _testbed(testbed)
    log = _run(schedule.run, tb, start, say=lambda s: click.echo(s, err=json_mode))
    if json_mode:
        click.echo(json.dumps(log))
    elif not log:
        click.echo(f"testbed {tb.name}: no fault schedule")
    if any("error" in e for e in log):
        sys.exit(1)


# ---------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------

@click.command("diff")
@click.argument("testbed_file", metavar="TESTBED.fleet", type=click.Path(dir_okay=False))
@click.option("--name", "-N", help="Testbed name (default: the file's stem, as for `up`).")
@click.option("-D", "defines", multiple=True, metavar="NAME=VALUE", help="Set a parameter of the description.")
@click.option("--no-wait", is_flag=True,
              help="Fail at once (status 2) if another command (up, down, a live change) holds the "
                   "testbed's lock, instead of waiting for it.")
@_json_option
def diff_command(testbed_file, name, defines, no_wait, json_mode):
    """Show what differs between TESTBED.fleet and the testbed running from it:
    nodes, links, switches, impairments, routing, each with its file:line.

    \b
    + added (up of the file creates it)
    - removed (up of the file removes it)
    ~ changed (up of the file changes it in place, or re-creates it)
    Guests and namespaces not listed stay as they are when `megafleet up`
    applies the file: running guests keep their pids.
    Exit status: 0 when nothing differs, 1 when something does.

    It reads the running testbed under its lock, as `up` and `down` hold it:
    while one of them (or a live change) runs, diff waits for it, saying for
    whom; with --no-wait it fails instead.
    """
    from megafleet import locks
    from megafleet.experiment import reconcile
    from megafleet.up import UpError, parse_defines

    try:
        result = _run(reconcile.diff_file, testbed_file, name, parse_defines(defines), wait=not no_wait,
                      on_wait=lambda text: click.echo(text, err=True))
    except locks.LockBusy as exc:
        raise _Busy(f"{exc}; without --no-wait, diff waits for it") from None
    except UpError as exc:
        raise click.ClickException(str(exc)) from None
    rows = result["rows"]
    if json_mode:
        click.echo(json.dumps(result))
    else:
        if not result["up"]:
            click.echo(f"testbed {result['testbed']} is not up: everything would be created", err=True)
        click.echo(_table([[r["change"], r["kind"], r["name"], r["host"], r["loc"] or ""] for r in rows],
                          ["", "KIND", "NAME", "HOST", "FILE:LINE"]))
        counts = {c: sum(1 for r in rows if r["change"] == c) for c in "+-~"}
        click.echo(f"\n{counts['+']} to add, {counts['-']} to remove, {counts['~']} to change")
    if rows:
        sys.exit(1)
