"""Simulated hosts: the handlers a simulated agent runs instead of `megafleet.host`.

`SimHosts.lookup` has the shape of `gproc.handlers.lookup`; a simulated agent
uses it (via `links.SimNetwork`), so `Fleet.call("host.apply", ...)` reaches
`SimHosts.sim_apply` and never the real engines. The simulation handlers:

* `host.probe` -> `sim_probe`: the probe's answer (MTU, memory, cache, no image
  missing: the simulation pushes no images);
* `host.apply` -> `sim_apply`: reads the guests of the real manifest, boots
  them in `parallel` slots, each taking a time drawn from `BootModel`, fails a
  given fraction of them (chosen by a seeded hash of the guest name, so a run
  is reproducible), emits progress as the real host does (at most once a
  second, plus each failure) and returns the real result shape;
* `host.down` -> `sim_down`, `host.status` -> `sim_status`.

Where the times come from (bench/RESULTS.md and bench/results/, this machine):

* `BootModel.containers_here()`: `bench/results/up-2026-11-29.json`, k1000:
  1,000 container guests on 4 namespace hosts of this 2-core machine, 250
  guests per host: `host_vm` 30.83 s, `host_net` 0.78 s; down 8.86 s.
* `BootModel.qemu_tcg_here()`: `bench/results/boot-2026-11-29.json`: 32 QEMU
  guests booting at once under TCG, boot p50 10.69 s, p95 11.585 s.

The per-guest spread is a log-normal with the QEMU run's p95/p50 ratio.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import trio

from megafleet.gproc import handlers

Z95 = 1.6449
QEMU_P50_S, QEMU_P95_S = 10.69, 11.585        # boot-2026-11-29.json
K1000_GUESTS_PER_HOST, K1000_VM_S = 250, 30.83  # up-2026-11-29.json, k1000 host_vm
K1000_NET_S, K1000_DOWN_S = 0.78, 8.86          # up-2026-11-29.json: host_net, k1000_down_s


@dataclass(frozen=True)
class BootModel:
    """How long one host takes to bring its guests up: guests boot `parallel`
    at a time, each for a log-normal time of median `median_s` and spread
    `sigma`; the network of the host first takes `net_s_per_guest` per guest;
    tearing down takes `down_s_per_guest` per guest."""

    name: str
    parallel: int
    median_s: float
    sigma: float
    net_s_per_guest: float
    down_s_per_guest: float
    source: str

    @classmethod
    def containers_here(cls, parallel: int = 8) -> "BootModel":
        return cls("containers (k1000 on this machine)", parallel,
                   K1000_VM_S * parallel / K1000_GUESTS_PER_HOST,
                   math.log(QEMU_P95_S / QEMU_P50_S) / Z95,
                   K1000_NET_S / K1000_GUESTS_PER_HOST, K1000_DOWN_S / K1000_GUESTS_PER_HOST,
                   "bench/results/up-2026-11-29.json (k1000: 250 containers per host, host_vm 30.83 s, "
                   "host_net 0.78 s, down 8.86 s)")

    @classmethod
    def qemu_tcg_here(cls, parallel: int = 32) -> "BootModel":
        return cls("qemu under TCG (32 at once on this machine)", parallel, QEMU_P50_S,
                   math.log(QEMU_P95_S / QEMU_P50_S) / Z95,
                   K1000_NET_S / K1000_GUESTS_PER_HOST, K1000_DOWN_S / K1000_GUESTS_PER_HOST,
                   "bench/results/boot-2026-11-29.json (32 QEMU guests, p50 10.69 s, p95 11.585 s)")

    def boot_s(self, rng: random.Random) -> float:
        return self.median_s * math.exp(self.sigma * rng.gauss(0.0, 1.0))


@dataclass
class _HostState:
    testbeds: dict[str, dict[str, Any]] = field(default_factory=dict)   # testbed -> apply result
    applying: dict[str, trio.Event] = field(default_factory=dict)
    # Guests already booted (name -> (failed, seconds)): an apply cut short (its
    # agent died with its parent) is re-sent after re-attachment and, like the
    # real one, finds them running and boots only the rest.
    booted: dict[str, dict[str, tuple[bool, float]]] = field(default_factory=dict)


class SimHosts:
    """The simulated hosts' side: their handlers and what each host holds."""

    def __init__(self, model: BootModel, *, fail_fraction: float = 0.0, seed: int = 1):
        self.model = model
        self.fail_fraction = fail_fraction
        self.seed = seed
        self.state: dict[str, _HostState] = {}
        self.table = {"host.probe": self.sim_probe, "host.apply": self.sim_apply,
                      "host.down": self.sim_down, "host.status": self.sim_status,
                      "gproc.ping": self.sim_ping}

    def lookup(self, name: str, modules: Sequence[str] = ()) -> handlers.Handler:
        """`handlers.lookup` for simulated agents: the simulation handlers only
        (the modules named by the request are not imported)."""
        try:
            return self.table[name]
        except KeyError:
            raise handlers.UnknownHandler(f"no simulation handler named {name!r} "
                                          f"(known: {', '.join(sorted(self.table))})") from None

    def _fails(self, guest: str) -> bool:
        if self.fail_fraction <= 0:
            return False
        h = hashlib.blake2b(f"{self.seed}:{guest}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64 < self.fail_fraction

    async def sim_ping(self, payload: Any, ctx: handlers.Context) -> dict[str, Any]:
        return {"host": ctx.host, "pid": 0, "uname": "simulated", "load": 0.0}

    async def sim_probe(self, payload: Any, ctx: handlers.Context) -> dict[str, Any]:
        return {"mtu": 1500, "mem_available_mb": 256 * 1024, "cpus": 64,
                "cache_dir": f"/simulated/{ctx.host}/cache", "missing_images": []}

    async def sim_apply(self, payload: Any, ctx: handlers.Context) -> dict[str, Any]:
        testbed, host = payload["testbed"], ctx.host
        state = self.state.setdefault(host, _HostState())
        while testbed in state.applying:          # another apply of it runs (or is ending)
            await state.applying[testbed].wait()
        if testbed in state.testbeds:             # idempotent, like the real apply
            return state.testbeds[testbed]
        done = trio.Event()
        state.applying[testbed] = done
        try:
            return await self._apply(payload, ctx, state)
        finally:
            del state.applying[testbed]
            done.set()

    async def _apply(self, payload: Any, ctx: handlers.Context, state: _HostState) -> dict[str, Any]:
        testbed, host = payload["testbed"], ctx.host
        booted = state.booted.setdefault(testbed, {})
        names = [v["name"] for v in payload["net"]["vms"]]
        rng = random.Random(f"{self.seed}:{host}")
        t0 = trio.current_time()
        await ctx.emit({"phase": "net", "state": "start"})
        net_s = self.model.net_s_per_guest * len(names)
        await trio.sleep(net_s)
        await ctx.emit({"phase": "vm", "state": "start", "total": len(names)})
        counts = {"ready": 0, "failed": 0}
        failed: list[dict[str, Any]] = []
        boots: list[float] = []
        t1 = trio.current_time()
        last = -math.inf
        # The guests boot `parallel` at a time, each slot taking its share in
        # turn. Their completions are walked in time order and the simulation
        # sleeps only until the next one that is reported (at most one
        # progress event a second, plus each failure and the last): the same
        # timeline and events as a sleep per guest, with far fewer wake-ups
        # (a million guests are a million sleeps otherwise).
        pending: list[tuple[float, str, float]] = []       # (at, guest, seconds): done, not reported
        try:
            for at, guest, seconds in self._completions(names, booted, rng, t1):
                pending.append((at, guest, seconds))
                fails = self._fails(guest)
                if fails:
                    counts["failed"] += 1
                    failed.append({"name": guest, "reason": "simulated boot failure", "attempts": 2})
                else:
                    counts["ready"] += 1
                    boots.append(seconds)
                done_n = counts["ready"] + counts["failed"]
                if at - last > 1.0 or done_n == len(names) or fails:
                    await trio.sleep_until(at)
                    for _, g, sec in pending:
                        booted.setdefault(g, (self._fails(g), sec))
                    pending.clear()
                    last = at
                    await ctx.emit({"phase": "vm", "done": done_n, "total": len(names), **counts})
        finally:
            # Cut short (the agent died): the guests already up stay booted.
            now = trio.current_time()
            for at, g, sec in pending:
                if at <= now:
                    booted.setdefault(g, (self._fails(g), sec))
        vm_s = trio.current_time() - t1
        boots.sort()
        result = {"host": host, "testbed": testbed, "simulated": True,
                  "phases": {"net": round(net_s, 3), "ksm": 0.0, "vm": round(vm_s, 3), "collect": 0.0},
                  "seconds": round(trio.current_time() - t0, 3), "net": {"simulated": True},
                  "namespaces": len(payload["net"].get("netns", {})), "guests": len(names),
                  "ready": counts["ready"], "failed": failed,
                  "boot_p50_s": round(boots[len(boots) // 2], 3) if boots else None,
                  "boot_p95_s": round(boots[int(len(boots) * 0.95)], 3) if boots else None}
        await ctx.emit({"phase": "done", "ready": result["ready"], "failed": len(failed)})
        state.testbeds[testbed] = result
        return result

    def _completions(self, names: list[str], booted: dict[str, tuple[bool, float]], rng: random.Random,
                     t0: float) -> Iterator[tuple[float, str, float]]:
        """(time, guest, boot seconds) of each guest's end of boot, in time
        order: `parallel` slots, slot i booting names[i::parallel] one after
        the other; a guest already booted (an apply re-sent after a
        re-attachment) takes no time. Boot times are drawn from `rng` in the
        order the slots start their guests."""
        slots = [names[i::self.model.parallel] for i in range(min(self.model.parallel, len(names)))]
        heap: list[tuple[float, int, int]] = []        # (ends at, slot, index in slot)

        def start(i: int, k: int, at: float) -> None:
            guest = slots[i][k]
            seconds = booted[guest][1] if guest in booted else self.model.boot_s(rng)
            heapq.heappush(heap, (at + (0.0 if guest in booted else seconds), i, k))
            durations[(i, k)] = seconds

        durations: dict[tuple[int, int], float] = {}
        for i in range(len(slots)):
            start(i, 0, t0)
        while heap:
            at, i, k = heapq.heappop(heap)
            yield at, slots[i][k], durations.pop((i, k))
            if k + 1 < len(slots[i]):
                start(i, k + 1, at)

    async def sim_down(self, payload: Any, ctx: handlers.Context) -> dict[str, Any]:
        state = self.state.setdefault(ctx.host, _HostState())
        wanted = (payload or {}).get("testbed")
        names = [t for t in state.testbeds if wanted is None or t == wanted]
        t0 = trio.current_time()
        out = {}
        for t in names:
            guests = state.testbeds[t]["guests"]
            await ctx.emit({"phase": "down", "testbed": t, "state": "start"})
            await trio.sleep(self.model.down_s_per_guest * guests)
            out[t] = {"namespaces": state.testbeds[t]["namespaces"], "links": 0, "processes": guests}
            del state.testbeds[t]
            state.booted.pop(t, None)
        seconds = trio.current_time() - t0
        await ctx.emit({"phase": "down", "state": "done", "seconds": round(seconds, 3)})
        return {"testbeds": out, "seconds": round(seconds, 3), "simulated": True}

    async def sim_status(self, payload: Any, ctx: handlers.Context) -> dict[str, Any]:
        state = self.state.setdefault(ctx.host, _HostState())
        wanted = (payload or {}).get("testbed")
        beds = []
        for t, r in state.testbeds.items():
            if wanted is not None and t != wanted:
                continue
            beds.append({"testbed": t, "complete": True,
                         "nodes": {"running": r["ready"], "failed": len(r["failed"])},
                         "failures": [{"node": f["name"], "state": "failed", "reason": f["reason"]}
                                      for f in r["failed"]],
                         "telemetry": {"collector": "simulated"}})
        return {"testbeds": beds, "ksm": {"daemon": "simulated", "saved_mb": 0}, "simulated": True}
