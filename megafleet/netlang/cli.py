"""`megafleet net`: check, show, draw, export, up and down a testbed description."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from megafleet.netlang.errors import CompileError

_DEFINE_HELP = "Set a parameter declared with 'param NAME = DEFAULT' (repeatable)."


def _defines(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{v!r}: expected NAME=VALUE", param_hint="-D")
        out[name] = value
    return out


def _compile(file: str, defines: tuple[str, ...], graph: bool = True):
    from megafleet.netlang.compiler import compile_file

    try:
        net_ = compile_file(file, _defines(defines), graph=graph)
    except CompileError as err:
        click.echo(str(err), err=True)
        sys.exit(1)
    # A foreign file read directly: what it had that was not carried over, as
    # `megafleet import` reports it (stderr: stdout may be the command's output).
    for warning in net_.import_warnings:
        click.echo(warning, err=True)
    return net_


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _default_name(file: str, name: str | None) -> str:
    """-N NAME, or the name `megafleet up` derives from the file name."""
    from megafleet.names import InvalidName, testbed_name

    try:
        return testbed_name(file, name)
    except InvalidName as exc:
        raise click.UsageError(str(exc))


@click.group()
def net() -> None:
    """Describe networks in the megafleet language (*.fleet), check them, draw
    them, and bring them up on this host.

    \b
    A description, in short:
      pool lans 10.1.0.0/16                 where automatic subnets come from
      switch lan[1..4]                      four switches (Linux bridges)
      router gw { iface lan* auto; ospf }   one router on every lan, OSPF
      host h[1..100] on lan1                100 namespace hosts
      vm web[1..10] image tiny mem 64M on lan2
      link lan3 -- lan4 delay 20ms loss 0.1%
      reachable h1 web10                    checked when compiling

    The full grammar: `python -m pydoc megafleet.netlang`.
    """


@net.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-D", "--define", "defines", multiple=True, metavar="NAME=VALUE", help=_DEFINE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(file: str, defines: tuple[str, ...], as_json: bool) -> None:
    """Compile FILE and report every error at once.

    Each error names file:line:col, quotes the line with a caret under the word
    that is wrong, and says what is wrong. Exit status 0 when the description
    compiles, 1 otherwise. Needs no root and changes nothing.
    """
    t0 = time.perf_counter()
    net_ = _compile(file, defines)
    seconds = time.perf_counter() - t0
    counts = net_.counts()
    if as_json:
        click.echo(json.dumps({"ok": True, "file": file, "counts": counts, "seconds": round(seconds, 3)}))
        return
    click.echo(f"{file}: ok: " + ", ".join(f"{v} {k}{'es' if k == 'switch' and v != 1 else ('s' if v != 1 else '')}"
                                             for k, v in counts.items())
               + f", {len(net_.domains)} networks, {len(net_.reachable)} reachability assertions hold "
                 f"({seconds:.2f} s)")


@net.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-D", "--define", "defines", multiple=True, metavar="NAME=VALUE", help=_DEFINE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def show(file: str, defines: tuple[str, ...], as_json: bool) -> None:
    """Summarise FILE: node counts, networks with their subnets, routers.

    \b
    Networks: one row per layer-2 domain (a switch, a VLAN of it, switches
    joined by links, or a point-to-point link) with its subnets and how many
    interfaces it has. Routers: how each routes (static routes computed from
    the graph, OSPF or BGP through FRR) and whether it runs as a namespace or a
    VM.
    """

    net_ = _compile(file, defines, graph=False)
    networks = []
    for d in net_.domains:
        members = sum(len(i.members) for i in d.ifaces)
        networks.append({"network": d.name, "switches": d.switches, "vlan": d.vlan,
                         "subnets": [str(d.subnets[f]) for f in sorted(d.subnets)],
                         "interfaces": members, "mtu": d.mtu,
                         "routers": sorted({r for r, _ in d.routers})})
    routers = []
    for name in net_.routers():
        g = net_.groups[net_.index[name][0]]
        view = net_.node(name)
        routing = [p for p in ("ospf", "bgp") if p in g.props] or ["static"]
        routers.append({"router": name, "runs_as": "vm" if "image" in g.props else "namespace",
                        "routing": routing, "interfaces": len(view.ifaces),
                        "static_routes": len(view.routes)})
    pools = [{"pool": p.name, "subnet": str(p.subnet), "per": f"/{p.per}"} for p in net_.pools.values()]
    if as_json:
        click.echo(json.dumps({"file": file, "counts": net_.counts(), "pools": pools,
                               "networks": networks, "routers": routers}))
        return
    counts = net_.counts()
    click.echo(f"{file}: {sum(counts.values())} nodes: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if pools:
        click.echo("\n" + _table([[p["pool"], p["subnet"], p["per"]] for p in pools], ["POOL", "SUBNET", "PER"]))
    shown = networks[:200]
    click.echo("\n" + _table([[n["network"], " ".join(n["subnets"]) or "-", n["interfaces"], n["mtu"],
                               n["vlan"] or "-", ",".join(n["routers"]) or "-"] for n in shown],
                             ["NETWORK", "SUBNETS", "IFACES", "MTU", "VLAN", "ROUTERS"]))
    if len(networks) > len(shown):
        click.echo(f"... and {len(networks) - len(shown)} more networks (--json lists all)")
    if routers:
        click.echo("\n" + _table([[r["router"], r["runs_as"], "+".join(r["routing"]), r["interfaces"],
                                   r["static_routes"]] for r in routers],
                                 ["ROUTER", "RUNS AS", "ROUTING", "IFACES", "STATIC ROUTES"]))


@net.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Where to write: .svg, .png (rendered by Graphviz) or .dot.")
@click.option("-D", "--define", "defines", multiple=True, metavar="NAME=VALUE", help=_DEFINE_HELP)
def draw(file: str, output: str, defines: tuple[str, ...]) -> None:
    """Draw FILE's topology as SVG or PNG.

    Every declared group (web[1..1000]) is one box with its range and count, so
    a drawing of 10,000 nodes stays readable; switches show their subnets,
    routers their routing protocol; edges carry member counts and VLANs.
    """
    from megafleet.netlang.draw import draw as draw_net

    net_ = _compile(file, defines, graph=False)
    try:
        draw_net(net_, Path(output))
    except (ValueError, RuntimeError) as err:
        raise click.ClickException(str(err))
    except OSError as err:
        raise click.ClickException(f"cannot write {output}: {err.strerror or err}")
    click.echo(f"wrote {output}")


@net.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-D", "--define", "defines", multiple=True, metavar="NAME=VALUE", help=_DEFINE_HELP)
@click.option("--json", "as_json", is_flag=True, default=True, help="JSON output (the default format).")
@click.option("-f", "--format", "fmt", type=click.Choice(["json", "clab", "graphml"]), default="json",
              show_default=True, help="json: the compiled network; clab: a containerlab topology; "
                                      "graphml: a GraphML graph (networkx's writer).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
def export(file: str, defines: tuple[str, ...], as_json: bool, output: str | None, fmt: str = "json") -> None:
    """Export the compiled network of FILE.

    \b
    json     every node with its interfaces, addresses, gateways and routes;
             every network with its subnets; switches, links, pools, parameters.
    clab     containerlab YAML: hosts and vms -> kind linux, routers -> kind
             linux with FRR's image, switches -> kind bridge, the switch mgmt ->
             the mgmt section; links keep the interface names.
    graphml  one node per host, router, vm and switch (attribute kind), one
             edge per link with interface names, delay and rate; parallel
             links stay parallel. `megafleet import` reads both back.
    """
    from megafleet.netlang.export import to_json

    net_ = _compile(file, defines, graph=False)
    try:
        out = open(output, "w") if output else sys.stdout
    except OSError as err:
        raise click.ClickException(f"cannot write {output}: {err.strerror or err}")
    try:
        if fmt != "json":
            from megafleet.netlang.importers import formats_export
            out.write(formats_export(net_, fmt, Path(file).name.split(".")[0]))
            return
        json.dump(to_json(net_), out)
        out.write("\n")
    finally:
        if output:
            out.close()


@net.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-N", "--name", help="Testbed name (<= 8 characters; prefixes namespaces and "
                                   "interfaces). Default: the file name without .fleet.")
@click.option("-D", "--define", "defines", multiple=True, metavar="NAME=VALUE", help=_DEFINE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def up(file: str, name: str | None, defines: tuple[str, ...], as_json: bool) -> None:
    """Bring FILE's network up on this host (root).

    \b
    Switches become Linux bridges (or vde_switch processes with 'vde'), hosts
    and routers network namespaces NAME-NODE joined by veth pairs, links get tc
    netem/tbf shaping, routers forwarding with static routes or FRR daemons,
    vm nodes taps booted through the vm engine; last, the startup commands
    (`exec "CMD"`) of hosts and routers run in their namespaces (a command
    that fails stops here, naming node, command and line; one still running
    after MEGAFLEET_EXEC_WAIT_S, default 10 s, stays as a recorded process).
    Everything is recorded before it is created. Running it again changes
    nothing; a testbed left half-built by a crash is torn down and rebuilt.
    """
    from megafleet import proc
    from megafleet.netlang import live

    testbed = _default_name(file, name)
    net_ = _compile(file, defines, graph=False)
    progress = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    try:
        result = live.up(net_, testbed, progress)
    except (live.LiveError, ValueError) as err:
        raise click.ClickException(str(err))
    except proc.CommandFailed as err:
        raise click.ClickException(f"{err}; 'megafleet net down {testbed}' removes what was created")
    if as_json:
        click.echo(json.dumps(result))


@net.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def down(target: str, as_json: bool) -> None:
    """Tear down testbed TARGET (a name, or the .fleet file it was brought up
    from) on this host: stop its processes (also any started inside its
    namespaces), delete its namespaces, bridges, veths and taps, remove its
    files. Works after a crash and when run twice."""
    from megafleet.netlang import live

    # A description file (.fleet, or an imported .clab.yml, .graphml, ...): named as `up` named it.
    testbed = _default_name(target, None) if target.endswith(".fleet") or Path(target).is_file() else target
    progress = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    try:
        result = live.down(testbed, progress)
    except live.LiveError as err:
        raise click.ClickException(str(err))
    if as_json:
        click.echo(json.dumps(result))


@net.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_(as_json: bool) -> None:
    """List the testbeds recorded as up on this host."""
    from megafleet.ledger import Ledger
    from megafleet.netlang.live import OWNER

    rows = [{"testbed": r.key, "file": r.data.get("file"), "complete": r.data.get("complete"),
             **r.data.get("counts", {})} for r in Ledger().list(OWNER, "testbed")]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no testbed is up")
        return
    click.echo(_table([[r["testbed"], r["file"], "up" if r["complete"] else "partial",
                        r.get("namespaces", "-"), r.get("frr", "-")] for r in rows],
                      ["TESTBED", "FILE", "STATE", "NAMESPACES", "FRR ROUTERS"]))
