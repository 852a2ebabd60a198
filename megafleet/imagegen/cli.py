"""`megafleet image ...`: build, list, inspect, remove and boot-test guest images."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from megafleet.imagegen import store
from megafleet.imagegen.spec import SpecError


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def _progress(json_out: bool):
    def report(message: str) -> None:
        click.echo(f"  {message}", err=True)
    return report


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    """Columns padded to their widest cell (each cell printed with str())."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _summary(image: store.Image) -> dict:
    m = image.manifest
    return {"name": image.name, "hash": image.hash, "kernel": str(image.kernel),
            "initramfs": str(image.initramfs), "kernel_version": m["kernel"]["version"],
            "kernel_bytes": m["kernel"]["bytes"], "initramfs_bytes": m["initramfs"]["bytes"],
            "packages": len(m["packages"]), "modules": len(m["modules"]["load_order"]),
            "services": sorted(m["services"])}


def _build(spec_path: str, force: bool = False) -> store.Image:
    click.echo(f"building {spec_path}", err=True)
    try:
        image = store.build(spec_path, progress=_progress(False), force=force)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    how = "cache hit" if image.cache_hit else "built"
    click.echo(f"{how}: {image.name} {image.short} in {image.build_seconds:.2f} s", err=True)
    return image


def _find(name: str) -> store.Image:
    try:
        return store.find(name)
    except store.ImageNotFound as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def image() -> None:
    """Build and manage RAM-only guest images.

    An image is a kernel plus a compressed initramfs holding the whole guest
    (busybox, the packages of its spec, the megafleet init and agent), built from
    a TOML spec into the content-addressed cache ($MEGAFLEET_CACHE, default
    ~/.cache/megafleet). The same spec and inputs always give the same bytes, and
    rebuilding an unchanged spec is a cache hit.

    \b
    Examples:
      megafleet image build examples/images/tiny.toml
      megafleet image ls
      megafleet image inspect tiny --json
      megafleet image boot-test --build examples/images/tiny.toml
      megafleet image rm tiny
    """


@image.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Build again even when the cache has this image.")
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON.")
def build(spec: str, force: bool, json_out: bool) -> None:
    """Build the image described by the TOML file SPEC.

    Fetches the kernel and the Debian packages with apt (kept in the .deb cache),
    resolves kernel modules from modules.dep, assembles and compresses the
    initramfs, and writes kernel, initramfs and manifest.json into the cache under
    the image's content hash. Progress goes to stderr. A mistake in the spec is
    reported with its file, key and line, and leaves the cache untouched.
    """
    img = _build(spec, force)
    out = _summary(img) | {"cache_hit": img.cache_hit, "seconds": round(img.build_seconds, 3)}
    if json_out:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(_table([[img.name, img.short, _mib(out["kernel_bytes"]),
                            _mib(out["initramfs_bytes"]), out["packages"], out["modules"],
                            "yes" if img.cache_hit else "no", f"{img.build_seconds:.2f}"]],
                          ["NAME", "HASH", "KERNEL", "INITRAMFS", "PACKAGES", "MODULES",
                           "CACHED", "SECONDS"]))


@image.command(name="ls")
@click.option("--json", "json_out", is_flag=True, help="Print the list as JSON.")
def ls_command(json_out: bool) -> None:
    """List the images in the cache, newest first.

    NAMES are the names that currently point at an image (the latest build of a
    spec); an image without a name is an older build, still usable by hash.
    """
    items = store.list_images()
    if json_out:
        click.echo(json.dumps([_summary(img) | {"names": names} for names, img in items], indent=2))
        return
    if not items:
        click.echo("no images (build one with: megafleet image build SPEC)")
        return
    click.echo(_table([[",".join(names) or "-", img.short, img.manifest["kernel"]["version"],
                        _mib(img.manifest["initramfs"]["bytes"]), len(img.manifest["packages"]),
                        len(img.manifest["modules"]["load_order"])] for names, img in items],
                      ["NAMES", "HASH", "KERNEL", "INITRAMFS", "PACKAGES", "MODULES"]))


