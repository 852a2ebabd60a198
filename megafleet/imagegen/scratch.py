"""Temporary directories that a crash cannot leave behind for long.

Every build step writes into a scratch directory next to its final place and
renames it into place when complete (atomic). The scratch name carries the pid
of its creator (`.x-<pid>-<random>`); `sweep` removes the ones whose creator is
gone, so a build killed half-way leaves nothing once the next one runs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME_RE = re.compile(r"^(\.?[a-z]+(?:-[a-z]+)*)-(\d+)-")


def make(parent: Path, prefix: str) -> Path:
    """A new scratch directory `<parent>/<prefix>-<pid>-<random>`."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(parent: Path, prefix: str) -> int:
    """Remove scratch directories `prefix-<pid>-*` in `parent` whose process is gone."""
    removed = 0
    if not parent.is_dir():
        return 0
    for entry in parent.iterdir():
        m = _NAME_RE.match(entry.name)
        if not m or m.group(1) != prefix or _alive(int(m.group(2))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed
