"""Image specs: TOML files that say what goes into a guest image.

A spec, with every key it may have::

    name = "router"                       # image name (required)
    description = "tiny plus FRR"
    parents = ["tiny.toml"]               # inherited first, paths relative to this file

    [kernel]
    package = "linux-image-cloud-amd64"   # a Debian kernel package (fetched with apt)
    # or a local kernel:
    # vmlinuz = "/boot/vmlinuz-6.1.0-x"   #   the kernel image
    # modules_dir = "/lib/modules/6.1.0-x" #   its modules directory
    # or one built from Debian's kernel source (megafleet.imagegen.kbuild):
    # build = "minimal"                   #   megafleet's fragment, or a path to one
    # source = "linux-source-6.1"         #   the source package (this is the default)
    modules = ["virtio_net"]              # dependencies come from modules.dep
                                          # (a built kernel has everything built in)

    packages = ["frr"]                    # Debian packages, dependencies included
    exclude_packages = ["perl-base"]      # never unpacked, nor followed as dependencies
    exclude = ["usr/share/doc/*"]         # path globs (no leading /) left out of the image
    overlays = ["overlay"]                # directories copied over the root, in order
    compress_level = 19                   # zstd level of the initramfs

    [files."/etc/motd"]                   # one file: text = "..." or source = "path"
    text = "hello"
    mode = "0644"

    [services.zebra]                      # a service the init may start
    command = "/usr/lib/frr/zebra -d"     # run by the guest's sh
    start = true                          # at every boot (else only via megafleet.svc)

Inheritance: a child's lists extend its parents' (without duplicates), tables are
merged key by key, and a child's scalars (name, kernel fields) replace the parent's.

Every mistake raises SpecError naming the file, the key (and line when it can be
found) and what is wrong. Parsing never touches the cache.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megafleet.names import InvalidName, check_name


class SpecError(ValueError):
    """A mistake in an image spec: the message names the file, the key and the problem."""

    def __init__(self, path: Path | str, key: str | None, problem: str, line: int | None = None):
        self.path = str(path)
        self.key = key
        self.problem = problem
        self.line = line
        where = self.path + (f":{line}" if line else "")
        super().__init__(f"{where}: " + (f"key '{key}': " if key else "") + problem)


TOP_KEYS = {"name", "description", "parents", "kernel", "packages", "exclude_packages",
            "exclude", "overlays", "files", "services", "compress_level"}
KERNEL_KEYS = {"package", "vmlinuz", "modules_dir", "modules", "build", "source"}
FILE_KEYS = {"text", "source", "mode"}
SERVICE_KEYS = {"command", "start"}

# Debian package names (policy 5.6.1) and kernel module names.
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_MODULE_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class FileItem:
    text: str | None = None
    source: Path | None = None
    mode: int = 0o644


@dataclass(frozen=True)
class Service:
    command: str
    start: bool = True


@dataclass
class Spec:
    """A spec with its parents merged in. Paths are absolute."""

    path: Path
    name: str
    description: str = ""
    kernel_package: str | None = None
    vmlinuz: Path | None = None
    modules_dir: Path | None = None
    kernel_build: str | Path | None = None     # a shipped fragment's name, or a fragment file
    kernel_source: str | None = None           # the source package of a built kernel
    modules: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    exclude_packages: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    files: dict[str, FileItem] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    compress_level: int = 19
    chain: list[Path] = field(default_factory=list)  # the spec files read, parents first

    def local_kernel(self) -> tuple[Path, Path] | None:
        """(vmlinuz, modules_dir) of a local kernel (parsing sets both or
        neither); None when the kernel comes from `kernel_package`."""
        if self.vmlinuz is not None and self.modules_dir is not None:
            return self.vmlinuz, self.modules_dir
        return None

    def to_json(self) -> dict[str, Any]:
        """A canonical, JSON-able form (part of the cache key and the manifest)."""
        return {
            "name": self.name,
            "description": self.description,
            "kernel": {"package": self.kernel_package,
                       "vmlinuz": str(self.vmlinuz) if self.vmlinuz else None,
                       "modules_dir": str(self.modules_dir) if self.modules_dir else None,
                       **({"build": str(self.kernel_build), "source": self.kernel_source}
                          if self.kernel_build else {}),
                       "modules": list(self.modules)},
            "packages": list(self.packages),
            "exclude_packages": list(self.exclude_packages),
            "exclude": list(self.exclude),
            "overlays": [str(p) for p in self.overlays],
            "files": {k: {"text": v.text, "source": str(v.source) if v.source else None,
                          "mode": oct(v.mode)} for k, v in sorted(self.files.items())},
            "services": {k: {"command": v.command, "start": v.start}
                         for k, v in sorted(self.services.items())},
            "compress_level": self.compress_level,
        }


def _line_of(text: str, key: str) -> int | None:
    """Best-effort line number of a dotted key (files."/etc/x".mode) in TOML text:
    each part is searched for after the previous one."""
    at, line = 0, None
    for part in re.findall(r'"[^"]*"|[^.]+', key):
        if part.startswith('"'):
            pattern = re.compile(re.escape(part))
        else:
            pattern = re.compile(r'^[ \t]*(\[+[ \t]*)?([^#\n]*?\.)?' + re.escape(part) + r'\b[ \t]*[=\].]', re.M)
        m = pattern.search(text, at)
        if not m:
            return line
        at = m.end()
        line = text.count("\n", 0, m.start() + len(m.group(0)) - 1) + 1
    return line


class _Reader:
    """Validates one spec file's raw TOML table."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.text = text

    def fail(self, key: str | None, problem: str) -> SpecError:
        return SpecError(self.path, key, problem, _line_of(self.text, key) if key else None)

    def str_(self, table: dict, key: str, full: str) -> str | None:
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(full, f"must be a string, got {type(value).__name__}")
        return value

    def strlist(self, table: dict, key: str, full: str) -> list[str]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(full, "must be a list of strings")
        return value

    def unknown(self, table: dict, allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                full = f"{prefix}{key}"
                raise self.fail(full, "unknown key (allowed: " + ", ".join(sorted(allowed)) + ")")

    def local_path(self, value: str, key: str, *, want_dir: bool | None = None) -> Path:
        path = (self.path.parent / value).resolve()
        if not path.exists():
            raise self.fail(key, f"{value!r} does not exist ({path})")
        if want_dir is True and not path.is_dir():
            raise self.fail(key, f"{value!r} is not a directory")
        if want_dir is False and not path.is_file():
            raise self.fail(key, f"{value!r} is not a file")
        return path


def _read_toml(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(path, None, "no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(path, None, f"cannot read: {exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise SpecError(path, None, f"TOML syntax error: {exc}",
                        int(m.group(1)) if m else None) from None


def _merge_into(spec: Spec, raw: dict, reader: _Reader) -> None:
    """Apply one file's raw table on top of `spec` (parents already applied)."""
    r = reader
    r.unknown(raw, TOP_KEYS, "")
    name = r.str_(raw, "name", "name")
    if name is not None:
        try:
            spec.name = check_name(name, "image name")
        except InvalidName as exc:
            raise r.fail("name", str(exc)) from None
    if (d := r.str_(raw, "description", "description")) is not None:
        spec.description = d

    kernel = raw.get("kernel", {})
    if not isinstance(kernel, dict):
        raise r.fail("kernel", "must be a table ([kernel])")
    r.unknown(kernel, KERNEL_KEYS, "kernel.")
    package = r.str_(kernel, "package", "kernel.package")
    vmlinuz = r.str_(kernel, "vmlinuz", "kernel.vmlinuz")
    modules_dir = r.str_(kernel, "modules_dir", "kernel.modules_dir")
    build = r.str_(kernel, "build", "kernel.build")
    source = r.str_(kernel, "source", "kernel.source")
    if sum(bool(x) for x in (package, vmlinuz or modules_dir, build)) > 1:
        raise r.fail("kernel.build" if build else "kernel.package",
                     "give one kernel: a package, vmlinuz + modules_dir, or build")
    if source is not None and not build:
        raise r.fail("kernel.source", "the source package is for a built kernel: set kernel.build too")
    if package is not None:
        if not _PACKAGE_RE.fullmatch(package):
            raise r.fail("kernel.package", f"{package!r} is not a valid Debian package name")
        spec.kernel_package, spec.vmlinuz, spec.modules_dir = package, None, None
        spec.kernel_build = spec.kernel_source = None
    if vmlinuz or modules_dir:
        if not (vmlinuz and modules_dir):
            raise r.fail("kernel.vmlinuz" if not vmlinuz else "kernel.modules_dir",
                         "a local kernel needs both vmlinuz and modules_dir")
        spec.kernel_package = spec.kernel_build = spec.kernel_source = None
        spec.vmlinuz = r.local_path(vmlinuz, "kernel.vmlinuz", want_dir=False)
        spec.modules_dir = r.local_path(modules_dir, "kernel.modules_dir", want_dir=True)
    if build:
        from megafleet.imagegen.kbuild import SHIPPED

        if source is not None and not _PACKAGE_RE.fullmatch(source):
            raise r.fail("kernel.source", f"{source!r} is not a valid Debian package name")
        if build in SHIPPED:
            spec.kernel_build = build
        elif "/" in build or build.endswith(".config"):
            spec.kernel_build = r.local_path(build, "kernel.build", want_dir=False)
        else:
            raise r.fail("kernel.build", f"{build!r} is neither a fragment megafleet ships "
                         f"({', '.join(SHIPPED)}) nor a path to a config fragment")
        spec.kernel_source = source
        spec.kernel_package = spec.vmlinuz = spec.modules_dir = None
    for m in r.strlist(kernel, "modules", "kernel.modules"):
        if not _MODULE_RE.fullmatch(m):
            raise r.fail("kernel.modules", f"{m!r} is not a valid module name")
        m = m.replace("-", "_")
        if m not in spec.modules:
            spec.modules.append(m)

    for key in ("packages", "exclude_packages"):
        target = getattr(spec, key)
        for p in r.strlist(raw, key, key):
            if not _PACKAGE_RE.fullmatch(p):
                raise r.fail(key, f"{p!r} is not a valid Debian package name")
            if p not in target:
                target.append(p)
    for pattern in r.strlist(raw, "exclude", "exclude"):
        pattern = pattern.lstrip("/")
        if not pattern:
            raise r.fail("exclude", "an empty pattern would exclude everything")
        if pattern not in spec.exclude:
            spec.exclude.append(pattern)
    for o in r.strlist(raw, "overlays", "overlays"):
        path = r.local_path(o, "overlays", want_dir=True)
        if path not in spec.overlays:
            spec.overlays.append(path)

    level = raw.get("compress_level")
    if level is not None:
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= 19:
            raise r.fail("compress_level", "must be an integer from 1 to 19")
        spec.compress_level = level

    files = raw.get("files", {})
    if not isinstance(files, dict):
        raise r.fail("files", "must be a table of guest paths")
    for guest_path, item in files.items():
        key = f'files."{guest_path}"'
        if not guest_path.startswith("/") or ".." in guest_path.split("/") or guest_path == "/":
            raise r.fail(key, "the guest path must be absolute, without '..'")
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise r.fail(key, 'must be a string or a table {text = "..."} / {source = "path"}')
        r.unknown(item, FILE_KEYS, key + ".")
        text = r.str_(item, "text", key + ".text")
        source = r.str_(item, "source", key + ".source")
        if (text is None) == (source is None):
            raise r.fail(key, "give exactly one of text or source")
        mode_text = r.str_(item, "mode", key + ".mode") or "0644"
        try:
            mode = int(mode_text, 8)
            if not 0 <= mode <= 0o7777:
                raise ValueError
        except ValueError:
            raise r.fail(key + ".mode", f"{mode_text!r} is not an octal mode like \"0755\"") from None
        src = r.local_path(source, key + ".source", want_dir=False) if source else None
        spec.files[guest_path] = FileItem(text=text, source=src, mode=mode)

    services = raw.get("services", {})
    if not isinstance(services, dict):
        raise r.fail("services", "must be a table of [services.NAME]")
    for svc, item in services.items():
        key = f"services.{svc}"
        try:
            check_name(svc, "service name")
        except InvalidName as exc:
            raise r.fail(key, str(exc)) from None
        if not isinstance(item, dict):
            raise r.fail(key, "must be a table with command = \"...\"")
        r.unknown(item, SERVICE_KEYS, key + ".")
        command = r.str_(item, "command", key + ".command")
        if not command:
            raise r.fail(key + ".command", "missing: the command that starts the service")
        if "\n" in command:
            raise r.fail(key + ".command", "must be one line")
        start = item.get("start", True)
        if not isinstance(start, bool):
            raise r.fail(key + ".start", "must be true or false")
        spec.services[svc] = Service(command=command, start=start)

    parents = r.strlist(raw, "parents", "parents")  # already applied; validated here
    del parents


def load(path: str | Path, _seen: tuple[Path, ...] = ()) -> Spec:
    """Read a spec and its parents. Raises SpecError on any mistake."""
    path = Path(path).resolve() if Path(path).exists() else Path(path)
    if path in _seen:
        raise SpecError(path, "parents", "circular inheritance: " +
                        " -> ".join(str(p) for p in _seen + (path,)))
    text, raw = _read_toml(path)
    reader = _Reader(path, text)
    parents = reader.strlist(raw, "parents", "parents")
    spec: Spec | None = None
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if not parent_path.is_file():
            raise reader.fail("parents", f"parent spec {parent!r} not found ({parent_path})")
        loaded = load(parent_path, _seen + (path,))
        if spec is None:
            spec = loaded
        else:  # several parents: later ones apply over earlier ones
            _merge_specs(spec, loaded)
    if spec is None:
        spec = Spec(path=path, name="")
    spec.path = path
    _merge_into(spec, raw, reader)
    spec.chain.append(path)
    if not raw.get("name"):
        raise reader.fail(None, "missing key 'name' (every spec names its image)")
    if not spec.kernel_package and not spec.vmlinuz and not spec.kernel_build:
        raise reader.fail("kernel", "no kernel: set kernel.package, kernel.vmlinuz + "
                          "kernel.modules_dir, or kernel.build (here or in a parent)")
    return spec


def error_at(spec: Spec, key: str, needle: str, problem: str) -> SpecError:
    """A SpecError for a problem found after parsing (a package apt does not know,
    a module the kernel lacks), located in the spec file of the chain whose text
    mentions `needle` (a child's own file first, then its parents)."""
    for path in reversed(spec.chain):
        text = path.read_text()
        quoted = f'"{needle}"'
        if quoted in text:
            return SpecError(path, key, problem, text.count("\n", 0, text.index(quoted)) + 1)
    return SpecError(spec.path, key, problem)


def _merge_specs(base: Spec, other: Spec) -> None:
    if other.kernel_package or other.vmlinuz or other.kernel_build:
        base.kernel_package, base.vmlinuz, base.modules_dir = (
            other.kernel_package, other.vmlinuz, other.modules_dir)
        base.kernel_build, base.kernel_source = other.kernel_build, other.kernel_source
    for attr in ("modules", "packages", "exclude_packages", "exclude", "overlays"):
        target = getattr(base, attr)
        target.extend(x for x in getattr(other, attr) if x not in target)
    base.files.update(other.files)
    base.services.update(other.services)
    base.compress_level = other.compress_level
    base.chain.extend(p for p in other.chain if p not in base.chain)
