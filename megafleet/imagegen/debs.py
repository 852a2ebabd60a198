"""Debian packages for images: dependency closure, download, unpacking.

Only apt's and dpkg's own tools are used: `apt-cache show` gives each package's
candidate version, dependencies, pool file name and SHA256; `apt-get download`
fetches the .deb; `dpkg-deb -x` unpacks it (no maintainer scripts ever run).

Downloaded .debs are kept in the .deb cache (`$MEGAFLEET_DEB_CACHE`, default
`<cache>/debs`), named after their pool file and checked against apt's SHA256;
unpacked trees are kept under `<cache>/unpacked/<sha256>`. Both are written to a
temporary name first and renamed into place, so an interrupted build leaves
nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from megafleet import paths
from megafleet.imagegen import scratch
from megafleet.proc import CommandFailed, run

# apt refuses to drop privileges into a directory its _apt user cannot write; we
# download into our own cache, so keep apt's sandbox user as root there.
_APT_OPTS = ["-o", "APT::Sandbox::User=root", "-q"]


class PackageError(ValueError):
    """A package the spec asked for (or one of its dependencies) cannot be had."""

    def __init__(self, message: str, package: str = ""):
        super().__init__(message)
        self.package = package


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    filename: str  # basename of the pool file, e.g. frr_8.4.4-1.1~deb12u2_amd64.deb
    sha256: str
    depends: tuple[tuple[str, ...], ...]  # or-groups of package names


def deb_cache_dir() -> Path:
    path = Path(os.environ.get("MEGAFLEET_DEB_CACHE") or paths.cache_dir() / "debs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def apt_fingerprint() -> str:
    """A digest of apt's package lists: when they change, candidates may change, so
    the image cache key includes this."""
    h = hashlib.sha256()
    lists = Path("/var/lib/apt/lists")
    for f in sorted(lists.glob("*Packages*")) if lists.is_dir() else ():
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _parse_depends(value: str) -> tuple[tuple[str, ...], ...]:
    groups = []
    for group in value.split(","):
        names = []
        for alt in group.split("|"):
            alt = re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip()
            name = alt.split(":")[0]  # drop :any / :native qualifiers
            if name:
                names.append(name)
        if names:
            groups.append(tuple(names))
    return tuple(groups)


def _show(names: list[str]) -> dict[str, Package]:
    """Candidate records for `names`; absent and purely virtual names are missing
    from the result."""
    if not names:
        return {}
    result = run(["apt-cache", "show", "--no-all-versions", *names], check=False)
    found: dict[str, Package] = {}
    for record in result.stdout.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in record.splitlines():
            if line[:1] in (" ", "\t") and last:
                fields[last] += " " + line.strip()
            elif ":" in line:
                last, _, value = line.partition(":")
                fields[last] = value.strip()
        if "Package" not in fields or "Filename" not in fields:
            continue
        deps = ", ".join(v for v in (fields.get("Pre-Depends"), fields.get("Depends")) if v)
        pkg = Package(name=fields["Package"], version=fields["Version"],
                      arch=fields.get("Architecture", "amd64"),
                      filename=fields["Filename"].rsplit("/", 1)[-1],
                      sha256=fields.get("SHA256", ""), depends=_parse_depends(deps))
        found.setdefault(pkg.name, pkg)
    return found


def _provider(virtual: str) -> str | None:
    """The first real package that provides a virtual one (apt-cache's order)."""
    result = run(["apt-cache", "showpkg", virtual], check=False)
    lines = result.stdout.split("Reverse Provides:", 1)
    if len(lines) < 2:
        return None
    for line in lines[1].splitlines():
        if line.strip():
            return line.split()[0]
    return None


def resolve(wanted: list[str], exclude: Sequence[str] = ()) -> list[Package]:
    """The dependency closure of `wanted` (Depends and Pre-Depends, first satisfiable
    alternative of each or-group), sorted by name. Packages in `exclude` are neither
    included nor followed. Raises PackageError naming a package that is unknown."""
    lists = Path("/var/lib/apt/lists")
    if not any(lists.glob("*_Packages*")) if lists.is_dir() else True:
        raise PackageError("apt has no package lists on this host: run 'apt-get update' first",
                           wanted[0] if wanted else "")
    excluded = set(exclude)
    chosen: dict[str, Package] = {}
    top = _show(wanted)
    for name in wanted:
        if name not in top:
            provider = _provider(name)
            if provider is None:
                raise PackageError(f"unknown Debian package {name!r} (apt-cache knows no such "
                                   "package; check the spelling, or run apt-get update)", name)
    queue = list(wanted)
    records = dict(top)
    while queue:
        batch = sorted({n for n in queue if n not in records and n not in excluded})
        records.update(_show(batch))
        next_queue: list[str] = []
        for name in queue:
            if name in excluded or name in chosen:
                continue
            pkg = records.get(name)
            if pkg is None:
                provider = _provider(name)
                if provider is None:
                    raise PackageError(f"dependency {name!r} cannot be satisfied", name)
                if provider not in chosen and provider not in excluded:
                    next_queue.append(provider)
                continue
            chosen[name] = pkg
            for group in pkg.depends:
                if any(alt in chosen or alt in excluded for alt in group):
                    continue
                next_queue.append(group[0])
        queue = next_queue
    return sorted(chosen.values(), key=lambda p: p.name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(pkg: Package) -> Path:
    """The .deb of `pkg` in the .deb cache, downloaded with apt-get if needed."""
    cache = deb_cache_dir()
    target = cache / pkg.filename
    if target.exists():
        return target
    scratch.sweep(cache, ".dl")
    tmp = scratch.make(cache, ".dl")
    try:
        # apt-get download writes into its working directory; argv only, no shell.
        proc = subprocess.run(["apt-get", "download", *_APT_OPTS, f"{pkg.name}={pkg.version}"],
                              cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CommandFailed(proc.args, proc.returncode, proc.stderr)
        debs = list(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise PackageError(f"apt-get download {pkg.name}={pkg.version} gave {len(debs)} files")
        if pkg.sha256 and _sha256(debs[0]) != pkg.sha256:
            raise PackageError(f"{pkg.filename}: SHA256 does not match apt's record")
        os.replace(debs[0], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def unpack(deb: Path, sha256: str) -> Path:
    """The unpacked tree of a .deb (cached by its SHA256)."""
    root = paths.cache_dir() / "unpacked"
    root.mkdir(parents=True, exist_ok=True)
    target = root / sha256
    if target.is_dir():
        return target
    scratch.sweep(root, ".x")
    tmp = scratch.make(root, ".x")
    try:
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
        os.chmod(tmp, 0o755)
        # A kernel package's postinst would run depmod; we run no maintainer
        # scripts, so generate modules.dep here (into our own tree, with -b).
        for moddir in sorted((tmp / "lib/modules").glob("*")):
            if moddir.is_dir() and not (moddir / "modules.dep").exists():
                run(["depmod", "-b", str(tmp), moddir.name])
        try:
            os.rename(tmp, target)
        except OSError:  # another build unpacked it meanwhile
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
