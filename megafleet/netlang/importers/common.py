"""What every importer shares: the options, the result, warnings and errors with
file:line:col, YAML with positions, readable unique names, and the writer of the
`.fleet` text.

Importers emit `.fleet` source text rather than building a `Net` directly: the
text is what the user reads and edits (`megafleet import`), and compiling it
with the normal parser gives exactly the checks, addressing and error messages
of a hand-written file. Every statement carries a trailing comment naming the
place of the original it came from (`# lab.clab.yml:12`), so an error the
compiler finds in an imported file quotes a line that points back at the source.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import yaml

from megafleet.netlang.errors import Diagnostics, Loc

ROUTINGS = ("ospf", "bgp", "static")
# A Linux interface name as the language accepts it after `NODE:`.
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass
class ImportOptions:
    """Choices the user makes on the command line.

    routing: ospf | bgp | static, or None for the format's own default (OSPF for
    maps, static routes computed from the graph for labs, netlab's modules).
    delays: None or "geo" (great-circle distance between coordinates at 2/3 c).
    rates: map LinkSpeed (bit/s) of GraphML/GML edges to `rate`.
    hosts_per_router: N > 0 adds a LAN switch with N hosts behind every router.
    mgmt: containerlab's management network becomes a switch `mgmt`.
    linux: containerlab `kind: linux` nodes become namespace hosts ("host") or
    container guests ("container": `vm ... driver container` booted from the
    image spec `image`, with `mem` each).
    """

    routing: str | None = None
    delays: str | None = None
    rates: bool = False
    hosts_per_router: int = 0
    mgmt: bool = True
    linux: str = "host"
    image: str = "examples/images/tiny.toml"
    mem: str = "64M"


@dataclass(frozen=True)
class Note:
    """A warning or an error about the input, at a place of it when known."""

    loc: Loc | None
    message: str

    def render(self, kind: str = "warning") -> str:
        return f"{self.loc}: {kind}: {self.message}" if self.loc else f"{kind}: {self.message}"


@dataclass
class Imported:
    """The result of an import: `.fleet` text, and what was not carried over."""

    format: str
    sources: list[str]
    text: str
    warnings: list[Note] = field(default_factory=list)


class ImportFailed(Exception):
    """The input cannot be imported: each error names file, line and column where
    the input's parser offers them. `texts` maps a file to its text so messages
    can quote the line."""

    def __init__(self, errors: list[Note], texts: dict[str, str] | None = None):
        self.errors = errors
        self.texts = texts or {}
        super().__init__("\n".join(e.render("error") for e in errors))

    def diagnostics(self) -> Diagnostics:
        """The errors as the compiler's diagnostics (quoted line and caret)."""
        d = Diagnostics()
        for f, t in self.texts.items():
            d.sources.add(f, t)
        for e in self.errors:
            d.error(e.loc, e.message)
        return d


def fail(loc: Loc | None, message: str, texts: dict[str, str] | None = None) -> ImportFailed:
    return ImportFailed([Note(loc, message)], texts)


# ---------------------------------------------------------------------------
# YAML with positions
# ---------------------------------------------------------------------------

class YMap(dict):
    """A YAML mapping that remembers where it and each of its keys and values were."""

    loc: Loc
    key_locs: dict
    val_locs: dict

    def at(self, key: Any) -> Loc:
        return self.key_locs.get(key, self.loc)

    def vat(self, key: Any) -> Loc:
        return self.val_locs.get(key, self.at(key))


class YList(list):
    loc: Loc
    item_locs: list


def load_yaml(text: str, file: str) -> Any:
    """Parse YAML into YMap/YList (plain scalars inside). Raises ImportFailed with
    file:line:col for a syntax error and for a key given twice in one mapping
    (PyYAML would silently keep the last)."""

    def mark(m) -> Loc:
        return Loc(file, m.line + 1, m.column + 1)

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Loader, node: yaml.MappingNode) -> YMap:
        seen: dict = {}
        for knode, _ in node.value:
            if isinstance(knode, yaml.ScalarNode) and knode.tag != "tag:yaml.org,2002:merge":
                key = loader.construct_object(knode)
                if key in seen:
                    raise fail(mark(knode.start_mark), f"duplicate key {key!r} (first at "
                                                       f"{mark(seen[key].start_mark)})", {file: text})
                seen[key] = knode
        loader.flatten_mapping(node)
        out = YMap()
        out.loc, out.key_locs, out.val_locs = mark(node.start_mark), {}, {}
        for knode, vnode in node.value:
            key = loader.construct_object(knode, deep=True)
            try:
                hash(key)
            except TypeError:
                raise fail(mark(knode.start_mark), "a mapping key must be a plain value",
                           {file: text}) from None
            out[key] = loader.construct_object(vnode, deep=True)
            out.key_locs[key] = mark(knode.start_mark)
            out.val_locs[key] = mark(vnode.start_mark)
        return out

    def construct_sequence(loader: Loader, node: yaml.SequenceNode) -> YList:
        out = YList(loader.construct_object(v, deep=True) for v in node.value)
        out.loc = mark(node.start_mark)
        out.item_locs = [mark(v.start_mark) for v in node.value]
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, construct_sequence)
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        m = err.problem_mark or err.context_mark
        loc = mark(m) if m is not None else Loc(file, 1, 1)
        what = " ".join(x for x in (err.context, err.problem) if x)
        raise fail(loc, f"invalid YAML: {what}", {file: text}) from None
    except yaml.YAMLError as err:
        raise fail(Loc(file, 1, 1), f"invalid YAML: {err}", {file: text}) from None


