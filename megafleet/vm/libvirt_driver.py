"""The libvirt driver: guests as transient libvirt domains (libvirt-python).

The domain XML is generated from the guest spec (`domain_xml`) with the same
image (direct kernel boot), kernel command line, console log file, agent channel
(virtio-serial port org.megafleet.agent to ``agent.log``), exec channel (port
org.megafleet.exec on ``exec.sock``) and NICs (existing taps,
``<interface type='ethernet'>`` with managed='no') as the qemu driver. Transient
domains vanish from libvirt when destroyed, so nothing stays defined.

QEMU under libvirt runs as root with relabeling off: images in the shared cache
are never chowned, and it may write to the guest directory and open the taps.

Every libvirt call blocks, so it runs in a worker thread with a bounded limiter;
the connection (URI default qemu:///system, or $MEGAFLEET_LIBVIRT_URI) is opened
lazily, once per driver.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import trio

from megafleet.imagegen.contract import AGENT_PORT_NAME, EXEC_PORT_NAME
from megafleet.proc import RecordedProcess
from megafleet.vm.driver import Driver, StartFailed, rss_bytes
from megafleet.qemu import QEMU, SERIAL_PORTS, TCG_TB_SIZE_MB
from megafleet.vm.qemu_driver import BASE_KERNEL_ARGS, MACHINE, host_accel

DEFAULT_URI = "qemu:///system"
LIBVIRT_RUN = Path("/run/libvirt/qemu")


def default_uri() -> str:
    return os.environ.get("MEGAFLEET_LIBVIRT_URI") or DEFAULT_URI


def domain_xml(spec, kernel: Path, initramfs: Path, gdir: Path, accel: str) -> str:
    """The transient domain definition of one guest."""
    dom = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.mem_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=MACHINE).text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(kernel)
    ET.SubElement(os_el, "initrd").text = str(initramfs)
    ET.SubElement(os_el, "cmdline").text = " ".join(BASE_KERNEL_ARGS + spec.guest_config().kernel_args())
    if accel == "kvm":
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    else:
        ET.SubElement(dom, "cpu", mode="custom", match="exact").append(_model("qemu64"))
        features = ET.SubElement(dom, "features")
        tcg = ET.SubElement(features, "tcg")
        ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(TCG_TB_SIZE_MB)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = f"/usr/bin/{QEMU}"
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(gdir / "console.log"))
    ET.SubElement(serial, "target", port="0")
    # Three ports, not the default 31 (see qemu.SERIAL_PORTS).
    ET.SubElement(devices, "controller", type="virtio-serial", index="0", ports=str(SERIAL_PORTS))
    channel = ET.SubElement(devices, "channel", type="file")
    ET.SubElement(channel, "source", path=str(gdir / "agent.log"))
    ET.SubElement(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    exec_channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(exec_channel, "source", mode="bind", path=str(gdir / "exec.sock"))
    ET.SubElement(exec_channel, "target", type="virtio", name=EXEC_PORT_NAME)
    for nic in spec.nics:
        iface = ET.SubElement(devices, "interface", type="ethernet")
        ET.SubElement(iface, "mac", address=nic.mac.lower())
        ET.SubElement(iface, "target", dev=nic.ifname, managed="no")
        ET.SubElement(iface, "model", type="virtio")
    ET.SubElement(devices, "memballoon", model="none")
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type="none")
    seclabel = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(seclabel, "label").text = "+0:+0"
    return ET.tostring(dom, encoding="unicode")


class LibvirtDriver(Driver):
    name = "libvirt"
    owns_process = False  # libvirt owns the qemu process; we own the domain

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or default_uri()
        self._conn = None
        self._limiter = trio.CapacityLimiter(8)

    @property
    def accel(self) -> str:
        """'kvm' or 'tcg' (probed on first use only: `vm ls` never boots a probe)."""
        return host_accel()

    def admission_kind(self) -> str:
        return self.accel

    def connection(self):
        """The libvirt connection (blocking: call from a worker thread)."""
        if self._conn is None:
            import libvirt
            libvirt.registerErrorHandler(lambda ctx, err: None, None)  # no stderr noise
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise StartFailed(f"cannot connect to libvirt at {self.uri}: {exc} "
                                  "(is libvirtd running? scripts/libvirtd-up starts it)") from None
        return self._conn

    async def _call(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def open(self, count: int) -> None:
        await self._call(self.connection)

    def records(self, name: str, gdir: Path) -> list[tuple[str, str, dict[str, Any]]]:
        return [("domain", name, {"guest": name, "driver": self.name, "uri": self.uri})]

    async def start(self, spec, image, gdir: Path) -> dict[str, Any]:
        xml = domain_xml(spec, image.kernel, image.initramfs, gdir, self.accel)
        return await self._call(self._create, spec.name, xml, gdir)

    def _create(self, name: str, xml: str, gdir: Path) -> dict[str, Any]:
        import libvirt
        try:
            self.connection().createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise StartFailed(f"libvirt could not create domain {name}: {exc}") from None
        handle: dict[str, Any] = {"domain": name, "uri": self.uri, "console": str(gdir / "console.log"),
                                  "agent": str(gdir / "agent.log"), "exec": str(gdir / "exec.sock")}
        proc = _qemu_process(name)
        if proc is not None:
            handle.update(pid=proc.pid, pid_start=proc.start)
        return handle

    def alive(self, handle: dict[str, Any]) -> bool:
        # By the QEMU process libvirt started (no libvirt call on the event loop).
        if handle.get("pid") and handle.get("pid_start") is not None:
            return RecordedProcess(handle["pid"], handle["pid_start"]).alive()
        proc = _qemu_process(handle.get("domain") or "")
        return proc is not None and proc.alive()

    def rss_bytes(self, handle: dict[str, Any]) -> int | None:
        pid = handle.get("pid")
        return rss_bytes(pid) if pid and self.alive(handle) else None

    async def stop(self, name: str, handle: dict[str, Any], *, force: bool) -> None:
        await self._call(self._destroy, name, force)

    async def remove(self, records: list[dict[str, Any]]) -> None:
        """Teardown: destroy the domains recorded (key: the domain's name)."""
        await self.destroy_many([r["key"] for r in records])

    async def destroy_many(self, names: list[str]) -> None:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self._call, self._destroy, name, True)

    def _destroy(self, name: str, force: bool) -> None:
        """Destroy the transient domain if it exists (gone already is fine)."""
        import libvirt
        try:
            dom = self.connection().lookupByName(name)
        except libvirt.libvirtError:
            return
        try:
            if force:
                dom.destroy()
            else:
                dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
        except libvirt.libvirtError:
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass

    async def aclose(self) -> None:
        pass


def _model(name: str) -> ET.Element:
    model = ET.Element("model", fallback="allow")
    model.text = name
    return model


def _qemu_process(domain: str) -> RecordedProcess | None:
    from megafleet.vm.driver import process_from_pidfile
    if not domain or "/" in domain:
        return None
    return process_from_pidfile(LIBVIRT_RUN / f"{domain}.pid")
