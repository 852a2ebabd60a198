"""The bulk boot and teardown engine of one host.

`Engine.apply` boots many guests: it validates every spec (the guest config of
those it boots: a running guest keeps its own), checks the memory
budget, records every guest and everything it will create, then starts guests
under admission control (a bounded, load-adapted number booting at once, per
driver kind), waits for each guest's ready line with a per-attempt timeout,
retries a bounded number of times, and records every failure with its reason and
console tail. A bulk boot and a teardown are announced to the host's KSM daemon,
when one runs. `Engine.teardown` removes guests and everything recorded for them
in parallel; `Engine.list` reconciles the record with /proc.
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import trio

from megafleet.imagegen.contract import BadLine, ReadyLine, parse_line
from megafleet.ledger import Ledger
from megafleet.vm import admission, guestdirs
from megafleet.vm.driver import (DRIVER_KINDS, Driver, StartFailed, become_subreaper, driver_kind,
                                 process_from_pidfile)
from megafleet.vm.spec import (BootReport, GuestResult, GuestSpec, Progress, SpecError,
                                   validate_all, validate_config)
from megafleet.vm.guestdirs import guests_dir
from megafleet.vm.state import OWNER, GuestRecord, GuestStatus, VmState

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 1
CONSOLE_TAIL_LINES = 40
CONSOLE_TAIL_CHARS = 4000


def make_driver(name: str) -> Driver:
    """A new Driver of `name` (from the registry, megafleet.vm.driver.DRIVER_KINDS)."""
    try:
        return driver_kind(name).make()
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def console_tail(path: Path | str | None, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last lines of a console log (bounded), for failure reports."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "")
    tail = "\n".join(text.rstrip("\n").splitlines()[-lines:])[-CONSOLE_TAIL_CHARS:]
    # A panic's call trace pushes the one line that says why out of the window:
    # keep that line at the top.
    panic = kernel_panic(text)
    if panic and panic not in tail:
        tail = f"{panic}\n...\n{tail}"
    return tail


def kernel_panic(text: str) -> str | None:
    """The guest kernel's "Kernel panic - not syncing: ..." message, if any."""
    start = text.find("Kernel panic - not syncing:")
    if start < 0:
        return None
    end = text.find("\n", start)
    return text[start:end if end >= 0 else None].strip()


def find_ready(path: Path | str) -> ReadyLine | None:
    """The ready line in a console log, if the guest printed one."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        try:
            parsed = parse_line(line)
        except BadLine:
            continue
        if isinstance(parsed, ReadyLine):
            return parsed
    return None


class ConsoleWatcher:
    """Reads a console log incrementally and reports the ready line."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""

    def poll(self) -> ReadyLine | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return None
        if not data:
            return None
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            try:
                parsed = parse_line(raw.decode(errors="replace"))
            except BadLine:
                continue
            if isinstance(parsed, ReadyLine):
                return parsed
        return None


