"""Validation of names before they become argv elements, file names or interface
names. Everything user-provided passes through here first."""

from __future__ import annotations

import hashlib
import re

# Names of nodes, images, switches, guests: start with a letter, then letters,
# digits, '_', '-' or '.'; no '/', no spaces, nothing a shell or a path would read.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")


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


def ifname(prefix: str, *parts: str) -> str:
    """A Linux interface name (at most 15 bytes) that is stable for its parts.

    Long names are shortened with a hash so that two different parts never collide
    in practice and the same parts always give the same name (idempotent apply)."""
    check_name(prefix, "interface prefix")
    whole = prefix + "-".join(parts)
    if len(whole) <= 15 and re.fullmatch(r"[A-Za-z0-9_.-]+", whole):
        return whole
    digest = hashlib.blake2s("\0".join(parts).encode(), digest_size=8).hexdigest()
    return (prefix + digest)[:15]