def item_loc(seq: Any, i: int, default: Loc) -> Loc:
    locs = getattr(seq, "item_locs", None)
    return locs[i] if locs and i < len(locs) else default


def loc_of(obj: Any, default: Loc) -> Loc:
    return getattr(obj, "loc", default)


def line_of(text: str, needle: str, file: str) -> Loc | None:
    """Where `needle` first appears in `text` (for formats whose parser gives no
    positions, such as JSON values)."""
    i = text.find(needle)
    if i < 0:
        return None
    line = text.count("\n", 0, i) + 1
    return Loc(file, line, i - (text.rfind("\n", 0, i) + 1) + 1)


def find_re(text: str, pattern: str, file: str) -> Loc | None:
    """Where the regular expression `pattern` first matches in `text`."""
    m = re.search(pattern, text)
    if m is None:
        return None
    i = m.start()
    return Loc(file, text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1)


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def readable(label: str, fallback: str = "n", limit: int = 40) -> str:
    """A valid node name that reads like `label`: accents dropped (Zürich ->
    Zurich), runs of other characters -> '_', a letter first, at most `limit`
    characters (room for suffixes such as `_lan`, `_h12`)."""
    text = unicodedata.normalize("NFKD", str(label)).encode("ascii", "ignore").decode()
    text = _BAD_CHARS.sub("_", text).strip("_-")
    if not text:
        text = fallback
    elif not text[0].isalpha():
        text = fallback + "_" + text if fallback else "n" + text
    return text[:limit].rstrip("_-") or fallback


class Namer:
    """Unique names: the second `Frankfurt` becomes `Frankfurt_2`. Names are
    compared without case too, so two nodes never differ by case alone."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        # base (lower case) -> the suffix it last got: every smaller one is
        # taken, so the search resumes there (10,000 nodes of one label would
        # otherwise try 1 + 2 + ... + 10,000 names).
        self.last: dict[str, int] = {}

    def take(self, base: str) -> str:
        key = base.lower()
        n = self.last.get(key, 1)
        name = base if n == 1 else f"{base}_{n}"
        while name.lower() in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name.lower())
        self.last[key] = n
        return name


def ifname_for(name: str) -> tuple[str, bool]:
    """(a valid interface name for `name`, whether it had to change): `/` and
    other characters -> '-', at most 15 bytes."""
    if IFNAME_RE.fullmatch(name) and name not in (".", ".."):
        return name, False
    fixed = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:15] or "if"
    return fixed, True


# ---------------------------------------------------------------------------
# The .fleet text
# ---------------------------------------------------------------------------

class FleetWriter:
    """Statements with a trailing `# origin` comment, sections with headings."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.lines.append(f"# {line}".rstrip())

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def section(self, title: str) -> None:
        self.blank()
        self.lines.append(f"# --- {title}")

    def stmt(self, text: str, origin: str | Loc | None = None) -> None:
        if origin is None:
            self.lines.append(text)
        else:
            self.lines.append(f"{text}  # {origin}")

    def render(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"


def header(w: FleetWriter, fmt: str, sources: list[str], warnings: list[Note]) -> None:
    w.comment(f"Imported from {fmt}: {', '.join(sources)} by `megafleet import`.")
    w.comment("Each statement's comment names the place of the original it came from.")
    if warnings:
        w.comment(f"Not carried over ({len(warnings)}):")
        for n in warnings:
            w.comment(f"  {n.render()}")


def fmt_delay_us(us: int) -> str:
    return f"{us / 1000:g}ms" if us % 1000 == 0 else f"{us}us"


def router_routing(routing: str, asn: int | None) -> str:
    """The routing words of a router statement."""
    if routing == "ospf":
        return " ospf"
    if routing == "bgp":
        return f" bgp {asn}"
    return ""


def private_as(i: int) -> int:
    """A private AS number for the i-th router (0-based): 16-bit ones while they
    last (64512-65534), then 32-bit ones (4200000000-)."""
    return 64512 + i if i < 1023 else 4200000000 + i
