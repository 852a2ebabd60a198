"""The image store: build images into the content-addressed cache and find them.

API (used by the vm package and the CLI)::

    from megafleet.imagegen import store
    image = store.build("examples/images/tiny.toml")   # or a cache hit, ~ms
    image = store.find("tiny")          # by name, full hash or hash prefix
    image.name, image.hash              # str
    image.kernel, image.initramfs       # Path (read-only, in the cache)
    image.manifest                      # dict (see build.assemble)
    image.rootfs()                      # Path: the initramfs unpacked once, for
                                        # container guests (overlay lower dir)
    store.list_images(), store.remove("tiny")

Errors: `SpecError` (bad spec: names file, key, problem), `ImageNotFound`.

Cache layout under megafleet.paths.cache_dir() ($MEGAFLEET_CACHE):

    images/<hash>/{vmlinuz,initramfs.img,manifest.json}   one image, immutable
    rootfs/<hash>/                                        unpacked initramfs
    keys/<input-key>      -> hash   (same inputs: cache hit without building)
    names/<name>          -> hash   (the latest image built under that name)
    debs/, unpacked/      Debian packages and their unpacked trees

Every write goes to a temporary name in the same directory and is renamed into
place, so an interrupted build leaves no half-written image; a failed build
leaves the cache as it was (apart from downloaded .debs, which are inputs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megafleet import paths
from megafleet.imagegen import build as _build
from megafleet.imagegen import cpio, scratch
from megafleet.imagegen.spec import SpecError, load
from megafleet.names import check_name

__all__ = ["Image", "ImageNotFound", "SpecError", "build", "find", "list_images", "remove"]


class ImageNotFound(LookupError):
    pass


def _dir(name: str) -> Path:
    path = paths.cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class Image:
    name: str
    hash: str
    dir: Path
    manifest: dict = field(repr=False)
    cache_hit: bool = False
    build_seconds: float = 0.0

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.dir / "initramfs.img"

    @property
    def short(self) -> str:
        return self.hash[:12]

    def rootfs(self) -> Path:
        """The image's root file system as a directory (unpacked once, atomically,
        into the cache). Treat it as read-only: it is shared by every container
        guest of this image. Device nodes are left out."""
        target = _dir("rootfs") / self.hash
        if target.is_dir():
            return target
        scratch.sweep(target.parent, ".tmp")
        tmp = scratch.make(target.parent, ".tmp")
        try:
            import subprocess
            raw = subprocess.run(["zstd", "-q", "-d", "-c", str(self.initramfs)],
                                 capture_output=True, check=True).stdout
            cpio.extract(cpio.read(raw), tmp)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def _load_image(hash_: str) -> Image:
    d = paths.cache_dir() / "images" / hash_
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except FileNotFoundError:
        raise ImageNotFound(f"image {hash_[:12]} is not in the cache {paths.cache_dir()}") from None
    return Image(name=manifest["name"], hash=hash_, dir=d, manifest=manifest)


def build(spec_path: str | Path, *, progress: Callable[[str], None] = lambda s: None,
          force: bool = False) -> Image:
    """Build the image a spec describes, or return the cached one when nothing
    changed. Raises SpecError for a bad spec (the cache is left untouched)."""
    start = time.monotonic()
    spec = load(spec_path)
    key = _build.input_key(spec)
    key_file = _dir("keys") / key
    if key_file.exists() and not force:
        try:
            image = _load_image(key_file.read_text().strip())
            _write_atomic(_dir("names") / spec.name, image.hash + "\n")
            image.cache_hit = True
            image.build_seconds = time.monotonic() - start
            return image
        except ImageNotFound:
            pass  # the image was removed: build it again
    images = _dir("images")
    scratch.sweep(images, ".tmp")
    work = scratch.make(images, ".tmp")
    try:
        manifest = _build.assemble(spec, work, progress)
        target = images / manifest["hash"]
        if target.is_dir():  # identical image already there (same bytes)
            shutil.rmtree(work)
        else:
            os.chmod(work, 0o755)
            os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _write_atomic(key_file, manifest["hash"] + "\n")
    _write_atomic(_dir("names") / spec.name, manifest["hash"] + "\n")
    image = _load_image(manifest["hash"])
    image.build_seconds = time.monotonic() - start
    return image


def find(name_or_hash: str) -> Image:
    """An image by name (latest build), full hash or unique hash prefix (>= 4 hex)."""
    names = _dir("names")
    if (names / name_or_hash).is_file() and "/" not in name_or_hash:
        return _load_image((names / name_or_hash).read_text().strip())
    ref = name_or_hash.lower()
    if len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref):
        matches = [d.name for d in _dir("images").iterdir() if d.name.startswith(ref)]
        if len(matches) == 1:
            return _load_image(matches[0])
        if len(matches) > 1:
            raise ImageNotFound(f"hash prefix {name_or_hash!r} is ambiguous ({len(matches)} images)")
    raise ImageNotFound(f"no image named {name_or_hash!r} in {paths.cache_dir()} "
                        "(build it with: megafleet image build SPEC)")


def list_images() -> list[tuple[list[str], Image]]:
    """Every image in the cache with the names pointing at it, newest first."""
    by_hash: dict[str, list[str]] = {}
    for f in sorted(_dir("names").iterdir()):
        if not f.name.startswith("."):
            by_hash.setdefault(f.read_text().strip(), []).append(f.name)
    out = []
    for d in _dir("images").iterdir():
        if d.name.startswith("."):
            continue
        try:
            out.append((by_hash.get(d.name, []), _load_image(d.name)))
        except ImageNotFound:
            continue
    out.sort(key=lambda item: -(item[1].dir / "manifest.json").stat().st_mtime)
    return out


def remove(name_or_hash: str) -> Image:
    """Remove an image (its files, unpacked rootfs, names and keys pointing at it)."""
    image = find(name_or_hash)
    for sub in ("names", "keys"):
        for f in _dir(sub).iterdir():
            try:
                if f.read_text().strip() == image.hash:
                    f.unlink()
            except (FileNotFoundError, IsADirectoryError):
                pass
    for d in (paths.cache_dir() / "rootfs" / image.hash, image.dir):
        if d.exists():
            # Rename first so a half-removed image is never seen under its hash.
            trash = d.parent / f".rm-{d.name}-{os.getpid()}"
            os.rename(d, trash)
            shutil.rmtree(trash, ignore_errors=True)
    return image


def check_image_name(name: str) -> str:
    return check_name(name, "image name")
