"""The collector of one host: samplers, sniffers and the pipeline, wired together.

Engines hand it what only they know through non-blocking calls: `boot`,
`teardown`, `error` (events, never dropped), `agent_line` (a guest agent's
or console's line, parsed with the guest contract) and `ksm_sample` (the ksm
daemon's `on_sample`). Everything else it samples
itself on its own intervals.

    collector = Collector("host1", store, spool_dir=..., guest_source=engine.guests)
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.run)
        ...
        collector.stop()        # samplers stop, the pipeline flushes, run returns
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import trio

from megafleet import paths
from megafleet.collect import docs as D
from megafleet.collect.pipeline import Pipeline
from megafleet.collect.samplers import (AgentLogSampler, GuestSampler, GuestSource,
                                        HostSampler, InterfaceSampler, agent_line_doc)
from megafleet.collect.sniff import SwitchSniffer
from megafleet.collect.spool import Spool
from megafleet.names import check_name

log = logging.getLogger("megafleet.collect")
# The longest a stopping collector looks for last events, per sampler: `down`
# stops it with SIGTERM and a 10 s grace before SIGKILL.
FINAL_EVENTS_S = 3.0


def default_spool_dir(host: str) -> Path:
    """One spool per host name in the state directory (a spool is locked by
    the collector that uses it)."""
    return paths.state_dir() / "telemetry-spool" / check_name(host, "host")


def _switch_and_bridge(spec: str) -> tuple[str, str]:
    """ "NAME=BRIDGE" or just "BRIDGE" (then the bridge names the switch too)."""
    name, _, bridge = spec.partition("=")
    return name, bridge or name


class Collector:
    def __init__(self, host: str, store: Any, *, spool_dir: Path | str | None = None,
                 guest_source: GuestSource | None = None, guest_interval: float = 10.0,
                 iface_interval: float = 10.0, host_interval: float = 10.0,
                 switches: Sequence[str] = (), sniff_interval: float = 10.0,
                 agent_logs=None, agent_interval: float = 5.0, container_source=None,
                 iface_select=None, spool_max_bytes: int = 512 << 20, guest_aggregate: bool = False,
                 **pipeline_options: Any):
        self.host = check_name(host, "host")
        self.spool = Spool(spool_dir or default_spool_dir(self.host), max_bytes=spool_max_bytes)
        self.pipeline = Pipeline(store, self.spool, host=self.host, **pipeline_options)
        self.samplers: list[Any] = [HostSampler(self.host, host_interval),
                                    InterfaceSampler(self.host, iface_interval, iface_select)]
        if guest_source is not None:
            # guest_aggregate: one document per interval for all guests (see GuestSampler).
            self.samplers.append(GuestSampler(self.host, guest_source, guest_interval,
                                              aggregate=guest_aggregate))
        if agent_logs is not None:
            self.samplers.append(AgentLogSampler(self.host, agent_logs, agent_interval))
        if container_source is not None:
            # Containers run no agent: their agent samples are read from here.
            from megafleet.collect.containers import ContainerSampler
            self.samplers.append(ContainerSampler(self.host, container_source, agent_interval))
        # "lan1=mfbr-lan1": the switch's name in the documents, then its bridge.
        self.sniffers = [SwitchSniffer(self.host, *_switch_and_bridge(s), interval=sniff_interval)
                         for s in switches]
        self._stop = trio.Event()
        self._seq = 0

    # -- what engines report (non-blocking) ------------------------------------------

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def boot(self, guest: str, *, ok: bool, duration_s: float | None, image: str | None = None,
             reason: str | None = None) -> None:
        """A guest finished booting (ok) or failed to (reason says why)."""
        self.pipeline.submit_event(D.event(
            "boot", self.host, level="info" if ok else "error", guest=guest, image=image,
            ok=ok, duration_s=duration_s, reason=reason, seq=self._next()))

    def teardown(self, guest: str, *, ok: bool, duration_s: float | None,
                 reason: str | None = None) -> None:
        self.pipeline.submit_event(D.event(
            "teardown", self.host, level="info" if ok else "error", guest=guest, ok=ok,
            duration_s=duration_s, reason=reason, seq=self._next()))

    def error(self, what: str, message: str, *, guest: str | None = None) -> None:
        self.pipeline.submit_event(D.event(what, self.host, level="error", guest=guest,
                                           message=message, seq=self._next()))

    def agent_line(self, guest: str, line: str) -> None:
        """One line from a guest's agent port or console; lines without a marker
        are ignored, malformed ones become a warning event."""
        doc = agent_line_doc(self.host, guest, line, seq=self._next())
        if doc is None:
            return
        if doc["meta"]["kind"] == "event":
            self.pipeline.submit_event(doc)
        else:
            self.pipeline.submit(doc)

    def ksm_sample(self, sample: dict[str, Any]) -> None:
        """A sample of the ksm package (`megafleet.ksm.daemon.samples()` or the
        daemon's `on_sample`): saving, sharing ratio, ksmd CPU, and the tuning
        policy's mode and reason when the daemon adds them."""
        fields: dict[str, Any] = {}
        for key in ("saved_bytes", "sharing_ratio", "ksmd_cpu_s", "ksmd_cpu_pct",
                    "general_profit_mb", "mode", "reason", "guest_kb"):
            if sample.get(key) is not None:
                fields[key] = sample[key]
        for key in ("counters", "knobs"):
            values = {k: v for k, v in (sample.get(key) or {}).items()
                      if isinstance(v, (int, str))}
            if values:
                fields[key] = values
        time_ms = int(sample["time"] * 1000) if sample.get("time") else None
        self.pipeline.submit(D.sample(D.KSM, self.host, fields, time_ms=time_ms))

    def _sampler_failed(self, name: str, exc: Exception) -> None:
        log.warning("telemetry sampler %s failed: %s", name, exc)
        self.error("sampler-error", f"{name}: {exc}")

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(2)
        async with trio.open_nursery() as outer:
            await outer.start(self.pipeline.run)
            async with trio.open_nursery() as inner:
                for sampler in self.samplers:
                    inner.start_soon(functools.partial(
                        sampler.run, self.pipeline.submit, submit_event=self.pipeline.submit_event,
                        limiter=limiter, on_error=self._sampler_failed))
                for sniffer in self.sniffers:
                    await inner.start(self._sniff, sniffer)
                task_status.started()
                await self._stop.wait()
                inner.cancel_scope.cancel()
            await self._final_events(limiter)
            self.pipeline.close()
        self.spool.close()

    async def _final_events(self, limiter: trio.CapacityLimiter) -> None:
        """One last look for events (boots) before the pipeline flushes: a boot
        recorded less than an interval before `stop` is not lost. Bounded by
        FINAL_EVENTS_S per sampler (whoever stops us waits only so long)."""
        now_ms = D.now_ms()
        for sampler in self.samplers:
            with trio.move_on_after(FINAL_EVENTS_S):
                try:
                    docs = await trio.to_thread.run_sync(sampler.final_events, now_ms, limiter=limiter,
                                                         abandon_on_cancel=True)
                except Exception as exc:  # as in the sampling loop: say so, keep the rest
                    self._sampler_failed(sampler.name, exc)
                    continue
                for doc in docs:
                    self.pipeline.submit_event(doc)

    async def _sniff(self, sniffer: SwitchSniffer, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            await sniffer.run(self.pipeline.submit, task_status=task_status)
        except OSError as exc:  # no such bridge, no permission: say so, keep the rest
            self.error("sniff-error", f"switch {sniffer.switch}: {exc}")
            try:
                task_status.started()
            except RuntimeError:
                pass  # it had started: the interface went away later

    def stop(self) -> None:
        """Stop sampling, flush the pipeline; `run` returns when it is written."""
        self._stop.set()
