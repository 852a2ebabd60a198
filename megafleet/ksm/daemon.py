"""The per-host KSM daemon: observe, decide (policy.decide), apply, emit samples.

APIs for the other packages:

* `samples(interval)` — async generator of sample dicts (KSM counters, saved
  MB, sharing ratio, ksmd CPU), read only; what the collect package samples.
* `Daemon(...).run()` — the tuning loop; `on_sample` receives each sample
  (with the policy's mode and reason added); `announce_boot(n)` and
  `announce_teardown(n)` feed events in from the same process.
* `send_event("boot", n)` — the same events from another process (the vm
  engine), over the daemon's unix socket `$MEGAFLEET_RUN/ksm.sock`. Returns
  False, without error, when no daemon runs: KSM tuning is best effort.

Every knob change goes through `KnobKeeper`, so the host's original values are
recorded before the first change and restored when the daemon stops, also on
SIGTERM, and by the next daemon after a crash (`megafleet ksm restore`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import trio

from megafleet import paths
from megafleet.ksm import policy, socket_path
from megafleet.ksm.keeper import KnobKeeper
from megafleet.ksm.sysfs import PAGE_SIZE, KsmError, KsmSysfs, Snapshot, guest_rss_kb, meminfo

EVENT_KINDS = ("boot", "teardown")
# Every knob policy.decide may set.
POLICY_KNOBS = ("run", "pages_to_scan", "sleep_millisecs", "advisor_mode",
                "advisor_target_scan_time", "advisor_max_cpu")
_limiter = trio.CapacityLimiter(2)


def lock_path() -> Path:
    return paths.run_dir() / "ksm.lock"


def sample_of(snap: Snapshot, mem: dict[str, int], previous: dict[str, Any] | None) -> dict[str, Any]:
    """A telemetry sample: flat figures first, then the raw counters and knobs."""
    now = time.monotonic()
    cpu_pct = None
    if previous and snap.ksmd_cpu_s is not None and previous.get("ksmd_cpu_s") is not None:
        elapsed = now - previous["t"]
        if elapsed > 0:
            cpu_pct = 100 * (snap.ksmd_cpu_s - previous["ksmd_cpu_s"]) / elapsed
    profit = snap.counters.get("general_profit")
    return {
        "time": time.time(),
        "t": now,
        "saved_mb": round(snap.saved_mb, 3),
        "saved_bytes": snap.saved_bytes,
        "general_profit_mb": round(profit / 2**20, 3) if isinstance(profit, int) else None,
        "sharing_ratio": snap.sharing_ratio,
        "ksmd_cpu_s": snap.ksmd_cpu_s,
        "ksmd_cpu_pct": cpu_pct,
        "mem_total_kb": mem.get("MemTotal", 0),
        "mem_available_kb": mem.get("MemAvailable", 0),
        "anon_kb": mem.get("AnonPages", 0),
        "guest_kb": mem.get("guest_kb", 0),
        "page_size": PAGE_SIZE,
        "counters": dict(snap.counters),
        "knobs": dict(snap.knobs),
    }


def _read(sysfs: KsmSysfs) -> tuple[Snapshot, dict[str, int]]:
    """One blocking reading: KSM sysfs, /proc/meminfo, and the QEMU guests'
    resident memory (under the key guest_kb)."""
    return sysfs.read(), {**meminfo(sysfs.proc), "guest_kb": guest_rss_kb(sysfs.proc)}


async def samples(interval: float = 1.0, sysfs: KsmSysfs | None = None) -> AsyncIterator[dict[str, Any]]:
    """Yield one sample every `interval` seconds, forever (read only)."""
    sysfs = sysfs or KsmSysfs()
    previous = None
    while True:
        snap, mem = await trio.to_thread.run_sync(_read, sysfs, limiter=_limiter)
        previous = sample_of(snap, mem, previous)
        yield previous
        await trio.sleep(interval)


def observation(sample: dict[str, Any], events: tuple[tuple[str, int], ...]) -> policy.Observation:
    counters = {k: v for k, v in sample["counters"].items() if isinstance(v, int)}
    return policy.Observation(
        t=sample["t"], counters=counters, ksmd_cpu_s=sample["ksmd_cpu_s"],
        mem_total_kb=sample["mem_total_kb"], mem_available_kb=sample["mem_available_kb"],
        anon_kb=sample["anon_kb"], guest_kb=sample["guest_kb"], advisor="advisor_mode" in sample["knobs"], events=events)


class AlreadyRunning(KsmError):
    pass


class Daemon:
    def __init__(self, sysfs: KsmSysfs | None = None, keeper: KnobKeeper | None = None,
                 config: policy.Config = policy.Config(),
                 on_sample: Callable[[dict[str, Any]], None] | None = None,
                 record: Path | None = None, listen: bool = True):
        self.sysfs = sysfs or KsmSysfs()
        self.keeper = keeper or KnobKeeper(self.sysfs)
        self.config = config
        self.on_sample = on_sample
        self.record = Path(record) if record else None
        self.listen = listen
        self._events: deque[tuple[str, int]] = deque()
        self._events_lock = threading.Lock()
        self.state = policy.State()
        self.last_sample: dict[str, Any] | None = None

    # --- events ------------------------------------------------------------------

    def announce(self, kind: str, count: int) -> None:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown KSM event {kind!r}: expected one of {', '.join(EVENT_KINDS)}")
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"{kind} event: count must be a non-negative integer, got {count!r}")
        with self._events_lock:
            self._events.append((kind, count))

    def announce_boot(self, count: int) -> None:
        """A bulk boot of `count` guests is starting: merge them fast."""
        self.announce("boot", count)

    def announce_teardown(self, count: int) -> None:
        """`count` guests were torn down."""
        self.announce("teardown", count)

    def _take_events(self) -> tuple[tuple[str, int], ...]:
        with self._events_lock:
            events = tuple(self._events)
            self._events.clear()
        return events

    async def _serve_events(self, sock_path: Path, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path.unlink(missing_ok=True)  # a stale socket of a crashed daemon (we hold the lock)
        await listener.bind(str(sock_path))
        os.chmod(sock_path, 0o600)
        listener.listen(16)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._handle, trio.SocketStream(conn))
        finally:
            listener.close()
            sock_path.unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            with trio.move_on_after(5):
                while b"\n" not in data and len(data) < 256:
                    chunk = await stream.receive_some(256)
                    if not chunk:
                        break
                    data += chunk
            parts = data.decode(errors="replace").split()
            try:
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError(f"expected 'KIND COUNT', got {data[:80]!r}")
                self.announce(parts[0], int(parts[1]))
                reply = b"ok\n"
            except ValueError as e:
                reply = f"error {e}\n".encode()
            try:
                await stream.send_all(reply)
            except trio.BrokenResourceError:
                pass

    # --- the loop ------------------------------------------------------------------

    def _apply(self, knobs: dict[str, Any]) -> dict[str, str]:
        return self.keeper.apply(knobs)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; knobs are restored however it ends."""
        self.sysfs.require()
        # Refuse at once, before anything runs, if the knobs the policy sets
        # cannot be written (no root, read-only sysfs).
        self.sysfs.check_can_write([k for k in POLICY_KNOBS if (self.sysfs.root / k).exists()])
        lock = _take_lock()
        try:
            async with trio.open_nursery() as nursery:
                if self.listen:
                    await nursery.start(self._serve_events, socket_path())
                try:
                    await self._loop(task_status)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.keeper.restore, limiter=_limiter)
                finally:
                    _release_lock(lock)

    async def _loop(self, task_status) -> None:
        out = open(self.record, "a") if self.record else None
        started = False
        try:
            while True:
                snap, mem = await trio.to_thread.run_sync(_read, self.sysfs, limiter=_limiter)
                sample = sample_of(snap, mem, self.last_sample)
                obs = observation(sample, self._take_events())
                self.state, decision = policy.decide(self.state, obs, self.config)
                changed = await trio.to_thread.run_sync(self._apply, decision.knobs,
                                                        limiter=_limiter)
                sample.update(mode=decision.mode, reason=decision.reason,
                              pay_mb_per_cpu_s=decision.pay_mb_per_cpu_s, changed=changed)
                self.last_sample = sample
                if out:
                    out.write(json.dumps({"obs": obs.to_json(), "decision": decision.to_json(),
                                          "changed": changed}) + "\n")
                    out.flush()
                if self.on_sample:
                    self.on_sample(sample)
                if not started:
                    task_status.started(self)
                    started = True
                await trio.sleep(self.config.sample_interval_s)
        finally:
            if out:
                out.close()


def _take_lock():
    """One daemon per host: two would fight over the knobs."""
    f = open(lock_path(), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise AlreadyRunning(f"{lock_path()}: another megafleet ksm daemon runs on this host")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _release_lock(f) -> None:
    Path(f.name).unlink(missing_ok=True)
    f.close()


def send_event(kind: str, count: int, path: Path | None = None, timeout: float = 2.0) -> bool:
    """Tell the host's KSM daemon about a bulk boot or teardown (blocking, short).
    True if the daemon accepted it, False if no daemon listens."""
    if kind not in EVENT_KINDS or not isinstance(count, int) or count < 0:
        raise ValueError(f"bad KSM event {kind!r} {count!r}")
    path = path or socket_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        s.sendall(f"{kind} {count}\n".encode())
        reply = s.recv(256).decode(errors="replace").strip()
    if reply != "ok":
        raise KsmError(f"{path}: daemon refused the event: {reply}")
    return True
