"""Validation of names before they become argv elements, file names or interface
names. Everything user-provided passes through here first.

Generated interface names come from an `IfNames` allocator, which never gives
one name to two different things: a readable name when it fits in 15 bytes, a
hashed one otherwise, and on any clash (two readable names that read the same,
two hashes that agree) the later one is re-hashed until it is unique.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# Names of nodes, images, switches, guests: start with a letter, then letters,
# digits, '_', '-' or '.'; no '/', no spaces, nothing a shell or a path would read.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
IFNAME_MAX = 15          # Linux: IFNAMSIZ (16) with the terminating NUL
TESTBED_NAME_MAX = 8     # prefixes every generated interface name
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class InvalidName(ValueError):
    pass


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe to use in argv and paths, else raise InvalidName."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-63 characters, a letter first, then "
            "letters, digits, '_', '-' or '.'"
        )
    return name


def _b36(data: bytes, width: int) -> str:
    n = int.from_bytes(data, "big")
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(out)


def _hashed(prefix: str, parts: tuple[str, ...], salt: int = 0) -> str:
    # Base 36: 7 characters after an 8-character prefix are 36 bits (hex gave 28).
    key = "\0".join(parts) + (f"\0#{salt}" if salt else "")
    digest = hashlib.blake2s(key.encode(), digest_size=16).digest()
    return prefix + _b36(digest, IFNAME_MAX - len(prefix))


def ifname(prefix: str, *parts: str) -> str:
    """A Linux interface name (at most 15 bytes) that is stable for its parts:
    `prefix` + the parts joined by '-' when that fits, else `prefix` + a hash.

    On its own this can collide (two joins that read the same, two hashes that
    agree): wherever several names are made together, use `IfNames`, which
    resolves every clash."""
    check_name(prefix, "interface prefix")
    whole = prefix + "-".join(parts)
    if len(whole) <= IFNAME_MAX and _IFNAME_RE.fullmatch(whole):
        return whole
    return _hashed(prefix, parts)


class IfNames:
    """Allocates the interface names of one testbed: never the same name for two
    different `parts`, always the same name for the same parts in the same order
    of requests (so a plan computed twice names everything alike).

    `taken`: names already in use that must not be handed out (another
    allocator's, for names added later)."""

    def __init__(self, prefix: str, taken: set[str] | None = None):
        check_name(prefix, "interface prefix")
        if len(prefix) > IFNAME_MAX - 4:
            raise InvalidName(f"interface prefix {prefix!r} leaves fewer than 4 characters of "
                              f"a {IFNAME_MAX}-byte interface name")
        self.prefix = prefix
        self.by_parts: dict[tuple[str, ...], str] = {}
        self.owner: dict[str, tuple[str, ...]] = {n: ("<taken>", n) for n in taken or ()}

    def __call__(self, *parts: str) -> str:
        got = self.by_parts.get(parts)
        if got is not None:
            return got
        name = ifname(self.prefix, *parts)
        salt = 0
        while name in self.owner:
            salt += 1
            name = _hashed(self.prefix, parts, salt)
        self.by_parts[parts] = name
        self.owner[name] = parts
        return name

    def names(self) -> set[str]:
        return set(self.by_parts.values())


def check_ifnames(names: list[str], what: str = "interface names") -> None:
    """Raise InvalidName when a name is longer than 15 bytes or used twice."""
    seen: set[str] = set()
    for n in names:
        if len(n.encode()) > IFNAME_MAX or not n or "/" in n or ":" in n or any(c.isspace() for c in n):
            raise InvalidName(f"invalid interface name {n!r} among the {what} (at most {IFNAME_MAX} bytes, "
                              f"no '/', ':' or spaces)")
        if n in seen:
            raise InvalidName(f"interface name {n!r} is used twice among the {what}")
        seen.add(n)


def testbed_name(path: str | Path, name: str | None = None) -> str:
    """The name of a testbed: `name` when given (checked: a valid name of at most
    8 characters), else derived from the description's file name, the same way
    for `megafleet up` and `megafleet net up`.

    A file stem of at most 8 letters and digits is used as it is (`lan1000`;
    `t` in front when it starts with a digit); a longer one keeps its first 5
    and adds 3 characters of a hash of the whole stem, so two files that start
    alike (`campus-ospf-a`, `campus-ospf-b`) get different names. A name that is
    still taken by another description is refused when it comes up (the ledger
    records which description each testbed was built from)."""
    if name is None:
        raw = Path(path).stem
        stem = "".join(c for c in raw if c.isalnum())
        if not stem[:1].isalpha():
            stem = "t" + stem
        if len(stem) > TESTBED_NAME_MAX:
            stem = stem[:5] + _b36(hashlib.blake2s(raw.encode(), digest_size=8).digest(), 3)
        name = stem
    check_name(name, "testbed name")
    if len(name) > TESTBED_NAME_MAX:
        raise InvalidName(f"testbed name {name!r} is longer than {TESTBED_NAME_MAX} characters "
                          f"(it prefixes interface names, which Linux limits to {IFNAME_MAX} bytes)")
    return name


# ---------------------------------------------------------------------------
# Which description a testbed name belongs to
# ---------------------------------------------------------------------------

def description_id(path: str | Path) -> str:
    """What identifies the description a testbed is built from, as `up` and
    `net up` both record it: the file's absolute path, symlinks resolved. So
    `up lab.fleet` and `up ../x/lab.fleet` name the same testbed (an edited
    file is reconciled), while `a.fleet` and `b.fleet` never do, however alike
    they read. The content is not the identity: editing the file is the way to
    change a running testbed.

    An imported file (containerlab, GraphML...) is compiled under the name
    `PATH.fleet` (netlang.importers.fleet_source): its identity is PATH's. A
    description compiled from text alone has no file: its name is kept as given."""
    p = Path(path)
    if not p.is_file() and p.suffix == ".fleet" and p.with_suffix("").is_file():
        p = p.with_suffix("")
    return str(p.resolve()) if p.is_file() else str(path)


def same_description(recorded: str | None, source: str | None) -> bool:
    """Whether a testbed recorded as built from `recorded` may be brought up
    again from `source` (both `description_id`s). A side that is unknown (a
    record or manifest without a source) does not refuse."""
    return not recorded or not source or recorded == source
