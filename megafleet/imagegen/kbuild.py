"""Building a guest kernel from Debian's kernel source package.

An image whose spec says ``[kernel] build = "minimal"`` (or a path to a config
fragment of its own) gets a kernel compiled here instead of a packaged one:

1. the source package (``source``, default ``linux-source-6.1``) is fetched with
   apt and unpacked like every other package (debs.fetch / debs.unpack);
2. its ``usr/src/linux-source-*.tar.xz`` is extracted into a scratch directory
   of the kernel cache (scratch.make: a build killed half-way leaves nothing
   once the next one runs);
3. ``make allnoconfig`` with the fragment as KCONFIG_ALLCONFIG: every option
   off except those the fragment sets, with their dependencies resolved by
   Kconfig itself. Every ``CONFIG_X=y`` of the fragment must survive into the
   final .config, else the build stops naming the options Kconfig dropped;
4. ``make bzImage`` on every CPU, with the build's user, host and timestamp
   fixed (reproducible bytes for the same inputs);
5. the bzImage and the resulting .config are kept under
   ``<cache>/kernels/<key>/``, where ``key`` hashes the source package's
   SHA256, the fragment and the compiler version: the same inputs never build
   twice. The source tree is removed.

The fragment shipped with megafleet (``kernel/minimal.config``) is everything a
megafleet guest needs under QEMU and nothing else, all built in (no modules):
serial console, initramfs, virtio-pci net and serial ports, IPv4/IPv6, one CPU,
100 Hz tickless. Its figures against Debian's cloud kernel (boot CPU, RSS, idle
CPU) come from bench/kernel.py.

Building takes minutes on a small machine (about 6 min of CPU here); the
progress callback hears each step.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from megafleet import paths
from megafleet.imagegen import debs, scratch

KBUILD_VERSION = "1"
DEFAULT_SOURCE = "linux-source-6.1"
SHIPPED = ("minimal",)          # fragments in megafleet/imagegen/kernel/<name>.config
_OPTION_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
# Fixed so the same inputs give the same bytes (kernel's reproducible-builds docs).
_REPRODUCIBLE_ENV = {"KBUILD_BUILD_USER": "megafleet", "KBUILD_BUILD_HOST": "megafleet",
                     "KBUILD_BUILD_TIMESTAMP": "1970-01-01", "KBUILD_BUILD_VERSION": "1"}


class KernelBuildError(RuntimeError):
    """The kernel could not be configured or compiled (the message says which step)."""


@dataclass(frozen=True)
class BuiltKernel:
    """A kernel built from source: its bzImage, the .config it was built with,
    its release string (uname -r) and the source package it came from."""

    vmlinuz: Path
    config: Path
    release: str
    package: str
    version: str
    sha256: str


def shipped_fragment(name: str) -> bytes:
    """The bytes of a config fragment shipped with megafleet (`SHIPPED`)."""
    return resources.files("megafleet.imagegen").joinpath("kernel", f"{name}.config").read_bytes()


def fragment_options(fragment: bytes) -> dict[str, str]:
    """CONFIG_X -> value ("y", "n" for '# CONFIG_X is not set', a number or a
    quoted string) of a config fragment."""
    out: dict[str, str] = {}
    for line in fragment.decode().splitlines():
        line = line.strip()
        if m := re.fullmatch(r"# (CONFIG_[A-Za-z0-9_]+) is not set", line):
            out[m.group(1)] = "n"
        elif m := _OPTION_RE.match(line):
            out[m.group(1)] = m.group(2)
    return out


def dropped_options(fragment: bytes, config_text: str) -> list[str]:
    """The fragment's `=y` options that are not `=y` in a resulting .config
    (Kconfig drops an option whose dependencies are off): sorted names."""
    final = fragment_options(config_text.encode())
    return sorted(k for k, v in fragment_options(fragment).items() if v == "y" and final.get(k) != "y")


def cache_key(source_sha256: str, fragment: bytes, compiler: str) -> str:
    h = hashlib.sha256()
    h.update(f"kbuild={KBUILD_VERSION}\nsource={source_sha256}\ncc={compiler}\n".encode())
    h.update(hashlib.sha256(fragment).digest())
    return h.hexdigest()


def kernels_dir() -> Path:
    return paths.cache_dir() / "kernels"


def _make(tree: Path, args: list[str], env: dict[str, str], what: str) -> str:
    try:
        proc = subprocess.run(["make", "-C", str(tree), "-s", *args], env=env, capture_output=True,
                              text=True, check=False)
    except OSError as exc:
        raise KernelBuildError(f"{what}: cannot run make: {exc} (scripts/setup installs it)") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise KernelBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def build(source: str, fragment: bytes, compiler: str,
          progress: Callable[[str], None] = lambda s: None) -> BuiltKernel:
    """The kernel of Debian package `source` configured with `fragment`, from the
    cache or built now (minutes). Raises debs.PackageError for a package apt does
    not have, KernelBuildError for a configuration or compile failure."""
    pkg = debs._show([source]).get(source)
    if pkg is None:
        raise debs.PackageError(f"unknown Debian package {source!r}", source)
    key = cache_key(pkg.sha256, fragment, compiler)
    final = kernels_dir() / key
    if (final / "bzImage").is_file():
        return _load(final, pkg)
    progress(f"kernel: building from {pkg.name} {pkg.version} (minutes; cached afterwards)")
    tree_root = debs.unpack(debs.fetch(pkg), pkg.sha256)
    tarballs = sorted((tree_root / "usr/src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise KernelBuildError(f"{pkg.name} contains no usr/src/linux-source-*.tar.* (not a kernel source package?)")
    scratch.sweep(kernels_dir(), ".kb")
    work = scratch.make(kernels_dir(), ".kb")
    try:
        progress(f"kernel: extracting {tarballs[0].name}")
        subprocess.run(["tar", "-xf", str(tarballs[0]), "-C", str(work)], check=True, capture_output=True)
        (tree,) = [p for p in work.iterdir() if p.is_dir()]
        fragment_path = work / "fragment.config"
        fragment_path.write_bytes(fragment)
        env = {**os.environ, **_REPRODUCIBLE_ENV, "KCONFIG_ALLCONFIG": str(fragment_path)}
        progress("kernel: configuring (allnoconfig + fragment)")
        _make(tree, ["allnoconfig"], env, "kernel configuration")
        config_text = (tree / ".config").read_text()
        dropped = dropped_options(fragment, config_text)
        if dropped:
            raise KernelBuildError("the kernel configuration dropped options the fragment sets "
                                   f"(their dependencies are off): {', '.join(dropped)}")
        jobs = str(len(os.sched_getaffinity(0)) + 1)
        progress(f"kernel: compiling bzImage with {jobs} jobs")
        _make(tree, [f"-j{jobs}", "bzImage"], env, "kernel compile")
        release = _make(tree, ["kernelrelease"], env, "kernel release").strip()
        out = scratch.make(kernels_dir(), ".kb")
        shutil.copyfile(tree / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copyfile(tree / ".config", out / "config")
        (out / "release").write_text(release + "\n")
        try:
            out.rename(final)
        except OSError:
            shutil.rmtree(out, ignore_errors=True)    # another build finished first: same bytes
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress("kernel: built")
    return _load(final, pkg)


def _load(final: Path, pkg: debs.Package) -> BuiltKernel:
    return BuiltKernel(vmlinuz=final / "bzImage", config=final / "config",
                       release=(final / "release").read_text().strip(), package=pkg.name,
                       version=pkg.version, sha256=pkg.sha256)
