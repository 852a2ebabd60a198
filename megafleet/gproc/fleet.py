"""The controller side: build the agent tree once, then drive it.

    from megafleet.gproc import Fleet, inventory

    inv = inventory.load("hosts.toml")
    async with Fleet.connect(inv, fanout=8) as fleet:        # one tree per session
        report = await fleet.exec(["uname", "-r"])            # argv, no shell
        for hosts, text in report.gathered(): ...             # like clush -b
        await fleet.push("image.cpio.zst", "/var/cache/mf/image.cpio.zst")
        await fleet.call("host.apply", per_host=manifests, modules=["megafleet.host"])

Every operation returns a `Report` with exactly one `HostResult` per selected host:
status "ok", "failed" (with `error`) or "unreachable" (with `error`). An operation
never waits longer than its timeout; hosts without a result by then are failed
("timed out").
"""

from __future__ import annotations

import hashlib
import itertools
import os
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import trio

from megafleet.gproc import tree
from megafleet.gproc.inventory import Inventory
from megafleet.gproc.node import CHUNK, Node

OutputCallback = Callable[[str, int, bytes], Any]     # host, fd (1/2), data
EventCallback = Callable[[str, Any], Any]             # host, handler's progress data


@dataclass
class HostResult:
    host: str
    status: str                      # ok | failed | unreachable
    error: str | None = None
    rc: int | None = None            # exec: the exit code
    stdout: bytes = b""
    stderr: bytes = b""
    value: Any = None                # call: the handler's return value
    skipped: bool = False            # push: the content was already there
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stdout"] = self.stdout.decode(errors="replace")
        d["stderr"] = self.stderr.decode(errors="replace")
        return d


@dataclass
class Report:
    op: str
    results: dict[str, HostResult]
    seconds: float

    def hosts(self, status: str) -> list[str]:
        return [h for h, r in self.results.items() if r.status == status]

    @property
    def ok(self) -> bool:
        return all(r.status == "ok" for r in self.results.values())

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "failed": 0, "unreachable": 0}
        for r in self.results.values():
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def gathered(self) -> list[tuple[list[str], str]]:
        """Identical outputs folded together, as `clush -b` does: a list of
        (host names, text) with stdout then stderr; hosts that were not reached
        or failed without output show their error instead."""
        groups: dict[str, list[str]] = {}
        for host, r in self.results.items():
            text = (r.stdout + r.stderr).decode(errors="replace")
            if not text and r.status != "ok":
                text = f"[{r.status}] {r.error}\n"
            groups.setdefault(text, []).append(host)
        return sorted(((hosts, text) for text, hosts in groups.items()), key=lambda g: (-len(g[0]), g[0]))

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "seconds": round(self.seconds, 3), "counts": self.counts(),
                "hosts": {h: r.to_json() for h, r in self.results.items()}}


@dataclass
class HostState:
    state: str                       # up | unreachable | lost
    error: str | None = None


@dataclass
class _Pending:
    targets: set[str]
    results: dict[str, HostResult] = field(default_factory=dict)
    out: dict[str, list[bytearray]] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    on_output: OutputCallback | None = None
    on_event: EventCallback | None = None


class FleetError(RuntimeError):
    pass


