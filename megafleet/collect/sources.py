"""Where the collector's guest information comes from, and how engines report to it.

- `vm_guest_source(engine)`: the guests of the vm engine's per-host state
  (`Engine.list()`: name, image, state reconciled with /proc, pid, RSS, boot
  time, failure reason), as the `GuestSource` the guest sampler reads every
  interval. The sampler turns new `running`/`failed` records into boot events,
  and guests that vanish into teardown events, so a collector in its own process
  (`megafleet telemetry run`, as host.py starts it) reports boots too.
- `vm_agent_logs(engine)`: (guest, agent.log path) of each guest the qemu driver
  started, for the agent-log sampler (the guest agent's lines land there).
- `vm_container_source(engine)`: the running container guests, for the
  container sampler (`megafleet.collect.containers`), which reads their
  telemetry from the host: containers run no agent.
- `boot_progress(collector, specs)`: a `progress` callback for
  `megafleet.vm.api.apply` that turns each finished guest into a `boot`
  event (duration, or failure reason) without blocking the engine.

The vm package is imported only when these are used, so collect does not depend
on it otherwise.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable

from megafleet.collect.samplers import GuestInfo


def vm_guest_source(engine: Any = None, pattern: str = "*") -> Callable[[], list[GuestInfo]]:
    """A GuestSource over the vm engine's state of this host (blocking: the
    sampler calls it in a worker thread)."""
    if engine is None:
        from megafleet.vm.engine import Engine

        engine = Engine()

    def guests() -> list[GuestInfo]:
        # The record's last change gives boot events a time (and so an id) that
        # is the same whoever reads it, however often. Read after the states:
        # read before, a guest that became running in between came with its
        # 'starting' time, then again with its 'running' one, as two boots.
        views = engine.list(pattern)
        changed = {name: int(updated * 1000) for name, updated in engine.state.updated().items()}
        return [GuestInfo(name=v.name, state=v.state, pid=v.pid, image=v.image,
                          rss_kb=v.rss_bytes // 1024 if v.rss_bytes is not None else None,
                          boot_s=v.boot_s, reason=v.reason, changed_ms=changed.get(v.name))
                for v in views]

    return guests


def vm_agent_logs(engine: Any = None, pattern: str = "*") -> Callable[[], list[tuple[str, str]]]:
    """An agent-log source over the vm engine's state (blocking)."""
    if engine is None:
        from megafleet.vm.engine import Engine

        engine = Engine()

    def logs() -> list[tuple[str, str]]:
        # Selected by SQLite: no row is parsed here (thousands of containers,
        # none with an agent log, at every pass).
        return [(name, path) for name, path in engine.state.handle_values("agent").items()
                if path and fnmatch.fnmatchcase(name, pattern)]

    return logs


def boot_progress(collector: Any, specs: Iterable[Any],
                  chain: Callable[..., None] | None = None) -> Callable[[int, int, Any], None]:
    """progress(done, total, result) for vm.api.apply: each ready or failed
    guest becomes a boot event; `chain` (another progress callback) still runs."""
    images = {s.name: s.image for s in specs}

    def progress(done: int, total: int, result: Any) -> None:
        if result.outcome in ("ready", "failed"):
            ok = result.outcome == "ready"
            collector.boot(result.name, ok=ok, duration_s=result.boot_s,
                           image=images.get(result.name),
                           reason=None if ok else (result.reason or "failed"))
        if chain is not None:
            chain(done, total, result)

    return progress


def vm_container_source(engine: Any = None, pattern: str = "*") -> Callable[[], list[Any]]:
    """The running container guests of the vm engine's state, as the
    `ContainerSource` the container sampler reads every interval (blocking):
    each with its init's pid, the addresses the host configured on its NICs
    (eth0, eth1, ... in NIC order) and its agent interval."""
    from megafleet.collect.containers import ContainerInfo

    if engine is None:
        from megafleet.vm.engine import Engine

        engine = Engine()

    from megafleet.vm.driver import DRIVER_KINDS

    def containers() -> list[ContainerInfo]:
        out = []
        for rec in engine.state.list(pattern):
            kind = DRIVER_KINDS.get(rec.driver)
            # Guests with no agent of their own: the host samples them.
            if kind is None or not kind.host_sampled or rec.state != "running" or not rec.pid:
                continue
            config = rec.spec.get("config") or {}
            by_mac = {n["mac"].lower(): tuple(n.get("addresses", ())) for n in config.get("nics", ())}
            addresses = {f"eth{i}": by_mac.get(n["mac"].lower(), ())
                         for i, n in enumerate(rec.spec.get("nics", ()))}
            out.append(ContainerInfo(name=rec.name, pid=rec.pid, pid_start=rec.pid_start,
                                     interval=float(config.get("agent_interval", 5.0)),
                                     addresses={k: v for k, v in addresses.items() if v}))
        return out

    return containers
