"""The light agent of a leaf host (one with no children in the tree).

Most hosts of a tree are leaves: they never open SSH sessions, never relay, and
only run what they are asked. They start in a few hundredths of a second of CPU
instead of the few tenths an inner agent needs for trio and asyncssh, which is
what keeps building a 128-host tree close to the cost of one SSH session per host.

Same protocol and same results as `node.Node` for its own host, with plain
threads: the main thread reads frames from the parent; each exec runs in its own
thread (two more pump its output); push chunks are written by the main thread as
they arrive; async call handlers get trio loaded on first use. End of input kills
every running command and exits.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from typing import Any

from megafleet.gproc import handlers, protocol


class Leaf:
    def __init__(self, me: str, reader: protocol.SyncFrameReader, out_fd: int):
        self.me = me
        self.reader = reader
        self.out_fd = out_fd
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.cancelled: set[str] = set()
        self.pushes: dict[str, dict[str, Any]] = {}
        self.calls: dict[str, tuple[Any, Any]] = {}    # op id -> (trio token, cancel scope)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        data = memoryview(protocol.encode(header, payload))
        with self.lock:
            while data:
                data = data[os.write(self.out_fd, data):]

    def result(self, op_id: str, status: str, **fields: Any) -> None:
        if op_id in self.cancelled:
            return
        self.send({"t": "res", "id": op_id, "host": self.me, "status": status, **fields})

    # --- main loop ---------------------------------------------------------------

    def serve(self) -> None:
        self.send({"t": "ready", "up": [], "down": {}})
        try:
            while (frame := self.reader.read()) is not None:
                header, payload = frame
                kind = header["t"]
                if kind == "req":
                    self.request(header)
                elif kind == "chunk":
                    self.chunk(str(header["id"]), payload)
                elif kind == "end":
                    self.end(str(header["id"]))
                elif kind == "cancel":
                    self.cancel(str(header["id"]))
                else:
                    raise protocol.ProtocolError(f"unexpected {kind!r} frame from the parent")
        finally:
            for op_id in list(self.procs):
                self.cancel(op_id)
            for push in self.pushes.values():
                _discard(push)

    def request(self, req: dict[str, Any]) -> None:
        op_id = str(req["id"])
        targets = req.get("targets", [])
        for name in targets:
            if name != self.me:
                self.send({"t": "res", "id": op_id, "host": name, "status": "unreachable",
                           "error": "not reachable through this node"})
        if self.me not in targets:
            return
        if req["op"] == "exec":
            threading.Thread(target=self.exec, args=(op_id, req), daemon=True).start()
        elif req["op"] == "call":
            threading.Thread(target=self.call, args=(op_id, req), daemon=True).start()
        elif req["op"] == "push":
            self.open_push(op_id, req)
        else:
            self.result(op_id, "failed", error=f"unknown operation {req['op']!r}")

    def cancel(self, op_id: str) -> None:
        self.cancelled.add(op_id)
        proc = self.procs.pop(op_id, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        call = self.calls.pop(op_id, None)
        if call is not None:
            token, scope = call
            try:
                token.run_sync_soon(scope.cancel)
            except RuntimeError:
                pass      # that trio run has already finished
        push = self.pushes.pop(op_id, None)
        if push is not None:
            _discard(push)

    # --- exec --------------------------------------------------------------------

    def exec(self, op_id: str, req: dict[str, Any]) -> None:
        start = time.monotonic()
        argv, timeout = req["argv"], req.get("timeout")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except OSError as e:
            self.result(op_id, "failed", error=f"cannot run {argv[0]}: {e.strerror or e}",
                        seconds=round(time.monotonic() - start, 3))
            return
        self.procs[op_id] = proc
        pumps = [threading.Thread(target=self.pump, args=(op_id, stream, fd), daemon=True)
                 for stream, fd in ((proc.stdout, 1), (proc.stderr, 2))]
        for t in pumps:
            t.start()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        for t in pumps:
            t.join()
        self.procs.pop(op_id, None)
        seconds = round(time.monotonic() - start, 3)
        if rc is None:
            self.result(op_id, "failed", error=f"timed out after {timeout:g} s", seconds=seconds)
        elif rc == 0:
            self.result(op_id, "ok", rc=rc, seconds=seconds)
        else:
            self.result(op_id, "failed", rc=rc, seconds=seconds,
                        error=f"exited {rc}" if rc > 0 else f"killed by signal {-rc}")

    def pump(self, op_id: str, stream, fd: int) -> None:
        with stream:
            while data := stream.read1(65536):
                if op_id not in self.cancelled:
                    self.send({"t": "out", "id": op_id, "host": self.me, "fd": fd}, data)

    # --- call --------------------------------------------------------------------

    def call(self, op_id: str, req: dict[str, Any]) -> None:
        start = time.monotonic()
        try:
            payload = handlers.own_payload(req, self.me)
            fn = handlers.lookup(req["handler"], req.get("modules", []))
            if handlers.is_async(fn):
                value = self._run_async(op_id, fn, payload, req.get("timeout"))
            else:
                value = fn(payload, handlers.Context(self.me, _no_emit))
            protocol.encode({"t": "res", "value": value})
        except TimeoutError:
            self.result(op_id, "failed", error=f"timed out after {req.get('timeout'):g} s",
                        seconds=round(time.monotonic() - start, 3))
            return
        except Exception as e:
            self.result(op_id, "failed", error=f"{type(e).__name__}: {e}",
                        seconds=round(time.monotonic() - start, 3))
            return
        self.result(op_id, "ok", value=value, seconds=round(time.monotonic() - start, 3))

    def _run_async(self, op_id: str, fn, payload: Any, timeout: float | None) -> Any:
        import trio

        async def emit(data: Any) -> None:
            if op_id not in self.cancelled:
                await trio.to_thread.run_sync(self.send, {"t": "ev", "id": op_id, "host": self.me,
                                                          "data": data})

        async def run() -> Any:
            with trio.CancelScope() as scope:       # cancelled by a `cancel` request
                self.calls[op_id] = (trio.lowlevel.current_trio_token(), scope)
                if op_id in self.cancelled:
                    scope.cancel()
                with trio.fail_after(timeout) if timeout else trio.CancelScope():
                    return await fn(payload, handlers.Context(self.me, emit))
            raise RuntimeError("cancelled")

        try:
            return trio.run(run)
        except trio.TooSlowError:
            raise TimeoutError from None
        finally:
            self.calls.pop(op_id, None)

    # --- push --------------------------------------------------------------------

    def open_push(self, op_id: str, req: dict[str, Any]) -> None:
        dest = handlers.expand_dest(req["dest"], self.me)
        try:
            fd, path = handlers.push_tempfile(dest)
        except OSError as e:
            self.result(op_id, "failed", error=f"cannot write {dest}: {e.strerror or e}")
            return
        self.pushes[op_id] = {"fd": fd, "path": path, "dest": dest, "req": req, "error": None,
                              "digest": hashlib.sha256(), "size": 0, "start": time.monotonic()}

    def chunk(self, op_id: str, data: bytes) -> None:
        push = self.pushes.get(op_id)
        if push is None or push["error"]:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(push["fd"], view):]
        except OSError as e:
            push["error"] = f"write failed: {e.strerror or e}"
            return
        push["digest"].update(data)
        push["size"] += len(data)

    def end(self, op_id: str) -> None:
        push = self.pushes.pop(op_id, None)
        if push is None:
            return
        req = push["req"]
        os.close(push["fd"])
        error = push["error"]
        if error is None and (push["size"] != req["size"] or push["digest"].hexdigest() != req["sha256"]):
            error = (f"checksum mismatch: got {push['size']} bytes sha256 {push['digest'].hexdigest()[:12]}, "
                     f"expected {req['size']} bytes {req['sha256'][:12]}")
        if error is None:
            try:
                # rename() is the atomic step: readers see the old file or the whole new one.
                os.chmod(push["path"], int(req.get("mode", 0o644)))
                os.replace(push["path"], push["dest"])
            except OSError as e:
                error = f"cannot install {push['dest']}: {e.strerror or e}"
        seconds = round(time.monotonic() - push["start"], 3)
        if error is not None:
            _unlink(push["path"])
            self.result(op_id, "failed", error=error, seconds=seconds)
        else:
            self.result(op_id, "ok", bytes=push["size"], seconds=seconds)


async def _no_emit(data: Any) -> None:
    raise RuntimeError("a plain (non-async) handler cannot emit progress")


def _discard(push: dict[str, Any]) -> None:
    try:
        os.close(push["fd"])
    except OSError:
        pass
    _unlink(push["path"])


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
