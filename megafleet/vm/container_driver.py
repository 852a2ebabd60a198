"""The container driver: lightweight guests in their own network, PID, mount, UTS
and IPC namespaces, running the image's root file system through an overlay
(image rootfs shared read-only as the lower dir, a writable upper dir per guest)
and the image's own init in container mode (MEGAFLEET_CONTAINER=1, settings in
/etc/megafleet/cmdline). minimega's container type: thousands per host.

Containers are started by `nsspawn` helper processes (see there for the exact
sequence); a session keeps one helper per CPU so a boot storm spawns in parallel.
The recorded process is the container's init (PID 1 of its PID namespace):
killing it ends the namespace and with it every mount and the network namespace.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from megafleet import cgroup
from megafleet.proc import RecordedProcess
from megafleet.vm.driver import (Driver, ExecRoute, StartFailed, handle_process, reap,
                                 stop_processes)

NSSPAWN = Path(__file__).with_name("nsspawn.py")
GUEST_INIT = "/init"
# nsspawn's BUSYBOX: the PID 1 that mounts the container's /proc and execs its init.
BUSYBOX = "/bin/busybox"


def peer_of(ifname: str) -> str:
    """The other end of the veth whose host end is `ifname`: the interface whose
    index is its iflink (one lookup, not a scan of every interface)."""
    try:
        peer_index = int((Path("/sys/class/net") / ifname / "iflink").read_text())
        own_index = int((Path("/sys/class/net") / ifname / "ifindex").read_text())
    except (OSError, ValueError):
        raise StartFailed(f"no interface {ifname!r} on this host (the network layer "
                          "creates the veth before the guest boots)") from None
    try:
        if peer_index == own_index:
            raise OSError
        return socket.if_indextoname(peer_index)
    except OSError:
        raise StartFailed(f"{ifname!r} is not one end of a veth pair on this host") from None


def net_request(spec) -> dict[str, Any]:
    """What the launcher configures in the container's network namespace (see
    `cnet.NetConfig`): its NICs by MAC with their addresses and MTUs from the
    guest's config, routes, gateways, forwarding. JSON-able."""
    config = spec.guest_config()
    by_mac = {n.mac.lower(): n for n in config.nics}
    nics = []
    for i, nic in enumerate(spec.nics):
        mac = nic.mac.lower()
        conf = by_mac.get(mac)
        if nic.bridge is not None:      # the launcher creates the pair
            dev, mtu = nic.ifname, nic.mtu or (conf.mtu if conf else None)
        else:                           # an existing pair: its far end moves in
            dev, mtu = nic.peer or peer_of(nic.ifname), conf.mtu if conf else None
        nics.append({"dev": dev, "name": f"eth{i}", "mac": mac, "bridge": nic.bridge,
                     "addresses": [str(a) for a in conf.addresses] if conf else [], "mtu": mtu})
    return {"nics": nics, "gateway": config.gateway, "gateway6": config.gateway6,
            "routes": [list(r) for r in config.routes], "forward": config.forward}


