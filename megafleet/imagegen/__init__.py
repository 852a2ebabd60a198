"""imagegen: minimal RAM-only guest images, built reproducibly from TOML specs.

Modules, one concern each:

    spec      the TOML spec format, inheritance, validation (SpecError)
    debs      Debian packages: dependency closure, apt-get download, dpkg-deb -x
    kmod      kernel modules and their load order from modules.dep
    cpio      reproducible newc archive writer/reader
    build     assembling kernel + initramfs + manifest from a spec
    store     the content-addressed cache and the API other packages use:
              build(spec_path) -> Image, find(name_or_hash) -> Image,
              Image.kernel / .initramfs / .manifest / .rootfs()
    scratch   temporary directories that crashes do not leave behind
    boottest  boot one guest and measure it
    contract  the guest/host contract: kernel parameters, READY and AGENT lines
    guest/    the guest's init and agent (busybox sh), shipped as package data
    cli       `megafleet image ...`
"""