class Fleet:
    def __init__(self, inventory: Inventory, hosts: list[str], fanout: int):
        self.inventory = inventory
        self.hosts = hosts
        self.fanout = fanout
        self.layout: list[tree.Subtree] = []
        self.status: dict[str, HostState] = {}
        self.reattachments: list[dict[str, Any]] = []
        self.setup_seconds = 0.0
        self.node: Node | None = None
        self._ops: dict[str, _Pending] = {}
        self._ids = itertools.count(1)

    @classmethod
    @asynccontextmanager
    async def connect(cls, inventory: Inventory, *, hosts: list[str] | None = None,
                      labels: list[str] | None = None, fanout: int = 8,
                      root_fanout: int | None = None,
                      connect_timeout: float = 15.0, transport: Any = None,
                      lookup: Any = None) -> AsyncIterator["Fleet"]:
        """Build the agent tree over the selected hosts (all by default) and keep it
        for the block. Unreachable hosts do not fail the connection: they are in
        `fleet.status` and answer every operation with "unreachable".
        `root_fanout` (default: fanout) is how many sessions the controller itself
        opens (see `tree`). `transport` replaces SSH: a function
        (identity, known_hosts, connect_timeout) -> async context manager of an
        object with `async connect(host spec) -> byte stream` (the simulator,
        `gproc.sim`, passes its in-memory links); `lookup` replaces the handler
        registry for the controller's own node."""
        if transport is None:
            from megafleet.gproc.transport import open_transport as transport

        selected = inventory.select(hosts, labels)
        fleet = cls(inventory, [h.name for h in selected], fanout)
        fleet.layout = tree.layout([h.spec() for h in selected], fanout, root_fanout)
        async with transport(inventory.identity, inventory.known_hosts, connect_timeout) as links:
            async with trio.open_nursery() as nursery:
                node = Node(None, fleet._on_message, links.connect, connect_timeout=connect_timeout,
                            creds={"identity": inventory.identity, "known_hosts": inventory.known_hosts},
                            lookup=lookup)
                node.nursery = nursery
                fleet.node = node
                try:
                    start = trio.current_time()
                    up, down, _ = await node.attach(fleet.layout)
                    fleet.setup_seconds = trio.current_time() - start
                    fleet.status = {name: HostState("up") for name in up}
                    fleet.status.update({name: HostState("unreachable", why) for name, why in down.items()})
                    yield fleet
                finally:
                    await node.close()
                    nursery.cancel_scope.cancel()

    # --- messages from the tree ------------------------------------------------

    async def _on_message(self, header: dict[str, Any], payload: bytes) -> None:
        kind = header["t"]
        if kind == "reattach":
            self.reattachments.append(header)
            self.status[header["lost"]] = HostState("lost", header.get("why"))
            for name in header["up"]:
                self.status[name] = HostState("up")
            for name, why in header["down"].items():
                self.status[name] = HostState("unreachable", why)
            return
        pending = self._ops.get(header["id"])
        if pending is None:
            return
        if kind == "evs":
            if pending.on_event is not None:
                for host, data in header.get("events", []):
                    pending.on_event(host, data)
            return
        host = header["host"]
        if kind == "out":
            fd = 1 if header.get("fd") == 1 else 2
            pending.out.setdefault(host, [bytearray(), bytearray()])[fd - 1] += payload
            if pending.on_output is not None:
                pending.on_output(host, fd, payload)
        elif kind == "ev":
            if pending.on_event is not None:
                pending.on_event(host, header.get("data"))
        elif kind == "res":
            out = pending.out.pop(host, [b"", b""])
            pending.results[host] = HostResult(
                host, header["status"], header.get("error"), header.get("rc"), bytes(out[0]), bytes(out[1]),
                header.get("value"), bool(header.get("skipped")), header.get("seconds"))
            if pending.targets <= pending.results.keys():
                pending.done.set()

    # --- operations ------------------------------------------------------------

    def _targets(self, hosts: list[str] | None) -> list[str]:
        if hosts is None:
            return list(self.hosts)
        unknown = [h for h in hosts if h not in self.status and h not in self.hosts]
        if unknown:
            raise FleetError(f"not in this fleet: {', '.join(unknown)}")
        return list(hosts)

    async def _run(self, op: str, fields: dict[str, Any], targets: list[str], timeout: float, *,
                   source: str | None = None,
                   feed: Callable[[str], Awaitable[None]] | None = None,
                   on_output: OutputCallback | None = None,
                   on_event: EventCallback | None = None) -> Report:
        assert self.node is not None
        op_id = str(next(self._ids))
        pending = _Pending(set(targets), on_output=on_output, on_event=on_event)
        self._ops[op_id] = pending
        start = trio.current_time()
        finished = False
        try:
            with trio.move_on_after(timeout):
                if targets:
                    await self.node.start_op({"t": "req", "id": op_id, "op": op,
                                              "targets": sorted(targets), **fields}, source=source)
                    if feed is not None:
                        await feed(op_id)
                    await pending.done.wait()
            finished = True
        finally:
            self._ops.pop(op_id, None)
            if not pending.done.is_set():
                # Timed out, or we are being cancelled (Ctrl-C): stop it everywhere.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.node.cancel(op_id)
        if finished:
            for host in targets:
                if host not in pending.results:
                    pending.results[host] = HostResult(host, "failed", f"timed out after {timeout:g} s")
        ordered = {h: pending.results[h] for h in targets}
        return Report(op, ordered, trio.current_time() - start)

    async def exec(self, argv: list[str] | str, *, hosts: list[str] | None = None, shell: bool = False,
                   timeout: float = 60.0, on_output: OutputCallback | None = None) -> Report:
        """Run argv on the hosts (no shell; with shell=True, argv is one string for
        /bin/sh -c). Output is streamed to on_output(host, fd, data) as it comes."""
        if shell:
            if not isinstance(argv, str):
                raise FleetError("exec with shell=True takes the command as one string")
            argv = ["/bin/sh", "-c", argv]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise FleetError(f"exec needs a non-empty list of strings, got {argv!r}")
        return await self._run("exec", {"argv": argv, "timeout": timeout}, self._targets(hosts),
                               timeout + 5, on_output=on_output)

    async def call(self, handler: str, payload: Any = None, *, per_host: dict[str, Any] | None = None,
                   modules: Sequence[str] = (), hosts: list[str] | None = None, timeout: float = 300.0,
                   on_event: EventCallback | None = None, encoded: bool = False) -> Report:
        """Run the registered handler on each host with `payload` (or its own entry
        of `per_host`); handlers' progress comes to on_event(host, data).
        `encoded`: the per_host values are JSON texts, decoded only on their own
        host: relays pass them on as strings (a fraction of the memory and
        parsing of nested objects, at every level of the tree)."""
        fields: dict[str, Any] = {"handler": handler, "modules": list(modules), "timeout": timeout}
        if encoded:
            fields["encoded"] = True
        targets = self._targets(hosts if hosts is not None or per_host is None else list(per_host))
        if per_host is not None:
            fields["per_host"] = per_host
        else:
            fields["payload"] = payload
        return await self._run("call", fields, targets, timeout + 5, on_event=on_event)

    async def push(self, path: str, dest: str, *, hosts: list[str] | None = None,
                   timeout: float = 600.0, mode: int | None = None) -> Report:
        """Stream a file to `dest` on the hosts through the tree (pipelined, checked
        with SHA-256, renamed into place atomically). Hosts that already have
        exactly this content are "ok" with skipped=True and receive nothing.
        `{host}` in dest is replaced by each host's name. The directory must exist."""
        if not os.path.isabs(dest) or os.path.normpath(dest) != dest or "\0" in dest:
            raise FleetError(f"push destination must be a normalised absolute path, got {dest!r}")
        try:
            st = os.stat(path)
        except OSError as e:
            raise FleetError(f"{path}: {e.strerror}") from None
        start = trio.current_time()
        digest = await trio.to_thread.run_sync(_sha256, path)
        targets = self._targets(hosts)
        have = await self.call("gproc.have", {"path": dest, "sha256": digest}, hosts=targets,
                               timeout=min(timeout, 120))
        results: dict[str, HostResult] = {}
        need = []
        for host, r in have.results.items():
            if r.status == "ok" and r.value is True:
                results[host] = HostResult(host, "ok", skipped=True, seconds=r.seconds)
            elif r.status == "ok":
                need.append(host)
            else:
                results[host] = r
        remaining = max(1.0, timeout - (trio.current_time() - start))

        async def feed(op_id: str) -> None:
            assert self.node is not None
            with open(path, "rb") as f:
                while data := await trio.to_thread.run_sync(f.read, CHUNK):
                    await self.node.push_chunk(op_id, data)
            await self.node.push_end(op_id)

        fields = {"dest": dest, "size": st.st_size, "sha256": digest,
                  "mode": mode if mode is not None else (st.st_mode & 0o777)}
        sent = await self._run("push", fields, need, remaining, source=path, feed=feed)
        results.update(sent.results)
        return Report("push", {h: results[h] for h in targets}, trio.current_time() - start)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
