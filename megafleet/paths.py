"""Where megafleet keeps its state, its caches and its runtime sockets.

Every directory can be moved by an environment variable, which is how the tests
isolate themselves from a user's real state.
"""

from __future__ import annotations

import os
from pathlib import Path


def _dir(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env) or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir() -> Path:
    """Per-host records of what megafleet created ($MEGAFLEET_STATE)."""
    if os.geteuid() == 0:
        default = Path("/var/lib/megafleet")
    else:
        default = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "megafleet"
    return _dir("MEGAFLEET_STATE", default)


def cache_dir() -> Path:
    """Content-addressed images and downloaded packages ($MEGAFLEET_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megafleet"
    return _dir("MEGAFLEET_CACHE", default)


def run_dir() -> Path:
    """Sockets and pid files ($MEGAFLEET_RUN). Kept short: unix socket paths are
    limited to 107 bytes."""
    if os.geteuid() == 0:
        default = Path("/run/megafleet")
    else:
        default = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"megafleet-{os.getuid()}"
    return _dir("MEGAFLEET_RUN", default)
