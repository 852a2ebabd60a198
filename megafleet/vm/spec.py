"""The vm engine's spec: what guests this host must run (`GuestSpec`, `NicSpec`),
their validation, and what a boot reports (`BootReport`, `GuestResult`). The
calls that bring guests up and take them down are the engine's API,
`megafleet.vm.api` (`apply`, `teardown`); this module imports nothing of the
engine, so the engine and its callers share these types without a cycle.

The network layer (netlang) and `megafleet up` / host.py use both; the
`megafleet vm` commands are a thin layer over them::

    from megafleet.vm.spec import GuestSpec, NicSpec
    from megafleet.vm.api import apply, teardown
    from megafleet.imagegen.contract import GuestConfig, NicConfig

    specs = [GuestSpec(name=f"web{i}", image="tiny", driver="qemu", mem_mb=128,
                       nics=[NicSpec(mac=mac, kind="tap", ifname=tap)],
                       config=GuestConfig(name=f"web{i}",
                                          nics=(NicConfig(mac, ("10.1.0.5/24",)),)))
             for i in ...]
    report = await apply(specs, progress=callback)   # BootReport
    await teardown("web*")                              # fnmatch pattern

Network hand-over: the network layer creates every tap, veth and VDE switch
*before* calling `apply` and removes them after `teardown`; the engine only
attaches to them:

- ``kind="tap"``: ``ifname`` is an existing tap device (qemu, libvirt).
- ``kind="vde"``: ``vde_socket`` is the directory of a running vde_switch (qemu).
- ``kind="veth"`` (container), two ways:
  - with ``bridge``: the launcher creates the pair itself, its host end
    ``ifname`` on that bridge (up, ``mtu``), its far end born inside the
    container's network namespace as eth0, eth1, ... in NIC order with ``mac``.
    The network layer only names and records it: moving a link between
    namespaces costs the kernel an RCU grace period under its rtnl lock
    (35 ms each on this host; 1,000 guests queued 35 s on it), creating the
    far end in place costs none. The pair goes with the namespace.
  - without: ``ifname`` is the host end of an existing veth pair; the engine
    moves the other end (``peer``, or the interface the host end is linked to
    when ``peer`` is not given) into the namespace, renamed and with ``mac``.
  Either way before the guest init runs.

`apply` is idempotent: a guest that is already running under the same name is
left alone (reported as ``already``); a guest recorded as failed or stopped is
cleaned up and booted again. `teardown` tolerates anything already gone and can
be called any number of times, also after the engine was killed.

Per-guest settings (hostname, addresses, routes, agent interval) travel in
``config`` (a `GuestConfig` of the guest contract) as kernel parameters, or for
containers in /etc/megafleet/cmdline of the guest's writable layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from megafleet.imagegen.contract import GuestConfig, NicConfig
from megafleet.names import check_name
from megafleet.vm.driver import DEFAULT_DRIVER, DRIVER_KINDS, DRIVER_NAMES

DRIVERS = DRIVER_NAMES
NIC_KINDS = ("tap", "veth", "vde")
# Which NIC kinds each driver can attach to (from the registry).
DRIVER_NIC_KINDS = {k.name: k.nic_kinds for k in DRIVER_KINDS.values()}

_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_HASH_RE = re.compile(r"[0-9a-f]{12,64}")


class SpecError(ValueError):
    """A guest specification the engine cannot run; the message names the guest,
    the field and what is wrong."""


@dataclass(frozen=True)
class NicSpec:
    mac: str
    kind: str = "tap"
    ifname: str | None = None
    vde_socket: str | None = None
    peer: str | None = None
    bridge: str | None = None       # veth: create the pair, host end on this bridge
    mtu: int | None = None          # veth with bridge: both ends' MTU (default the kernel's 1500)


@dataclass(frozen=True)
class GuestSpec:
    """One guest. `image` is an image name or its content hash (>= 12 hex digits)."""

    name: str
    image: str
    driver: str = DEFAULT_DRIVER
    mem_mb: int = 128
    vcpus: int = 1
    nics: tuple[NicSpec, ...] | list[NicSpec] = ()
    config: GuestConfig | None = None

    def guest_config(self) -> GuestConfig:
        """The config the guest init applies: the given one, or just the name."""
        return self.config if self.config is not None else GuestConfig(name=self.name)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-shaped data: what `dataclasses.asdict` gives, with
        lists for tuples, so it equals its own JSON round trip (diff_json
        compares a running testbed's manifest, read back from JSON, with the
        new one's dicts). Field by field: the generic walk was the largest part
        of a plan's digest (a tenth of a reconciling `up` at 1,000 guests)."""
        c = self.config
        return {"name": self.name, "image": self.image, "driver": self.driver, "mem_mb": self.mem_mb,
                "vcpus": self.vcpus,
                "nics": [{"mac": n.mac, "kind": n.kind, "ifname": n.ifname, "vde_socket": n.vde_socket,
                          "peer": n.peer, "bridge": n.bridge, "mtu": n.mtu} for n in self.nics],
                "config": None if c is None else {
                    "name": c.name,
                    "nics": [{"mac": n.mac, "addresses": list(n.addresses), "mtu": n.mtu} for n in c.nics],
                    "gateway": c.gateway, "gateway6": c.gateway6, "routes": [list(r) for r in c.routes],
                    "agent_interval": c.agent_interval, "services": list(c.services),
                    "forward": c.forward}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuestSpec":
        config = data.get("config")
        if config is not None:
            config = GuestConfig(
                name=config["name"],
                nics=tuple(NicConfig(n["mac"], tuple(n.get("addresses", ())), n.get("mtu"))
                           for n in config.get("nics", ())),
                gateway=config.get("gateway"), gateway6=config.get("gateway6"),
                routes=tuple(tuple(r) for r in config.get("routes", ())),
                agent_interval=config.get("agent_interval", 5.0),
                services=tuple(config.get("services", ())),
                forward=bool(config.get("forward", False)))
        return cls(name=data["name"], image=data["image"], driver=data.get("driver", DEFAULT_DRIVER),
                   mem_mb=int(data.get("mem_mb", 128)), vcpus=int(data.get("vcpus", 1)),
                   nics=tuple(NicSpec(**n) for n in data.get("nics", ())), config=config)


def validate(spec: GuestSpec, *, config: bool = True) -> GuestSpec:
    """Check one spec completely (without its guest config when `config` is
    False: see validate_config); raise SpecError naming guest and field."""
    try:
        check_name(spec.name, "guest name")
        if not _HASH_RE.fullmatch(str(spec.image)):  # an image by name, or by content hash
            check_name(spec.image, "image name")
    except ValueError as exc:
        raise SpecError(f"guest {spec.name!r}: {exc}") from None
    where = f"guest {spec.name}"
    if spec.driver not in DRIVERS:
        raise SpecError(f"{where}: driver: unknown driver {spec.driver!r} "
                        f"(choose one of {', '.join(DRIVERS)})")
    if not isinstance(spec.mem_mb, int) or not spec.mem_mb <= 1 << 20:
        raise SpecError(f"{where}: mem_mb: {spec.mem_mb!r} is not a size in MiB up to 1048576")
    if (problem := DRIVER_KINDS[spec.driver].mem_problem(spec.mem_mb)) is not None:
        raise SpecError(f"{where}: mem_mb: {problem}")
    if not isinstance(spec.vcpus, int) or not 1 <= spec.vcpus <= 64:
        raise SpecError(f"{where}: vcpus: {spec.vcpus!r} is not between 1 and 64")
    for i, nic in enumerate(spec.nics):
        at = f"{where}: nics[{i}]"
        if not _MAC_RE.fullmatch(str(nic.mac).lower()):
            raise SpecError(f"{at}: mac: {nic.mac!r} is not a MAC address like 52:54:00:12:34:56")
        if nic.kind not in NIC_KINDS:
            raise SpecError(f"{at}: kind: unknown NIC kind {nic.kind!r} (choose one of {', '.join(NIC_KINDS)})")
        if nic.kind not in DRIVER_NIC_KINDS[spec.driver]:
            raise SpecError(f"{at}: kind: the {spec.driver} driver cannot attach a {nic.kind!r} NIC "
                            f"(it takes {', '.join(DRIVER_NIC_KINDS[spec.driver])})")
        if nic.kind in ("tap", "veth"):
            if not nic.ifname or not _IFNAME_RE.fullmatch(nic.ifname):
                raise SpecError(f"{at}: ifname: {nic.ifname!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
        if nic.peer is not None and not _IFNAME_RE.fullmatch(nic.peer):
            raise SpecError(f"{at}: peer: {nic.peer!r} is not an interface name")
        if nic.bridge is not None:
            if nic.kind != "veth" or not _IFNAME_RE.fullmatch(nic.bridge):
                raise SpecError(f"{at}: bridge: {nic.bridge!r}: only a veth NIC names a bridge, "
                                "and it is an interface name")
        if nic.mtu is not None and not 68 <= int(nic.mtu) <= 65535:
            raise SpecError(f"{at}: mtu: {nic.mtu!r} is not between 68 and 65535")
        if nic.kind == "vde":
            if not nic.vde_socket or not str(nic.vde_socket).startswith("/") or "," in nic.vde_socket:
                raise SpecError(f"{at}: vde_socket: {nic.vde_socket!r} is not an absolute path without ','")
    if config:
        validate_config(spec)
    return spec


def validate_config(spec: GuestSpec) -> GuestSpec:
    """Check the guest config of a spec (its kernel arguments: addresses,
    routes, services): what the guest gets at boot. The engine checks it for
    the guests it boots; parsing every address of a thousand guests already
    running was a twentieth of adding ten to them."""
    try:
        spec.guest_config().kernel_args()
    except ValueError as exc:
        raise SpecError(f"guest {spec.name}: config: {exc}") from None
    if spec.config is not None and spec.config.name != spec.name:
        raise SpecError(f"guest {spec.name}: config: name {spec.config.name!r} differs from the guest name")
    return spec


def validate_all(specs: list[GuestSpec], *, config: bool = True) -> list[GuestSpec]:
    """`validate` each spec (`config` as there) and refuse a name listed twice."""
    seen: set[str] = set()
    for spec in specs:
        validate(spec, config=config)
        if spec.name in seen:
            raise SpecError(f"guest {spec.name}: name: listed twice")
        seen.add(spec.name)
    return list(specs)


@dataclass
class GuestResult:
    """What happened to one guest of a boot."""

    name: str
    driver: str
    outcome: str                 # "ready", "failed" or "already" (left alone)
    boot_s: float | None = None  # start of the successful attempt -> ready line
    attempts: int = 0
    reason: str | None = None
    console_tail: str | None = None


@dataclass
class BootReport:
    results: list[GuestResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ready(self) -> list[GuestResult]:
        return [r for r in self.results if r.outcome == "ready"]

    @property
    def failed(self) -> list[GuestResult]:
        return [r for r in self.results if r.outcome == "failed"]

    @property
    def already(self) -> list[GuestResult]:
        return [r for r in self.results if r.outcome == "already"]

    def percentile(self, q: float) -> float | None:
        times = sorted(r.boot_s for r in self.ready if r.boot_s is not None)
        return percentile(times, q)

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "ready": len(self.ready), "failed": len(self.failed), "already": len(self.already),
            "boot_p50_s": _round(self.percentile(50)), "boot_p95_s": _round(self.percentile(95)),
            # Its fields are all scalars: a shallow copy is asdict's answer
            # without its deep copy of each (a thousand guests each `up`).
            "guests": [dict(vars(r)) for r in self.results],
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile of already sorted values (None if empty)."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# progress(done, total, result) is called after each guest finishes (ready or failed).
Progress = Callable[[int, int, GuestResult], None]