class _Helper:
    """One nsspawn process and the line protocol to it. Many callers send at
    once: each request carries an id, and each answer is matched to its
    caller by it (the helper serves its requests in turn; the matching does
    not rely on that order)."""

    def __init__(self, process: trio.Process):
        if process.stdin is None or process.stdout is None:
            raise StartFailed("the container launcher (nsspawn) was started without pipes")
        self.process = process
        self.stdin: trio.abc.SendStream = process.stdin
        self.stdout: trio.abc.ReceiveStream = process.stdout
        self.send_lock = trio.Lock()
        self.read_lock = trio.Lock()
        self._buffer = b""
        self._replies: dict[int, dict[str, Any]] = {}
        self._waiting: dict[int, trio.Event] = {}
        self._next_id = 0

    async def request(self, req: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        req_id = self._next_id
        done = self._waiting[req_id] = trio.Event()
        try:
            async with self.send_lock:
                await self.stdin.send_all(json.dumps({**req, "id": req_id}).encode() + b"\n")
            while not done.is_set():
                # Whoever holds the read lock reads for everyone; the others wait.
                async with self.read_lock:
                    if done.is_set():
                        break
                    await self._read_one()
            return self._replies.pop(req_id)
        finally:
            self._waiting.pop(req_id, None)
            self._replies.pop(req_id, None)

    async def _read_one(self) -> None:
        while b"\n" not in self._buffer:
            data = await self.stdout.receive_some(65536)
            if not data:
                error = {"error": "the container launcher (nsspawn) exited"}
                for rid, event in self._waiting.items():
                    self._replies.setdefault(rid, error)
                    event.set()
                return
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        reply = json.loads(line)
        rid = reply.pop("id", None)
        if rid in self._waiting:
            self._replies[rid] = reply
            self._waiting[rid].set()


class ContainerDriver(Driver):
    name = "container"
    # Killing the init ends the PID namespace and with it every process, mount
    # and the network namespace; nothing inside needs a clean exit.
    kill_on_teardown = True
    open_early = True           # each helper is a Python process: ~50 ms to start

    def __init__(self) -> None:
        self._helpers: list[_Helper] = []
        self._next = 0
        self._rootfs: dict[str, str] = {}
        self._rootfs_lock = trio.Lock()

    def admission_kind(self) -> str:
        return "container"

    async def open(self, count: int) -> None:
        if self._helpers:               # open already (the engine opens early)
            return
        n = max(1, min(len(os.sched_getaffinity(0)), count))
        # Inside a testbed's cgroup scope the launchers run in the testbed's
        # guests cgroup, so each container's init is born there. Moving every
        # init after its fork instead costs an RCU grace period per move on this
        # kernel (v1 and v2 hierarchies): lan1000 came up in 157 s that way,
        # 35 s with no move.
        # The helper joins those cgroups itself before it reads a request.
        testbed = cgroup.current()
        procs = cgroup.procs_files("guests", testbed) if testbed is not None else []
        for _ in range(n):
            process = await trio.lowlevel.open_process(
                [sys.executable, "-I", "-S", str(NSSPAWN), *procs],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._helpers.append(_Helper(process))

    async def aclose(self) -> None:
        for helper in self._helpers:
            await helper.stdin.aclose()
        for helper in self._helpers:
            with trio.move_on_after(5):
                await helper.process.wait()
            if helper.process.returncode is None:
                helper.process.kill()
                await helper.process.wait()
        self._helpers = []

    async def _lower(self, image) -> str:
        async with self._rootfs_lock:
            if image.hash not in self._rootfs:
                path = str(await trio.to_thread.run_sync(image.rootfs))
                if "," in path or ":" in path:
                    raise StartFailed(f"rootfs path {path!r} contains ',' or ':' (overlay options)")
                for program in (GUEST_INIT, BUSYBOX):
                    if not os.access(Path(path) / program.lstrip("/"), os.X_OK):
                        raise StartFailed(f"image {image.name} has no executable {program}")
                self._rootfs[image.hash] = path
        return self._rootfs[image.hash]

    async def start(self, spec, image, gdir: Path) -> dict[str, Any]:
        if not self._helpers:
            await self.open(1)
        lower = await self._lower(image)
        if "," in str(gdir) or ":" in str(gdir):
            raise StartFailed(f"guest directory {gdir} contains ',' or ':' (overlay options)")
        # Network, mounts and hostname are set up from here, so the guest's init
        # forks nothing before its ready line (and runs no agent: the host's
        # collector samples containers, megafleet.collect.containers).
        req = {"id": spec.name, "gdir": str(gdir), "lower": lower, "init": GUEST_INIT,
               "hostname": spec.name, "net": net_request(spec),
               "cmdline": " ".join(spec.guest_config().kernel_args())}
        helper = self._helpers[self._next % len(self._helpers)]
        self._next += 1
        reply = await helper.request(req)
        if "error" in reply:
            raise StartFailed(f"container launch failed: {reply['error']}")
        pid = reply["pid"]
        try:
            proc = RecordedProcess.of(pid)
        except ProcessLookupError:
            reap(pid)
            raise StartFailed("container init exited at once") from None
        return {"pid": proc.pid, "pid_start": proc.start, "console": str(gdir / "console.log")}

    def exit_reason(self, handle: dict[str, Any]) -> str:
        if handle.get("pid"):
            reap(handle["pid"])
        return "container init exited"

    async def stop(self, name: str, handle: dict[str, Any], *, force: bool) -> None:
        """Kill the container's init (SIGKILL whether `force` or not: the init of
        a PID namespace ignores the signals it has no handler for, and its end
        takes everything of the container with it)."""
        proc = handle_process(handle)
        if proc is not None:
            await stop_processes([proc], sig=signal.SIGKILL, grace=3.0)
            reap(proc.pid)

    @classmethod
    def exec_route(cls, name: str, pid: int | None, handle: dict[str, Any] | None) -> ExecRoute:
        """A container has no exec channel: the host enters its namespaces
        (nsenter) and runs the command in its cgroup."""
        if not pid:
            from megafleet.vm.guestexec import GuestExecError
            raise GuestExecError(f"{name}: no init process recorded")
        return ExecRoute(prefix=("nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "-r", "-w"),
                         cgroup_pid=pid)
