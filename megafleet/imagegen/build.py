"""Assembling an image: kernel + compressed initramfs + manifest, reproducibly.

The initramfs is the whole guest (it runs from RAM): busybox-static and its
applet links, the packages of the spec with their dependencies (unpacked, no
maintainer scripts), the kernel modules in load order, the megafleet init and
agent, the spec's services, overlays and files. Layers are applied in that order,
later ones replacing earlier files. The cpio archive is written by our own writer
(sorted, mtime 0, root-owned) and compressed with zstd single-threaded, so the
same inputs always give the same bytes.

`assemble` writes into a fresh temporary directory and returns it; the store
renames it into the cache.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import stat
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from megafleet.imagegen import cpio, debs, kbuild, kmod
from megafleet.imagegen.spec import Spec, SpecError, error_at
from megafleet.proc import CommandFailed, run

# Bump when the layout or the init changes in a way the cache key cannot see.
BUILDER_VERSION = "2"
BASE_PACKAGES = ["busybox-static"]
GUEST_FILES = ("init", "guestd.c")
# The guest daemon (agent + exec channel in one process that never forks while
# idle), compiled static from guest/guestd.c with the host's gcc. Its name
# decides its role: guestd serves both, the link `agent` only the agent (what a
# container's init starts).
GUESTD_SOURCE = "guestd.c"
GUESTD_CFLAGS = ["-static", "-Os", "-s", "-Wall", "-Wl,--build-id=none",
                 "-fno-asynchronous-unwind-tables"]

Progress = Callable[[str], None]

_SKELETON_DIRS = ["bin", "dev", "etc", "etc/megafleet", "lib", "proc", "root", "run", "sbin",
                  "sys", "tmp", "usr/bin", "usr/lib/megafleet", "usr/sbin", "var/log", "var/run"]

_DEFAULT_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/shadow": "root:*:1:0:99999:7:::\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
}


@dataclass(frozen=True)
class KernelSource:
    vmlinuz: Path
    modules_dir: Path | None        # None: a built kernel, everything built in
    package: str | None = None
    version: str | None = None
    release: str | None = None      # uname -r of a built kernel


def guest_file(name: str) -> bytes:
    return resources.files("megafleet.imagegen").joinpath("guest", name).read_bytes()


def input_key(spec: Spec) -> str:
    """A digest of everything that goes into the image: the merged spec, the content
    of local files it names, the guest scripts, apt's package lists and this
    builder's version. Same key, same image: a cache hit needs no other work."""
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    h.update(json.dumps(spec.to_json(), sort_keys=True).encode())
    for name in GUEST_FILES:
        h.update(hashlib.sha256(guest_file(name)).digest())
    h.update(f"cc={compiler_version()} {' '.join(GUESTD_CFLAGS)}\n".encode())
    for item in sorted(spec.files.values(), key=lambda f: str(f.source)):
        if item.source:
            h.update(item.source.read_bytes())
    for overlay in spec.overlays:
        for path in sorted(overlay.rglob("*")):
            st = path.lstat()
            h.update(f"{path.relative_to(overlay)}:{st.st_mode}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    if (local := spec.local_kernel()) is not None:
        for p in (local[0], local[1] / "modules.dep"):
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    if spec.kernel_build is not None:
        h.update(hashlib.sha256(_kernel_fragment(spec)).digest())
    if spec.kernel_package or spec.packages or BASE_PACKAGES:
        h.update(debs.apt_fingerprint().encode())
    return h.hexdigest()


_compiler_version: str | None = None


def compiler_version() -> str:
    """`gcc -dumpfullversion` (part of the cache key: another compiler, other bytes).
    Raises RuntimeError when gcc is missing (scripts/setup installs it)."""
    global _compiler_version
    if _compiler_version is None:
        try:
            _compiler_version = run(["gcc", "-dumpfullversion"]).stdout.strip()
        except (OSError, CommandFailed) as exc:
            raise RuntimeError(f"imagegen needs gcc to build the guest daemon: {exc} "
                               "(scripts/setup installs it)") from None
    return _compiler_version


def build_guestd(workdir: Path) -> bytes:
    """Compile guest/guestd.c into a static binary (in `workdir`, removed after);
    its bytes. Deterministic: no build id, stripped, fixed flags."""
    src = workdir / "guestd.c"
    out = workdir / "guestd"
    src.write_bytes(guest_file(GUESTD_SOURCE))
    try:
        run(["gcc", *GUESTD_CFLAGS, "-o", str(out), str(src)])
        return out.read_bytes()
    except CommandFailed as exc:
        raise RuntimeError(f"compiling the guest daemon failed: {exc}") from None
    finally:
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def _excluded(path: str, patterns: list[str]) -> bool:
    """True if `path` or one of its parent directories matches a pattern."""
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        if any(fnmatch.fnmatchcase(prefix, p) for p in patterns):
            return True
    return False


class _Tree:
    """The image's files, by path (no leading slash). Later adds replace earlier ones."""

    def __init__(self, exclude: list[str]):
        self.entries: dict[str, cpio.Entry] = {}
        self.exclude = exclude

    def add(self, entry: cpio.Entry, *, force: bool = False) -> None:
        if not force and _excluded(entry.path, self.exclude):
            return
        self.entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        if path not in self.entries:
            self.entries[path] = cpio.Entry(path, stat.S_IFDIR | mode)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.add(cpio.Entry(path, stat.S_IFREG | mode, data=data), force=True)

    def add_tree(self, root: Path) -> None:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                st = os.lstat(full)
                mode = stat.S_IFMT(st.st_mode) | stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    if not _excluded(rel, self.exclude) and rel not in self.entries:
                        self.entries[rel] = cpio.Entry(rel, mode)
                elif stat.S_ISLNK(st.st_mode):
                    self.add(cpio.Entry(rel, mode, target=os.readlink(full)))
                elif stat.S_ISREG(st.st_mode):
                    self.add(cpio.Entry(rel, mode, source=Path(full)))

    def complete(self) -> list[cpio.Entry]:
        """All entries plus any missing parent directories."""
        for path in list(self.entries):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                self.add_dir("/".join(parts[:i]))
        return list(self.entries.values())


def _kernel_fragment(spec: Spec) -> bytes:
    if isinstance(spec.kernel_build, Path):
        return spec.kernel_build.read_bytes()
    return kbuild.shipped_fragment(str(spec.kernel_build))


def _kernel_source(spec: Spec, progress: Progress) -> tuple[KernelSource, list[dict]]:
    """Where the kernel and its modules come from; the packages it took."""
    if (local := spec.local_kernel()) is not None:
        return KernelSource(*local), []
    if spec.kernel_build is not None:
        source = spec.kernel_source or kbuild.DEFAULT_SOURCE
        try:
            built = kbuild.build(source, _kernel_fragment(spec), compiler_version(), progress)
        except debs.PackageError as exc:
            raise error_at(spec, "kernel.source", source, str(exc)) from None
        except kbuild.KernelBuildError as exc:
            raise error_at(spec, "kernel.build", str(spec.kernel_build), str(exc)) from None
        return (KernelSource(built.vmlinuz, None, built.package, built.version, built.release),
                [{"name": built.package, "version": built.version, "sha256": built.sha256,
                  "role": "kernel source"}])
    package = spec.kernel_package
    if package is None:     # parsing gives one or the other; a Spec made in code may not
        raise error_at(spec, "kernel.package", "kernel", "no kernel: give kernel.package, "
                       "or kernel.vmlinuz and kernel.modules_dir")
    try:
        pkg = debs._show([package]).get(package)
        if pkg is None:
            raise debs.PackageError(f"unknown Debian package {package!r}")
        # A metapackage (linux-image-cloud-amd64) depends on the real image package.
        for _ in range(3):
            for group in pkg.depends:
                if group[0].startswith("linux-image-"):
                    pkg = debs._show([group[0]]).get(group[0]) or pkg
                    break
            else:
                break
        progress(f"kernel {pkg.name} {pkg.version}")
        tree = debs.unpack(debs.fetch(pkg), pkg.sha256)
    except debs.PackageError as exc:
        raise error_at(spec, "kernel.package", package, str(exc)) from None
    vmlinuz = sorted((tree / "boot").glob("vmlinuz-*"))
    moddirs = sorted((tree / "lib/modules").glob("*"))
    if not vmlinuz or not moddirs:
        raise SpecError(spec.path, "kernel.package",
                        f"{pkg.name} contains no /boot/vmlinuz-* and /lib/modules (not a kernel?)")
    return (KernelSource(vmlinuz[0], moddirs[0], pkg.name, pkg.version),
            [{"name": pkg.name, "version": pkg.version, "sha256": pkg.sha256, "role": "kernel"}])


def _zstd(data: bytes, level: int) -> bytes:
    # Single-threaded, no content size guesses from timing: deterministic output.
    args = ["zstd", "-q", "-c", "-T1", f"-{level}"]
    if level > 19:
        args.insert(1, "--ultra")
    proc = subprocess.run(args, input=data, capture_output=True, check=True)
    return proc.stdout


def assemble(spec: Spec, workdir: Path, progress: Progress = lambda s: None) -> dict:
    """Build the image of `spec` into `workdir` (vmlinuz, initramfs.img,
    manifest.json). Returns the manifest. Raises SpecError for what the spec got
    wrong; nothing is written outside `workdir` except the .deb/unpack caches."""
    kernel, kernel_pkgs = _kernel_source(spec, progress)
    if kernel.modules_dir is None:
        # A built kernel: no modules, whatever the spec (or a parent) lists is built in.
        mod_plan = kmod.ModulePlan(version=kernel.release or "", load_order=(),
                                   builtin=tuple(spec.modules))
    else:
        try:
            mod_plan = kmod.plan(kernel.modules_dir, spec.modules)
        except kmod.ModuleError as exc:
            raise error_at(spec, "kernel.modules", exc.module, str(exc)) from None

    wanted = BASE_PACKAGES + [p for p in spec.packages if p not in BASE_PACKAGES]
    try:
        packages = debs.resolve(wanted, spec.exclude_packages)
    except debs.PackageError as exc:
        raise error_at(spec, "packages", exc.package or "", str(exc)) from None
    progress(f"{len(packages)} packages: " + " ".join(p.name for p in packages))

    tree = _Tree(spec.exclude)
    for d in _SKELETON_DIRS:
        tree.add_dir(d)
    tree.add_dir("tmp", 0o1777)
    tree.add_dir("root", 0o700)
    for pkg in packages:
        deb = debs.fetch(pkg)
        tree.add_tree(debs.unpack(deb, pkg.sha256))

    # busybox applets as links, wherever a package did not put a real program.
    busybox = next(p for p in packages if p.name == "busybox-static")
    bb_bin = debs.unpack(debs.fetch(busybox), busybox.sha256) / "bin/busybox"
    applets = run([str(bb_bin), "--list-full"]).stdout.split()
    for applet in applets:
        if applet not in tree.entries:
            tree.add(cpio.Entry(applet, stat.S_IFLNK | 0o777, target="/bin/busybox"), force=True)

    # Kernel modules, and the order the init loads them in.
    for rel in mod_plan.load_order:
        assert kernel.modules_dir is not None      # only a packaged or local kernel has modules
        tree.add(cpio.Entry(f"lib/modules/{mod_plan.version}/{rel}", stat.S_IFREG | 0o644,
                            source=kernel.modules_dir / rel), force=True)
    tree.add_file("etc/megafleet/modules", "".join(f"{m}\n" for m in mod_plan.load_order).encode())

    for path, text in _DEFAULT_ETC.items():
        if path not in tree.entries:
            tree.add_file(path, text.encode())
    tree.add_file("init", guest_file("init"), 0o755)
    tree.add_file("sbin/megafleet-init", guest_file("init"), 0o755)
    progress("compiling the guest daemon")
    tree.add_file("usr/lib/megafleet/guestd", build_guestd(workdir), 0o755)
    tree.add(cpio.Entry("usr/lib/megafleet/agent", stat.S_IFLNK | 0o777, target="guestd"),
             force=True)

    for name, svc in sorted(spec.services.items()):
        tree.add_file(f"etc/megafleet/services/{name}", f"{svc.command}\n".encode(), 0o755)
    autostart = [name for name, svc in sorted(spec.services.items()) if svc.start]
    tree.add_file("etc/megafleet/autostart", "".join(f"{n}\n" for n in autostart).encode())

    for overlay in spec.overlays:
        tree.add_tree(overlay)
    for guest_path, item in sorted(spec.files.items()):
        if item.text is not None:
            data = item.text.encode()
        elif item.source is not None:
            data = item.source.read_bytes()
        else:       # parsing gives a file its text or its source
            raise error_at(spec, "files", guest_path, f"file {guest_path}: neither text nor source")
        tree.add_file(guest_path.lstrip("/"), data, item.mode)

    # The kernel opens /dev/console before init runs; devtmpfs comes later.
    tree.add(cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)), force=True)
    tree.add(cpio.Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)), force=True)

    entries = tree.complete()
    progress(f"writing initramfs: {len(entries)} entries")
    buf = io.BytesIO()
    raw_size = cpio.write(entries, buf)
    compressed = _zstd(buf.getvalue(), spec.compress_level)
    (workdir / "initramfs.img").write_bytes(compressed)
    kernel_bytes = kernel.vmlinuz.read_bytes()
    (workdir / "vmlinuz").write_bytes(kernel_bytes)

    manifest = {
        "name": spec.name,
        "description": spec.description,
        "builder": BUILDER_VERSION,
        "kernel": {"file": "vmlinuz", "version": mod_plan.version, "bytes": len(kernel_bytes),
                   "sha256": hashlib.sha256(kernel_bytes).hexdigest(),
                   "package": kernel.package, "package_version": kernel.version},
        "initramfs": {"file": "initramfs.img", "bytes": len(compressed), "cpio_bytes": raw_size,
                      "entries": len(entries), "compression": f"zstd-{spec.compress_level}",
                      "sha256": hashlib.sha256(compressed).hexdigest()},
        "packages": kernel_pkgs + [{"name": p.name, "version": p.version, "sha256": p.sha256}
                                   for p in packages],
        "modules": {"load_order": [kmod.module_name(m) for m in mod_plan.load_order],
                    "builtin": list(mod_plan.builtin)},
        "services": {n: {"command": s.command, "start": s.start}
                     for n, s in sorted(spec.services.items())},
        "spec": spec.to_json(),
    }
    manifest["hash"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    (workdir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
