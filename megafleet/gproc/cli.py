"""Command line of gproc: `megafleet hosts ...`, `megafleet gproc ...`, `megafleet agent`."""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import click

INVENTORY_HELP = ("Host inventory (TOML). Default: $MEGAFLEET_HOSTS, else ./hosts.toml. "
                  "See `megafleet hosts --help` for the format.")


def _inventory_option(f):
    return click.option("-i", "--inventory", "inventory_path", envvar="MEGAFLEET_HOSTS",
                        default="hosts.toml", show_default=True, metavar="FILE",
                        help=INVENTORY_HELP)(f)


def _select_options(f):
    f = click.option("-w", "--hosts", "hosts", metavar="NAMES",
                     help="Comma-separated host names (default: all).")(f)
    f = click.option("-l", "--label", "labels", multiple=True, metavar="LABEL",
                     help="Only hosts carrying this label (repeatable: all must match).")(f)
    f = click.option("-f", "--fanout", default=8, show_default=True, type=click.IntRange(1, 1024),
                     help="Children per agent in the tree; >= number of hosts gives a flat star.")(f)
    f = click.option("--root-fanout", default=None, type=click.IntRange(1, 4096), metavar="N",
                     help="Sessions the controller itself opens (default: --fanout). Wider than "
                          "--fanout when the controller's link is better than the hosts'.")(f)
    f = click.option("--connect-timeout", default=15.0, show_default=True, type=float, metavar="S",
                     help="Seconds to wait for one host's SSH connection and agent start.")(f)
    return f


def _load(path: str):
    from megafleet.gproc.inventory import InventoryError, load

    try:
        return load(path)
    except InventoryError as e:
        raise click.ClickException(str(e)) from None


def _names(hosts: str | None) -> list[str] | None:
    return [h for h in hosts.split(",") if h] if hosts else None


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        click.echo(msg, err=True)