@image.command()
@click.argument("name")
@click.option("--json", "json_out", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(name: str, json_out: bool) -> None:
    """Show an image's manifest: hash, files and sizes, packages with versions,
    kernel modules in load order, services. NAME is an image name or a hash
    (prefix)."""
    img = _find(name)
    m = img.manifest
    if json_out:
        click.echo(json.dumps(m | {"dir": str(img.dir)}, indent=2, sort_keys=True))
        return
    click.echo(f"name:        {img.name}\nhash:        {img.hash}\ndescription: {m.get('description', '')}")
    click.echo(f"kernel:      {img.kernel} ({_mib(m['kernel']['bytes'])}, {m['kernel']['version']}"
               f", {m['kernel']['package'] or 'local'})")
    click.echo(f"initramfs:   {img.initramfs} ({_mib(m['initramfs']['bytes'])} "
               f"{m['initramfs']['compression']}, {_mib(m['initramfs']['cpio_bytes'])} unpacked, "
               f"{m['initramfs']['entries']} entries)")
    click.echo("modules:     " + " ".join(m["modules"]["load_order"]))
    if m["services"]:
        click.echo("services:")
        for n, s in m["services"].items():
            click.echo(f"  {n:<10} {'start' if s['start'] else 'on request'}: {s['command']}")
    click.echo("packages:")
    table = _table([[p["name"], p["version"], p.get("role", "")] for p in m["packages"]],
                   ["NAME", "VERSION", "ROLE"])
    click.echo("\n".join("  " + line for line in table.splitlines()))


@image.command()
@click.argument("name")
@click.option("--json", "json_out", is_flag=True, help="Print what was removed as JSON.")
def rm(name: str, json_out: bool) -> None:
    """Remove an image from the cache (kernel, initramfs, manifest, unpacked
    rootfs and the names pointing at it). Downloaded .debs are kept."""
    img = _find(name)
    store.remove(img.hash)
    if json_out:
        click.echo(json.dumps({"removed": img.hash, "name": img.name}))
    else:
        click.echo(f"removed {img.name} {img.short}")


@image.command(name="boot-test")
@click.argument("name", required=False)
@click.option("--build", "spec", type=click.Path(dir_okay=False),
              help="Build this spec first (a cache hit if unchanged) and boot its image.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto",
              show_default=True, help="auto: KVM if the probe shows it really runs guests.")
@click.option("--machine", type=click.Choice(["q35", "microvm", "pc"]), default="q35",
              show_default=True, help="QEMU machine type.")
@click.option("--mem", "mem_mb", type=click.IntRange(80, 65536), default=128, show_default=True,
              help="Guest memory in MiB (Debian's cloud kernel needs 80: with 72 it "
                   "stops before printing anything).")
@click.option("--timeout", type=float, default=90.0, show_default=True,
              help="Seconds to wait for the readiness line.")
@click.option("--json", "json_out", is_flag=True, help="Print the measurements as JSON.")
def boot_test(name: str | None, spec: str | None, accel: str, machine: str, mem_mb: int,
              timeout: float, json_out: bool) -> None:
    """Boot one guest from image NAME under QEMU and report boot-to-ready time,
    the accelerator used and the guest's memory (QEMU's resident set).

    The guest gets a hostname and an address on an isolated NIC through the
    kernel command line; the test checks that the readiness line appears and that
    the first agent line parses and shows the address. The guest is stopped and
    everything removed afterwards.
    """
    from megafleet import qemu
    from megafleet.imagegen.boottest import BootFailed
    from megafleet.imagegen.boottest import boot_test as run_boot_test

    if spec:
        img = _build(spec)
    elif name:
        img = _find(name)
    else:
        raise click.UsageError("give an image NAME or --build SPEC")
    if accel == "auto":
        accel, reason = qemu.probe_accel()
        if not json_out:
            click.echo(f"accel: {accel} ({reason})", err=True)
    click.echo(f"booting {img.name} {img.short} under {accel} ({machine}) ...", err=True)
    try:
        result = run_boot_test(img, accel=accel, machine=machine, mem_mb=mem_mb, timeout=timeout)
    except BootFailed as exc:
        tail = "\n".join(exc.console.strip().splitlines()[-15:])
        raise click.ClickException(f"{exc}\n--- console (last lines) ---\n{tail}") from None
    out = result.to_json()
    if json_out:
        click.echo(json.dumps(out, indent=2))
        return
    addr = ", ".join(f"{k} {' '.join(v)}" for k, v in sorted((result.agent.addresses if result.agent else {}).items()) if k != "lo")
    click.echo(f"image:          {img.name} {img.short}")
    click.echo(f"accel:          {accel} ({machine})")
    click.echo(f"boot-to-ready:  {result.boot_to_ready_s:.2f} s (guest uptime {result.guest_uptime_s:.2f} s)")
    click.echo(f"guest RSS:      {_mib(result.guest_rss_bytes)}")
    click.echo(f"agent:          {'ok, ' + addr if result.agent else 'not checked'}")
    sys.stdout.flush()