class ConsoleChanges:
    """Wakes the waits for ready lines when a guest's console file changes.

    One inotify instance per engine run, one watch per booting guest's
    directory (IN_MODIFY and IN_CREATE of its `console.log`: the file may not
    exist yet when the wait starts). A container prints its ready line some
    tens of milliseconds after it starts; polling with a backoff saw it up to
    a few hundred milliseconds later, most of adding ten guests to a running
    testbed. Where inotify is not available (`enabled` False) the waits poll
    as before. Use: `arm(gdir)` before reading the file, then `wait`."""

    _IN_MODIFY, _IN_CREATE, _IN_NONBLOCK_CLOEXEC = 0x2, 0x100, 0o4000 | 0o2000000
    _HEADER = struct.Struct("iIII")         # struct inotify_event: wd, mask, cookie, len

    def __init__(self) -> None:
        self._libc: Any = None
        self.fd = -1
        self._events: dict[int, trio.Event] = {}    # watch descriptor -> its waiter's event
        self._wds: dict[str, int] = {}              # guest directory -> watch descriptor
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(self._IN_NONBLOCK_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self._libc, self.fd = libc, fd

    @property
    def enabled(self) -> bool:
        return self.fd >= 0

    def arm(self, gdir: Path) -> trio.Event | None:
        """A new event, set at the next change of `gdir`'s console file (None:
        no inotify here or no watch possible: poll)."""
        if not self.enabled:
            return None
        key = str(gdir)
        wd = self._wds.get(key)
        if wd is None:
            wd = self._libc.inotify_add_watch(self.fd, key.encode(), self._IN_MODIFY | self._IN_CREATE)
            if wd < 0:              # e.g. fs.inotify.max_user_watches reached
                return None
            self._wds[key] = wd
        event = self._events[wd] = trio.Event()
        return event

    def disarm(self, gdir: Path) -> None:
        wd = self._wds.pop(str(gdir), None)
        if wd is not None:
            self._events.pop(wd, None)
            self._libc.inotify_rm_watch(self.fd, wd)

    async def run(self) -> None:
        """Read change events and set the events of their waits, until cancelled."""
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                continue
            offset = 0
            while offset + self._HEADER.size <= len(data):
                wd, _mask, _cookie, length = self._HEADER.unpack_from(data, offset)
                name = data[offset + self._HEADER.size:offset + self._HEADER.size + length].rstrip(b"\0")
                offset += self._HEADER.size + length
                event = self._events.get(wd)
                if event is not None and name == b"console.log":
                    event.set()

    def close(self) -> None:
        if self.enabled:
            os.close(self.fd)
            self.fd = -1
            self._events.clear()
            self._wds.clear()


@dataclass
class GuestView:
    """One guest as `vm ls` shows it: the record reconciled with /proc."""

    name: str
    driver: str
    image: str
    state: str
    pid: int | None
    rss_bytes: int | None
    boot_s: float | None
    attempts: int
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Engine:
    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 max_parallel: int | None = None, mem_budget_mb: int | None = None,
                 ksm_sharing: float = 0.0, budget_option: str | None = None,
                 state: VmState | None = None, ledger: Ledger | None = None):
        """`mem_budget_mb`: host MiB the guests may take (default
        $MEGAFLEET_VM_MEM_BUDGET, else 90 % of RAM); `ksm_sharing`: the share of
        guest RAM KSM is expected to merge, as placement counted it;
        `budget_option`: how the calling command sets the budget (for errors)."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_parallel = max_parallel
        env_budget = os.environ.get("MEGAFLEET_VM_MEM_BUDGET")
        self.mem_budget_mb = mem_budget_mb or (int(env_budget) if env_budget else None)
        self.ksm_sharing = ksm_sharing
        self.budget_option = budget_option
        self.state = state or VmState()
        self.ledger = ledger or Ledger()
        self._drivers: dict[str, Driver] = {}
        self._db_limiter = trio.CapacityLimiter(1)

    def driver(self, name: str) -> Driver:
        if name not in self._drivers:
            self._drivers[name] = make_driver(name)
        return self._drivers[name]

    def _recorded_driver(self, name: str) -> Driver:
        """The driver of a guest already recorded: its own, or, for a name this
        megafleet does not know (a record of another version), the base Driver,
        which checks and ends the recorded process."""
        return self.driver(name) if name in DRIVER_KINDS else Driver()

    async def _db(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db_limiter)

    # ------------------------------------------------------------------ boot

    def admit(self, specs: list[GuestSpec], running: Sequence[tuple[str, int]] = ()) -> int:
        """Memory admission of a boot of `specs` next to `running` guests
        [(driver, mem_mb)]: the MiB it needs, or BudgetError (nothing started).
        The budget is this engine's (else 90 % of RAM); each guest costs its
        driver's footprint with `ksm_sharing` of its RAM expected to merge."""
        memory = admission.read_memory()
        budget = self.mem_budget_mb or admission.default_budget_mb(memory)
        return admission.check_budget(
            [(s.name, s.driver, s.mem_mb) for s in specs], list(running), budget, memory,
            ksm_sharing=self.ksm_sharing,
            **({"budget_option": self.budget_option} if self.budget_option else {}))

    async def apply(self, specs: list[GuestSpec], *, progress: Progress | None = None) -> BootReport:
        started = time.monotonic()
        # Each spec's guest config is checked once it is known to boot (below,
        # before anything is recorded or made): a running guest keeps its own.
        specs = validate_all(list(specs), config=False)
        images = self._resolve_images(specs)
        become_subreaper()

        # Drivers that open early (Driver.open_early) do so for the guests not
        # on record: a container helper is a Python process that starts in
        # ~50 ms, which then overlaps the checks of every recorded guest below
        # (a tenth of adding ten guests to a running lan1000). A driver opened
        # here and left without guests to start is closed at the end.
        recorded = await self._db(self.state.names)
        new_by_driver: dict[str, int] = {}
        for spec in specs:
            if spec.name not in recorded and self.driver(spec.driver).open_early:
                new_by_driver[spec.driver] = new_by_driver.get(spec.driver, 0) + 1
        opened: set[str] = set()
        try:
            for name, count in new_by_driver.items():
                opened.add(name)
                await self.driver(name).open(count)
            return await self._apply(specs, images, opened, progress, started)
        finally:
            with trio.CancelScope(shield=True):
                for name in opened:         # those _apply's run_driver did not close
                    await self.driver(name).aclose()

    async def _apply(self, specs: list[GuestSpec], images: dict[str, Any], opened: set[str],
                     progress: Progress | None, started: float) -> BootReport:
        """apply, with the drivers in `opened` open already (each removed from
        it once the boots closed it)."""
        existing = {r.name: r for r in await self._db(self.state.statuses)}
        # Each recorded guest's process checked once (/proc reads: at a
        # thousand running guests, a reconciling `up` spent a tenth of its
        # time checking each of them twice), in a worker thread like the
        # records' reads, so the launchers' pipes are served meanwhile.
        alive = await trio.to_thread.run_sync(
            lambda: {r.name for r in existing.values()
                     if r.state in ("running", "starting") and self._alive(r)})
        report = BootReport()
        to_boot: list[GuestSpec] = []
        stale: list[GuestStatus] = []
        for spec in specs:
            rec = existing.get(spec.name)
            if rec is not None and rec.name in alive:
                report.results.append(GuestResult(spec.name, rec.driver, "already",
                                                  boot_s=rec.boot_s, attempts=rec.attempts))
                continue
            if rec is not None:
                stale.append(rec)
            to_boot.append(spec)

        for spec in to_boot:
            validate_config(spec)

        # Memory: what is alive now (other than the stale records) plus the new boot.
        stale_names = {r.name for r in stale}
        running = [(r.driver, r.mem_mb) for r in existing.values()
                   if r.name not in stale_names and r.name in alive]
        self.admit(to_boot, running)

        if stale:
            await self._remove(stale_names)
        if not to_boot:
            report.wall_s = time.monotonic() - started
            return report

        # Each driver's admission class, known before anything is recorded:
        # for QEMU and libvirt it is the accelerator, whose first use on a
        # boot of the host runs the KVM probe (a guest of its own, up to 12 s).
        # A boot killed during the probe then leaves only the probe's records,
        # which `down` and `vm teardown` sweep, not guests' records and the
        # guests' tmpfs mounted for nothing.
        for name in {spec.driver for spec in to_boot}:
            await trio.to_thread.run_sync(self.driver(name).admission_kind)

        # Record everything before creating anything.
        base = guests_dir()
        records_by_kind: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        rows = []
        for spec in to_boot:
            gdir = base / spec.name
            records_by_kind.setdefault("dir", []).append((str(gdir), {"guest": spec.name}))
            for kind, key, data in self.driver(spec.driver).records(spec.name, gdir):
                records_by_kind.setdefault(kind, []).append((key, data))
            rows.append(GuestRecord(name=spec.name, driver=spec.driver, image=spec.image,
                                    spec=spec.to_dict(), state="starting",
                                    handle={"gdir": str(gdir), "pidfile": str(gdir / "pid"),
                                            "image_hash": images[spec.image].hash}))
        await self._db(self._record_guests, records_by_kind, rows)

        await _tell_ksm("boot", len(to_boot))
        total = len(to_boot) + len(report.results)
        done = [len(report.results)]
        by_driver: dict[str, list[GuestSpec]] = {}
        for spec in to_boot:
            by_driver.setdefault(spec.driver, []).append(spec)

        async def run_driver(name: str, group: list[GuestSpec]) -> None:
            driver = self.driver(name)
            if name not in opened:
                await driver.open(len(group))
            opened.discard(name)
            try:
                limiter = trio.CapacityLimiter(1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._adapt, limiter, driver.admission_kind())
                    async with trio.open_nursery() as boots:
                        for spec in group:
                            boots.start_soon(boot_and_report, driver, limiter, spec)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await driver.aclose()

        changes = ConsoleChanges()

        async def boot_and_report(driver: Driver, limiter: trio.CapacityLimiter, spec: GuestSpec) -> None:
            result = await self._boot_one(driver, limiter, spec, images[spec.image], base / spec.name, changes)
            report.results.append(result)
            done[0] += 1
            if progress is not None:
                progress(done[0], total, result)

        try:
            async with trio.open_nursery() as nursery:
                if changes.enabled:
                    nursery.start_soon(changes.run)
                async with trio.open_nursery() as drivers:
                    for name, group in by_driver.items():
                        drivers.start_soon(run_driver, name, group)
                nursery.cancel_scope.cancel()
        finally:
            changes.close()
        order = {s.name: i for i, s in enumerate(specs)}
        report.results.sort(key=lambda r: order[r.name])
        report.wall_s = time.monotonic() - started
        return report

    def _resolve_images(self, specs: list[GuestSpec]) -> dict[str, Any]:
        from megafleet.imagegen import store

        images = {}
        for spec in specs:
            if spec.image in images:
                continue
            try:
                images[spec.image] = store.find(spec.image)
            except store.ImageNotFound as exc:
                raise SpecError(f"guest {spec.name}: image: {exc}") from None
        return images

    async def _adapt(self, limiter: trio.CapacityLimiter, kind: str) -> None:
        """Follow CPU count and load: recompute the number of concurrent boots."""
        tracker = admission.LoadTracker()
        while True:
            ncpu, runnable = admission.host_runnable()
            others = tracker.update(runnable, limiter.borrowed_tokens)
            limiter.total_tokens = admission.parallel_boots(kind, ncpu, others,
                                                            maximum=self.max_parallel)
            await trio.sleep(0.5)

    async def _boot_one(self, driver: Driver, limiter: trio.CapacityLimiter, spec: GuestSpec,
                        image: Any, gdir: Path, changes: ConsoleChanges | None = None) -> GuestResult:
        result = GuestResult(spec.name, spec.driver, "failed")
        for attempt in range(1, self.retries + 2):
            result.attempts = attempt
            handle: dict[str, Any] | None = None
            reason: str | None           # why this attempt failed; None: ready
            async with limiter:
                _fresh_dir(gdir)
                t0 = time.monotonic()
                try:
                    handle = await driver.start(spec, image, gdir)
                except StartFailed as exc:
                    reason = str(exc)
                else:
                    handle["gdir"] = str(gdir)
                    handle["pidfile"] = str(gdir / "pid")
                    await self._db(self._note_started, spec.name, driver, handle, attempt)
                    reason = await self._wait_ready(driver, handle, gdir / "console.log",
                                                    t0 + self.timeout_s, changes)
                if reason is None:
                    result.outcome, result.boot_s = "ready", time.monotonic() - t0
                    result.reason = result.console_tail = None
                    await self._db(self._note_state, spec.name, dict(
                        state="running", boot_s=result.boot_s, attempts=attempt,
                        reason=None, console_tail=None))
                    return result
            result.console_tail = console_tail(gdir / "console.log")
            panic = kernel_panic(result.console_tail)
            result.reason = f"{reason} ({panic})" if panic and panic not in reason else reason
            if handle is not None:
                await driver.stop(spec.name, handle, force=True)
        await self._db(self._note_state, spec.name, dict(
            state="failed", attempts=result.attempts, reason=result.reason,
            console_tail=result.console_tail))
        return result

    def _record_guests(self, records_by_kind: dict[str, list[tuple[str, dict[str, Any]]]],
                       rows: list[GuestRecord]) -> None:
        """Record the guests and everything made for them, in the tmpfs of the
        guests' directories where there is to be one (guestdirs: mounted, if
        not yet, under the host lock, so no teardown unmounts it before these
        guests are on record)."""
        with guestdirs.host_lock():
            guestdirs.ensure_tmpfs(self.ledger)
            for kind, items in records_by_kind.items():
                self.ledger.record_many(OWNER, kind, items)
            self.state.put_many(rows)

    def _release_guests_dir(self) -> None:
        """Unmount the guests' tmpfs once no guest is on record (guestdirs)."""
        with guestdirs.host_lock():
            if self.state.count() == 0:
                guestdirs.release_tmpfs(self.ledger)

    def _note_started(self, name: str, driver: Driver, handle: dict[str, Any], attempt: int) -> None:
        if driver.owns_process:
            self.ledger.record(OWNER, "process", name, guest=name, driver=driver.name,
                               pidfile=handle["pidfile"], pid=handle.get("pid"),
                               pid_start=handle.get("pid_start"))
        self.state.update(name, pid=handle.get("pid"), pid_start=handle.get("pid_start"),
                          handle=handle, attempts=attempt)

    def _note_state(self, name: str, fields: dict[str, Any]) -> None:
        self.state.update(name, **fields)

    async def _wait_ready(self, driver: Driver, handle: dict[str, Any], console: Path,
                          deadline: float, changes: ConsoleChanges | None = None) -> str | None:
        """None when the ready line appears; else why not (exit or timeout).
        The console is read again when it changes (`changes`), and at least
        on a backoff from 20 ms to 250 ms, which also checks the process."""
        watcher = ConsoleWatcher(console)
        delay = 0.02
        try:
            while True:
                changed = changes.arm(console.parent) if changes is not None else None
                if watcher.poll() is not None:
                    return None
                if not driver.alive(handle):
                    if watcher.poll() is not None:
                        return None
                    return f"exited before the ready line ({driver.exit_reason(handle)})"
                if time.monotonic() > deadline:
                    return f"no ready line within {self.timeout_s:g} s"
                if changed is None:
                    await trio.sleep(delay)
                else:
                    with trio.move_on_after(delay):
                        await changed.wait()
                        # A QEMU console changes a byte at a time: read it at
                        # most every 10 ms.
                        await trio.sleep(0.01)
                delay = min(delay * 1.5, 0.25)
        finally:
            if changes is not None:
                changes.disarm(console.parent)

    # ------------------------------------------------------------- teardown

    def _handle(self, rec: GuestRecord | GuestStatus) -> dict[str, Any]:
        """The guest's handle with the pid the engine saw (when it saw one)."""
        handle = dict(rec.handle)
        if rec.pid and rec.pid_start is not None:
            handle.update(pid=rec.pid, pid_start=rec.pid_start)
        return handle

    def _alive(self, rec: GuestRecord | GuestStatus) -> bool:
        return self._recorded_driver(rec.driver).alive(self._handle(rec))

    async def stop(self, pattern: str = "*", *, force: bool = False) -> list[str]:
        """Stop matching guests (QMP quit / SIGTERM, or SIGKILL with force); their
        records stay (state 'stopped') until teardown."""
        records = [r for r in self.state.list(pattern) if r.state in ("running", "starting")]

        async def one(rec: GuestRecord) -> None:
            await self._stop_record(rec, force=force)
            await self._db(self._note_state, rec.name, dict(state="stopped"))

        async with trio.open_nursery() as nursery:
            for rec in records:
                nursery.start_soon(one, rec)
        return [r.name for r in records]

    async def _stop_record(self, rec: GuestRecord, *, force: bool) -> None:
        await self._recorded_driver(rec.driver).stop(rec.name, self._handle(rec), force=force)

    async def teardown(self, pattern: str = "*") -> list[str]:
        """Remove every matching guest and everything recorded for it."""
        names = {r.name for r in self.state.list(pattern)}
        for res in self.ledger.list(owner=OWNER):
            guest = res.data.get("guest")
            if guest and fnmatch.fnmatchcase(guest, pattern):
                names.add(guest)
        await self._remove(names)
        if names:
            await _tell_ksm("teardown", len(names))
        return sorted(names)

    async def _remove(self, names: set[str]) -> None:
        """Stop and remove the named guests and everything recorded for them;
        then, with no guest left on record, the guests' tmpfs (guestdirs)."""
        if names:
            await self._remove_guests(names)
        await self._db(self._release_guests_dir)

    async def _remove_guests(self, names: set[str]) -> None:
        resources = [r for r in self.ledger.list(owner=OWNER) if r.data.get("guest") in names]
        dirs = [r for r in resources if r.kind == "dir"]
        # Every other record is a driver's (`Driver.records`): each driver ends
        # its own guests, all drivers at once. A record names its driver; one
        # made before records did is the guest's driver in the state.
        state_driver = {r.name: r.driver for r in self.state.list() if r.name in names}
        by_driver: dict[str, list[dict[str, Any]]] = {}
        by_kind: dict[str, list[str]] = {}
        for r in resources:
            if r.kind == "dir":
                continue
            by_kind.setdefault(r.kind, []).append(r.key)
            name = r.data.get("driver") or state_driver.get(r.data.get("guest", ""))
            if name:
                by_driver.setdefault(name, []).append({**r.data, "key": r.key})
        async with trio.open_nursery() as nursery:
            for name, records in by_driver.items():
                nursery.start_soon(self._recorded_driver(name).remove, records)
        for kind, keys in by_kind.items():
            await self._db(self.ledger.forget_many, OWNER, kind, keys)
        await trio.to_thread.run_sync(_remove_dirs, [r.key for r in dirs])
        await self._db(self.ledger.forget_many, OWNER, "dir", [r.key for r in dirs])
        await self._db(self.state.delete_many, sorted(names))

    # ------------------------------------------------------------------- ls

    def list(self, pattern: str = "*") -> list[GuestView]:
        """Every matching guest, its state checked against /proc (and libvirt)."""
        views = []
        for rec in self.state.list(pattern, specs=False):
            alive = self._alive(rec)
            state = rec.state
            pid = rec.pid
            if not alive and state in ("running", "starting"):
                state = "exited"
            elif alive and state == "starting":
                # The engine may have died before it saw the ready line.
                console = Path(rec.handle.get("gdir", "")) / "console.log"
                state = "running" if find_ready(console) else "starting"
            elif alive and state in ("failed", "stopped"):
                state = "running?"  # should not happen; show it rather than hide it
            if pid is None and alive and rec.handle.get("pidfile"):
                proc = process_from_pidfile(Path(rec.handle["pidfile"]))
                pid = proc.pid if proc else None
            rss = None
            if alive:
                drv = self._recorded_driver(rec.driver)
                rss = drv.rss_bytes({**rec.handle, "pid": pid, "pid_start": rec.pid_start})
            views.append(GuestView(rec.name, rec.driver, rec.image, state,
                                   pid if alive else None, rss, rec.boot_s, rec.attempts,
                                   rec.reason))
        return views


async def _tell_ksm(kind: str, count: int) -> None:
    """Tell this host's KSM daemon of a bulk boot or teardown, so that it scans
    hard while the new guests fill their memory (or rescans once they are gone).
    Best effort: with no daemon listening, or a daemon that does not answer,
    the guests boot all the same."""
    from megafleet.ksm import socket_path

    if not socket_path().exists():     # no daemon: nothing to import and connect to
        return
    from megafleet.ksm.daemon import send_event
    from megafleet.ksm.sysfs import KsmError

    try:
        await trio.to_thread.run_sync(send_event, kind, count)
    except (KsmError, OSError):
        pass


def _fresh_dir(gdir: Path) -> None:
    """An empty guest directory for a (new) attempt."""
    if gdir.exists():
        shutil.rmtree(gdir)
    gdir.mkdir(parents=True)


def _remove_dirs(dirs: list[str]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
