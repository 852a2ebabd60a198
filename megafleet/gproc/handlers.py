"""Handlers for generic requests (`Fleet.call`): the agent's dispatch table.

gproc carries a payload to every selected host and runs the handler of that name
there; it never knows what the payload means. Another package makes a handler
available by registering it when its module is imported::

    from megafleet.gproc import handlers

    @handlers.handler("host.apply")
    async def apply(payload, ctx):
        await ctx.emit({"phase": "net", "done": 3})   # progress, streamed to the caller
        return {"vms": 12}                            # the host's result (JSON)

The agent finds the module in one of two ways:

* the request names it: `fleet.call("host.apply", manifest, modules=["megafleet.host"])`;
* an installed distribution declares it in the entry-point group
  `megafleet.gproc.handlers` (name = handler name, value = module).

A handler is either an async (trio) function, which may emit progress, or a plain
function, which runs in a worker thread and emits nothing (the built-ins are
plain, so a leaf agent answers them without loading trio at all).

A handler raising an exception makes that host `failed` with the exception text;
the other hosts are not affected.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

Handler = Callable[[Any, "Context"], Awaitable[Any] | Any]
MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
ENTRY_POINT_GROUP = "megafleet.gproc.handlers"

_registry: dict[str, Handler] = {}


class UnknownHandler(LookupError):
    pass


@dataclass
class Context:
    """What a handler gets besides its payload."""

    host: str                                      # this host's inventory name
    emit: Callable[[Any], Awaitable[None]]         # send a progress event to the caller


def register(name: str, fn: Handler) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"handler name must be a non-empty string, got {name!r}")
    _registry[name] = fn


def handler(name: str) -> Callable[[Handler], Handler]:
    def decorate(fn: Handler) -> Handler:
        register(name, fn)
        return fn
    return decorate


def lookup(name: str, modules: Sequence[str] = ()) -> Handler:
    """The handler `name`, importing the named modules (then entry points) first."""
    for module in modules:
        if not isinstance(module, str) or not MODULE_RE.fullmatch(module):
            raise UnknownHandler(f"invalid handler module name {module!r}")
        importlib.import_module(module)
    if name not in _registry:
        from importlib import metadata

        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                importlib.import_module(ep.value.split(":", 1)[0])
    try:
        return _registry[name]
    except KeyError:
        raise UnknownHandler(f"no handler named {name!r} on this host "
                             f"(known: {', '.join(sorted(_registry)) or 'none'})") from None


def known() -> list[str]:
    return sorted(_registry)


def is_async(fn: Handler) -> bool:
    return inspect.iscoroutinefunction(fn)


def own_payload(req: dict[str, Any], host: str | None) -> Any:
    """The payload of a call request for `host`: its entry of `per_host` (JSON
    text decoded here when the request is `encoded`), else the common one."""
    if "per_host" not in req:
        return req.get("payload")
    payload = req["per_host"].get(host)
    if req.get("encoded") and isinstance(payload, str):
        import json

        payload = json.loads(payload)
    return payload


# --- built-in handlers ---------------------------------------------------------

@handler("gproc.ping")
def _ping(payload: Any, ctx: Context) -> dict[str, Any]:
    """Who answers: used by `hosts check`."""
    return {"host": ctx.host, "pid": os.getpid(), "uname": " ".join(os.uname()),
            "load": os.getloadavg()[0]}


def file_sha256(path: str) -> str | None:
    """Hex SHA-256 of a file, or None if it does not exist. Blocking."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return digest.hexdigest()


def expand_dest(dest: str, host: str | None) -> str:
    """A push destination on one host: `{host}` stands for the host's own name
    (useful when hosts share a filesystem, as the test fleet does)."""
    return dest.replace("{host}", host) if host else dest


def push_tempfile(dest: str) -> tuple[int, str]:
    """Open the temporary file a push writes before renaming it to `dest`: in the
    same directory (so the rename is atomic), named after this process. Temporary
    files of the same destination left by a writer that died (an agent killed
    mid-push) are removed first."""
    directory, base = os.path.split(dest)
    prefix = f".{base}.mfpush."
    try:
        for name in os.listdir(directory or "."):
            if name.startswith(prefix):
                pid = name[len(prefix):].split(".", 1)[0]
                if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    try:
                        os.unlink(os.path.join(directory, name))
                    except FileNotFoundError:
                        pass
    except FileNotFoundError:
        pass
    import tempfile

    return tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", dir=directory or ".")


@handler("gproc.have")
def _have(payload: Any, ctx: Context) -> bool:
    """Whether `path` exists with content hash `sha256` (push skips those hosts)."""
    return file_sha256(expand_dest(payload["path"], ctx.host)) == payload["sha256"]


@handler("gproc.images")
def _images(payload: Any, ctx: Context) -> list[str]:
    """Which of the image content hashes `hashes` this host's image cache lacks
    (`cache_dir`, default $MEGAFLEET_CACHE): used by `hosts check --image`."""
    from pathlib import Path

    from megafleet import paths

    cache = Path(payload.get("cache_dir") or paths.cache_dir())
    return [h for h in payload["hashes"]
            if not (isinstance(h, str) and h.isalnum() and (cache / "images" / h / "manifest.json").is_file())]
