"""`megafleet import`: other tools' topologies to a readable `.fleet`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

from megafleet.netlang.importers import FORMATS


def default_output(path: str) -> str:
    """lab.clab.yml -> lab.fleet; Geant2012.graphml -> Geant2012.fleet."""
    name = Path(path).name
    for suffix in (".clab.yml", ".clab.yaml", ".graphml", ".gml", ".gns3", ".yml", ".yaml", ".json"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return str(Path(path).with_name(name + ".fleet"))


@click.command(name="import")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS),
              help="The input's format. Default: from the file name (.clab.yml, .graphml, .gml, "
                   ".gns3) or its content (netlab's topology.yml).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the .fleet ('-' for stdout). Default: beside the first FILE, "
                   "named after it (lab.clab.yml -> lab.fleet).")
@click.option("--routing", type=click.Choice(["ospf", "bgp", "static"]),
              help="How routers route. Default: OSPF for GraphML/GML maps, static routes computed "
                   "from the graph for containerlab and GNS3, netlab's own modules.")
@click.option("--delays", type=click.Choice(["geo"]),
              help="GraphML/GML: link delay from the great-circle distance between the ends' "
                   "Latitude/Longitude at 2/3 of the speed of light.")
@click.option("--rates", is_flag=True, help="GraphML/GML: LinkSpeed (LinkSpeedRaw) becomes the link's rate.")
@click.option("--hosts-per-router", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="GraphML/GML: a LAN switch with N namespace hosts behind every router.")
@click.option("--no-mgmt", is_flag=True, help="containerlab: leave the management network out.")
@click.option("--linux", type=click.Choice(["host", "container"]), default="host", show_default=True,
              help="containerlab: kind linux nodes become namespace hosts, or container guests "
                   "(vm ... driver container) booted from --image.")
@click.option("--image", "image", type=click.Path(dir_okay=False), default="examples/images/tiny.toml",
              show_default=True, help="containerlab --linux container: the guests' image spec (imagegen "
                                      "TOML), relative to the written .fleet or absolute.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compile the result before writing it: nothing is written if it does not compile.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (and warnings) as JSON.")
def import_command(files: tuple[str, ...], fmt: str | None, output: str | None, routing: str | None,
                   delays: str | None, rates: bool, hosts_per_router: int, no_mgmt: bool, linux: str,
                   image: str, check: bool, as_json: bool) -> None:
    """Convert FILES (a containerlab, GraphML, GML, netlab or GNS3 topology) to a
    .fleet description, with a comment on every statement naming the file and
    line it came from.

    \b
    containerlab  linux nodes -> namespace hosts; frr and vendor kinds -> FRR
                  routers (their configuration is not carried over); links keep
                  their interface names (link a:eth1 -- b:eth1); mgmt -> switch
                  mgmt on every node's eth0; bridges -> switches; netem keys on
                  a link (delay, jitter, loss, rate) are kept. Two files of a
                  multi-host pair are imported together: their vxlan links with
                  the same vni become one link.
    GraphML/GML   (Topology Zoo, networkx) nodes -> routers (OSPF), edges ->
                  links, hyperedges -> switches, parallel edges stay parallel;
                  labels become valid unique names (Zürich -> Zurich).
    netlab        nodes, groups, links (short, LAN, dict forms), module ospf/bgp
                  with bgp.as.
    GNS3          nodes (vpcs/docker -> hosts, dynamips/qemu/iou -> routers,
                  ethernet_switch/hub -> switches), links with delay/loss filters.

    What has no equivalent is reported as a warning with file:line, and listed
    at the top of the .fleet. Errors (a malformed file, a link to a node that
    does not exist) name file:line:col; then nothing is written and the exit
    status is 1. `net check`, `net up`, `up`, `plan` and `draw` also read these
    files directly.

    \b
    Examples:
      megafleet import lab.clab.yml
      megafleet import Geant2012.graphml --hosts-per-router 2 --delays geo -o geant.fleet
      megafleet import siteA.clab.yml siteB.clab.yml -o sites.fleet
    """
    from megafleet.netlang.compiler import compile_text
    from megafleet.netlang.errors import CompileError
    from megafleet.netlang.importers import ImportFailed, ImportOptions, convert

    opts = ImportOptions(routing=routing, delays=delays, rates=rates, hosts_per_router=hosts_per_router,
                         mgmt=not no_mgmt, linux=linux, image=image)
    try:
        result = convert(list(files), fmt, opts)
    except ImportFailed as err:
        click.echo(err.diagnostics().render() + f"\n{len(err.errors)} error"
                   f"{'s' if len(err.errors) != 1 else ''}; nothing written", err=True)
        sys.exit(1)
    except ValueError as err:
        raise click.UsageError(str(err))
    out = output or default_output(files[0])
    if check:
        try:
            net_ = compile_text(result.text, name=out if out != "-" else "<import>.fleet", graph=False)
        except CompileError as err:
            click.echo(f"{err}\nthe imported description does not compile; nothing written", err=True)
            sys.exit(1)
        counts = net_.counts()
    else:
        counts = None
    if out == "-":
        sys.stdout.write(result.text)
    else:
        # Write whole or not at all: a temporary file renamed into place.
        target = Path(out)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(result.text)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    if as_json:
        click.echo(json.dumps({"format": result.format, "sources": result.sources, "output": out,
                               "counts": counts, "warnings": [n.render() for n in result.warnings]}),
                   err=out == "-")
        return
    for n in result.warnings:
        click.echo(n.render(), err=True)
    if out != "-":
        what = ", ".join(f"{v} {k}{'es' if k == 'switch' and v != 1 else ('s' if v != 1 else '')}"
                         for k, v in counts.items()) if counts else "not checked"
        click.echo(f"wrote {out} ({result.format}: {what}; {len(result.warnings)} warnings)")