def _run_with_fleet(inv, names, labels, fanout, root_fanout, connect_timeout, quiet, body):
    """Connect the tree, run `body(fleet)`, tear it down; Ctrl-C is clean."""
    import trio

    from megafleet.gproc import Fleet, FleetError
    from megafleet.gproc.inventory import InventoryError

    async def main():
        count = len(inv.select(names, labels))
        _progress(f"connecting to {count} hosts (fanout {fanout})...", quiet)
        async with Fleet.connect(inv, hosts=names, labels=labels or None, fanout=fanout,
                                 root_fanout=root_fanout, connect_timeout=connect_timeout) as fleet:
            up = sum(1 for s in fleet.status.values() if s.state == "up")
            _progress(f"tree up in {fleet.setup_seconds:.2f} s: {up} up, {count - up} unreachable", quiet)
            return await body(fleet)

    try:
        return trio.run(main)
    except (InventoryError, FleetError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo("interrupted: operation cancelled on every host, agents stopped", err=True)
        sys.exit(130)


def _summary(report) -> str:
    c = report.counts()
    return f"{c['ok']} ok, {c['failed']} failed, {c['unreachable']} unreachable in {report.seconds:.2f} s"


def _print_failures(report) -> None:
    for host, r in report.results.items():
        if r.status != "ok":
            click.echo(f"{host}: {r.status}: {r.error}", err=True)


# --- hosts ---------------------------------------------------------------------


@click.group()
def hosts() -> None:
    """The host inventory: list it, check that every host answers.

    \b
    The inventory is a TOML file (default ./hosts.toml or $MEGAFLEET_HOSTS), or
    "slurm" for the hosts of the current Slurm allocation (SLURM_JOB_NODELIST;
    "slurm:FILE" adds FILE's defaults and overrides):
      [defaults]                    applies to every host that does not set the key
      user = "root"
      port = 22
      agent = "megafleet agent"     remote command starting the agent (shlex words)
      identity = "fleet_key"        SSH private key, also used by inner agents
      known_hosts = "known_hosts"   host keys: an unknown host key is refused
      [[host]]
      name = "node1"
      address = "10.0.0.1"
      labels = ["rack1"]
      capacity = 200                VMs placement may put on this host
      [[range]]                     many hosts in ClusterShell NodeSet notation
      hosts = "node[0001-4480]"     every other key is a default for the range
      address = "10.1.[0-17].[1-250]"   optional, one per host; else by name
      mem_mb = 262144               guest memory budget for placement

    identity and known_hosts must be valid paths on every host (inner agents reach
    their children with them). Relative paths are relative to the inventory file.
    """


@hosts.command("ls")
@_inventory_option
@click.option("-l", "--label", "labels", multiple=True, metavar="LABEL", help="Only hosts with this label.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def hosts_ls(inventory_path: str, labels: tuple[str, ...], as_json: bool) -> None:
    """List the hosts of the inventory (no connection is made)."""
    inv = _load(inventory_path)
    chosen = inv.select(None, list(labels) or None)
    if as_json:
        click.echo(json.dumps({"inventory": inv.source, "identity": inv.identity,
                               "known_hosts": inv.known_hosts,
                               "hosts": [{"name": h.name, "address": h.address, "port": h.port,
                                          "user": h.user, "labels": list(h.labels),
                                          "capacity": h.capacity, "mem_mb": h.mem_mb,
                                          "agent": list(h.agent)}
                                         for h in chosen]}))
        return
    rows = [[h.name, h.address, h.port, h.user, ",".join(h.labels) or "-", h.capacity, h.mem_mb or "-",
             " ".join(h.agent)] for h in chosen]
    click.echo(_table(rows, ["NAME", "ADDRESS", "PORT", "USER", "LABELS", "CAPACITY", "MEM_MB", "AGENT"]))


@hosts.command("check")
@_inventory_option
@_select_options
@click.option("--image", "images", multiple=True, metavar="NAME",
              help="Also report hosts whose image cache lacks this image (a name or hash in the "
                   "local image store; repeatable).")
@click.option("--cache-dir", metavar="DIR", default=None,
              help="The hosts' image cache (default: each host's $MEGAFLEET_CACHE).")
@click.option("--each", is_flag=True, help="One row per host instead of folded ranges.")
@click.option("--timeout", default=30.0, show_default=True, type=float, metavar="S",
              help="Seconds to wait for every host's answer once the tree is up.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def hosts_check(inventory_path, hosts, labels, fanout, root_fanout, connect_timeout, images, cache_dir, each,
                timeout, as_json, quiet) -> None:
    """Build the agent tree and ask every host to answer; report what is wrong,
    folded over host ranges as ClusterShell's clubak does:

    \b
      HOSTS                 STATUS       DETAIL
      node[0001-0011,...]   ok           answered
      node[0012,0450-0452]  unreachable  connection refused
      node0007              unreachable  host key changed or unknown (not in known_hosts)
      node[0100-0101]       image        missing tiny (3f2a9c0e11b2)

    Unreachable covers connection refused, no answer, host key refused (a
    changed key is never accepted), authentication refused and an agent that
    did not start. With --image, hosts that answered but lack the image in
    their cache are listed too. --each gives one row per host (load, kernel).
    Exit status 1 if any host is not ok.
    """
    inv = _load(inventory_path)
    wanted = []
    for name in images:
        from megafleet.imagegen import store

        try:
            wanted.append(store.find(name))
        except (store.ImageNotFound, ValueError) as e:
            raise click.ClickException(f"--image {name}: {e}") from None

    async def body(fleet):
        ping = await fleet.call("gproc.ping", timeout=timeout)
        have = None
        if wanted:
            ok = [h for h, r in ping.results.items() if r.status == "ok"]
            have = await fleet.call("gproc.images", {"hashes": [i.hash for i in wanted], "cache_dir": cache_dir},
                                    hosts=ok, timeout=timeout)
        return ping, have, fleet.setup_seconds

    report, have, setup = _run_with_fleet(inv, _names(hosts), list(labels), fanout, root_fanout,
                                          connect_timeout, quiet or as_json, body)
    rows = check_rows(inv, report, have, wanted)
    bad = [r for r in rows if r.status != "ok"]
    if as_json:
        click.echo(json.dumps({"setup_s": round(setup, 3), **report.to_json(),
                               "problems": [{"hosts": fold_names(r.hosts), "status": r.status,
                                             "detail": r.detail} for r in bad]}))
    elif each:
        table = []
        for name, r in report.results.items():
            detail = f"load {r.value['load']:.2f}  {r.value['uname']}" if r.status == "ok" else (r.error or "")
            table.append([name, r.status, detail])
        for r in bad:
            if r.status == "image":
                table += [[h, r.status, r.detail] for h in r.hosts]
        click.echo(_table(table, ["HOST", "STATUS", "DETAIL"]))
    else:
        folded = fold_rows(rows)
        click.echo(_table([[fold_names(r.hosts), r.status, r.detail] for r in folded],
                          ["HOSTS", "STATUS", "DETAIL"]))
    _progress(_summary(report) + (f"; {sum(len(r.hosts) for r in bad if r.status == 'image')} lack an image"
                                  if wanted else ""), quiet or as_json)
    if bad:
        sys.exit(1)


@dataclass
class CheckRow:
    """Hosts with the same finding."""

    hosts: list[str]
    status: str          # ok | unreachable | failed | image
    detail: str


def reason(host: str, address: str, error: str | None) -> str:
    """A host's error without what names the host, so equal causes fold
    together: 'node0012 (root@10.0.0.12:22): Connect call failed (...)' ->
    'connection refused'."""
    text = (error or "").strip()
    text = re.sub(rf"^{re.escape(host)}(?: \([^)]*\))?: ", "", text)
    lowered = text.lower()
    if "connect call failed" in lowered or "connection refused" in lowered:
        return "connection refused"
    if "host key not trusted" in lowered:
        return "host key changed or unknown (not in known_hosts)"
    if "authentication refused" in lowered:
        return "authentication refused (fleet key not authorised)"
    if "no route to host" in lowered:
        return "no route to host"
    m = re.match(r"no answer within ([\d.]+) s", text)
    if m:
        return f"no answer within {m.group(1)} s"
    if address:
        text = text.replace(address, "<address>")
    return text.replace(host, "<host>") or "no reason given"


def check_rows(inv, report, have, wanted) -> list[CheckRow]:
    """One CheckRow per host of the ping report, plus missing images."""
    by_hash = {i.hash: i for i in wanted}
    rows = []
    for name, r in report.results.items():
        address = inv.by_name[name].address if name in inv.by_name else ""
        if r.status != "ok":
            rows.append(CheckRow([name], r.status, reason(name, address, r.error)))
            continue
        h = have.results.get(name) if have is not None else None
        if h is not None and h.status != "ok":
            rows.append(CheckRow([name], h.status, reason(name, address, h.error)))
        elif h is not None and h.value:
            missing = ", ".join(f"{by_hash[x].name} ({x[:12]})" for x in h.value if x in by_hash)
            rows.append(CheckRow([name], "image", f"missing {missing}"))
        else:
            rows.append(CheckRow([name], "ok", "answered"))
    return rows


def fold_rows(rows: list[CheckRow]) -> list[CheckRow]:
    """Rows with the same status and detail merged (ok first, then by size)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        groups.setdefault((r.status, r.detail), []).extend(r.hosts)
    merged = [CheckRow(hosts, status, detail) for (status, detail), hosts in groups.items()]
    return sorted(merged, key=lambda r: (r.status != "ok", -len(r.hosts), r.detail))


def fold_names(names: list[str]) -> str:
    from megafleet.gproc.inventory import fold

    return fold(names)


# --- gproc -----------------------------------------------------------------------


@click.group()
def gproc() -> None:
    """Run commands and push files on many hosts through a tree of agents.

    The controller starts an agent on a few hosts over SSH; each agent starts the
    agents of its own subtree (fanout children each), so n hosts are reached in
    about log_fanout(n) steps over persistent sessions. Output comes back tagged
    by host. Hosts that are down answer "unreachable"; children of a dead agent
    are re-attached and still served.
    """


@gproc.command("exec", context_settings={"ignore_unknown_options": True})
@_inventory_option
@_select_options
@click.option("--shell", is_flag=True,
              help="Run the words joined as one /bin/sh -c command (default: argv, no shell).")
@click.option("-b", "--gather", is_flag=True,
              help="Fold identical outputs and show each once with its host list (like clush -b).")
@click.option("--timeout", default=60.0, show_default=True, type=float, metavar="S",
              help="Kill the command on hosts where it runs longer than this.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (no streaming).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.argument("command", nargs=-1, required=True)
def gproc_exec(inventory_path, hosts, labels, fanout, root_fanout, connect_timeout, shell, gather,
               timeout, as_json, quiet, command) -> None:
    """Run COMMAND on the selected hosts.

    \b
    Without --shell, COMMAND is an argv: no shell, nothing is interpreted.
    Output lines are printed as they arrive, as "host: line" (stderr lines on
    stderr); with -b, identical outputs are printed once under their host list.
    Exit status: 0 if every host ran the command and it exited 0, else 1.

    \b
    Examples:
      megafleet gproc exec -- uname -r
      megafleet gproc exec -b -l rack1 -- cat /proc/loadavg
      megafleet gproc exec --shell -- 'ls /var/lib/megafleet | wc -l'
    """
    inv = _load(inventory_path)
    argv: Any = " ".join(command) if shell else list(command)
    partial: dict[tuple[str, int], bytes] = {}

    def stream(host: str, fd: int, data: bytes) -> None:
        buf = partial.get((host, fd), b"") + data
        *lines, rest = buf.split(b"\n")
        partial[(host, fd)] = rest
        for line in lines:
            click.echo(f"{host}: {line.decode(errors='replace')}", err=(fd == 2))

    live = not (gather or as_json)

    async def body(fleet):
        return await fleet.exec(argv, shell=shell, timeout=timeout, on_output=stream if live else None)

    report = _run_with_fleet(inv, _names(hosts), list(labels), fanout, root_fanout, connect_timeout,
                             quiet or as_json, body)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    elif gather:
        for names, text in report.gathered():
            click.echo("-" * 15)
            click.echo(_fold(names))
            click.echo("-" * 15)
            click.echo(text, nl=not text.endswith("\n"))
    else:
        for (host, fd), rest in partial.items():
            if rest:
                click.echo(f"{host}: {rest.decode(errors='replace')}", err=(fd == 2))
        _print_failures(report)
    if not as_json:
        _progress(_summary(report), quiet)
    if not report.ok:
        sys.exit(1)


def _fold(names: list[str]) -> str:
    """node1,node2,node3,web1 -> node[1-3],web1 (ClusterShell's compact form)."""
    import re

    groups: dict[str, list[int]] = {}
    plain = []
    for name in names:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if m and (m.group(2) == "0" or not m.group(2).startswith("0")):
            groups.setdefault(m.group(1), []).append(int(m.group(2)))
        else:
            plain.append(name)
    out = []
    for prefix, numbers in groups.items():
        numbers.sort()
        ranges, start = [], numbers[0]
        # -1 after the last: never the next of a host number (digits, >= 0)
        for a, b in zip(numbers, numbers[1:] + [-1]):
            if b != a + 1:
                ranges.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append(prefix + (ranges[0] if len(numbers) == 1 else "[" + ",".join(ranges) + "]"))
    return ",".join(out + plain)


@gproc.command("push")
@_inventory_option
@_select_options
@click.option("--mode", type=str, default=None, metavar="OCTAL",
              help="File mode on the hosts (default: the source file's).")
@click.option("--timeout", default=600.0, show_default=True, type=float, metavar="S",
              help="Give up on hosts that have not finished after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("dest")
def gproc_push(inventory_path, hosts, labels, fanout, root_fanout, connect_timeout, mode, timeout,
               as_json, quiet, source, dest) -> None:
    """Copy SOURCE to DEST (an absolute path) on the selected hosts.

    The file is streamed down the tree in chunks; every agent writes its copy
    while forwarding the same chunks to its children (pipelined), checks the
    SHA-256 and renames the file into place (atomic). Hosts that already hold
    exactly this content are skipped. "{host}" in DEST is replaced by each
    host's name. Exit status 1 if any host did not end with the file.
    """
    inv = _load(inventory_path)
    try:
        file_mode = int(mode, 8) if mode is not None else None
    except ValueError:
        raise click.BadParameter(f"{mode!r} is not an octal mode such as 644", param_hint="--mode") from None

    async def body(fleet):
        _progress(f"pushing {source} to {len(fleet.hosts)} hosts...", quiet or as_json)
        return await fleet.push(source, dest, timeout=timeout, mode=file_mode)

    start = time.monotonic()
    report = _run_with_fleet(inv, _names(hosts), list(labels), fanout, root_fanout, connect_timeout,
                             quiet or as_json, body)
    if as_json:
        click.echo(json.dumps(report.to_json()))
        if not report.ok:
            sys.exit(1)
        return
    rows = [[h, r.status, "skipped (already there)" if r.skipped else (r.error or
             (f"{r.seconds:.2f} s" if r.seconds is not None else ""))] for h, r in report.results.items()]
    click.echo(_table(rows, ["HOST", "STATUS", "DETAIL"]))
    _progress(_summary(report) + f" (total {time.monotonic() - start:.2f} s)", quiet)
    if not report.ok:
        sys.exit(1)


# --- agent -----------------------------------------------------------------------


@click.command()
def agent() -> None:
    """Serve the gproc protocol on stdin/stdout (started by a parent over SSH).

    Not meant to be run by hand: the controller, or a parent agent, starts it
    with the inventory's `agent` command through one SSH session and speaks
    length-prefixed frames on its stdin/stdout. It takes requests only from that
    session and exits when its stdin closes, stopping everything it started.
    """
    from megafleet.gproc.agent import main

    sys.exit(main())
