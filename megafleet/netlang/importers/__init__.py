"""Importers of other tools' topologies: containerlab, GraphML / GML (Topology
Zoo, networkx), netlab and GNS3, one module per format.

Each turns its input into `.fleet` source text (`Imported.text`), which the
normal parser compiles: `megafleet import` writes that text for the user to read
and edit, and `net check`, `net up`, `up`, `plan` and `draw` accept the original
files directly through `fleet_source`, called where the compiler reads a file.
See `common` for why text rather than a model.
"""

from __future__ import annotations

import gc
import importlib
from dataclasses import dataclass
from pathlib import Path

from megafleet.netlang.importers.common import (ImportFailed, ImportOptions, Imported,  # noqa: F401
                                                 Note)

FORMATS = ("clab", "graphml", "gml", "netlab", "gns3")
# format -> module with convert(files: list[(file, text)], opts) -> Imported
_MODULES = {"clab": "clab", "graphml": "graphml", "gml": "graphml", "netlab": "netlab", "gns3": "gns3"}


def detect(path: str | Path, text: str | None = None) -> str | None:
    """The format of `path`, from its name, else from its first bytes; None for a
    `.fleet` description (or anything not recognised as an importable format)."""
    name = Path(path).name.lower()
    if name.endswith(".fleet"):
        return None
    for suffix, fmt in ((".clab.yml", "clab"), (".clab.yaml", "clab"), (".graphml", "graphml"),
                        (".gml", "gml"), (".gns3", "gns3")):
        if name.endswith(suffix):
            return fmt
    if text is None:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(65536)
        except OSError:
            return None
    head = text.lstrip()[:4096]
    if head.startswith("<") and "<graphml" in head:
        return "graphml"
    if head.startswith("{") and '"topology"' in text and '"project_id"' in text:
        return "gns3"
    if head.startswith(("graph", "Creator", "creator")) and "[" in head:
        return "gml"
    if name.endswith((".yml", ".yaml")):
        # containerlab nests nodes under `topology:`; netlab has them at the top.
        import re
        if re.search(r"^topology\s*:", text, re.M):
            return "clab"
        if re.search(r"^nodes\s*:", text, re.M):
            return "netlab"
    return None


def convert(paths: list[str | Path], fmt: str | None = None,
            opts: ImportOptions | None = None) -> Imported:
    """Read and convert `paths` (several only for a containerlab multi-host pair).
    Raises ImportFailed (file:line:col and what is wrong) for unreadable or
    invalid input, and ValueError for an unknown format."""
    opts = opts or ImportOptions()
    if not paths:
        raise ValueError("no file to import")
    files: list[tuple[str, str]] = []
    for p in paths:
        try:
            files.append((str(p), Path(p).read_text(encoding="utf-8")))
        except UnicodeDecodeError as err:
            raise ImportFailed([Note(None, f"{p}: not UTF-8 text ({err.reason} at byte {err.start})")]) from None
        except OSError as err:
            raise ImportFailed([Note(None, f"cannot read {p}: {err.strerror or err}")]) from None
    if fmt is None:
        fmts = {detect(f, t) for f, t in files}
        if None in fmts or len(fmts) != 1:
            which = [f for f, t in files if detect(f, t) is None]
            raise ValueError(f"cannot tell the format of {which[0] if which else paths[0]}: "
                             f"give --format ({', '.join(FORMATS)})")
        fmt = fmts.pop()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    if len(files) > 1 and fmt != "clab":
        raise ValueError("several files are imported together only for a containerlab "
                         "multi-host pair (clab)")
    module = importlib.import_module(f"megafleet.netlang.importers.{_MODULES[fmt]}")
    # No cyclic garbage collection while converting, as in the compiler: a map's
    # graph, XML tree and positions (~10^5 objects for 10,000 nodes) all live
    # until the conversion returns, and each collection of the oldest generation
    # walked all of them again (a third of a 10,000-node import's CPU time).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if fmt == "gml":
            return module.convert_gml(files, opts)
        return module.convert(files, opts)
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class FleetSource:
    """A foreign file as the compiler reads it: `name` is `PATH.fleet`, so
    messages quote the imported `text` (whose comments point back at PATH);
    `warnings` say what was not carried over, each with PATH:line, for the
    commands to print (read directly, a foreign file's losses are reported as
    `megafleet import` reports them, never silently dropped)."""

    name: str
    text: str
    warnings: list[str]


def fleet_source(path: str | Path, text: str | None = None) -> FleetSource | None:
    """For the compiler: `path` as a description when it is in an importable
    format, else None. Raises ImportFailed."""
    fmt = detect(path, text)
    if fmt is None:
        return None
    result = convert([path], fmt)
    return FleetSource(f"{path}.fleet", result.text, [n.render() for n in result.warnings])


def formats_export(net, fmt: str, name: str) -> str:
    """A compiled Net as `clab` (containerlab YAML, lab `name`) or `graphml`."""
    if fmt == "clab":
        from megafleet.netlang.importers.clab import export
        return export(net, name)
    if fmt == "graphml":
        from megafleet.netlang.importers.graphml import export as export_graphml
        return export_graphml(net)
    raise ValueError(f"unknown export format {fmt!r} (use json, clab or graphml)")
