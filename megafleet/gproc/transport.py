"""SSH transport: the one place where asyncssh (asyncio) meets trio.

`open_transport()` runs a trio-asyncio loop for as long as sessions are needed;
`SSHTransport.connect()` opens an SSH connection to one host, starts the agent
command on it and returns a `Session`, a byte stream with trio methods
(`send_all`, `receive_some`, `aclose`) over the channel's stdin/stdout. Nothing
outside this module sees asyncio or asyncssh.

Security defaults, never relaxed here:

* host keys are always verified against a known_hosts file (the fleet's, or
  ~/.ssh/known_hosts when none is given); an unknown or changed key raises
  `HostKeyRefused` and no session is opened;
* only public-key authentication with the fleet key (no ssh-agent, no password);
* no ~/.ssh/config is read, so a user's client config cannot change the above.

The channel's stderr (the agent's log) is kept, last 4 KiB, for error messages.
"""

from __future__ import annotations

import asyncio
import shlex
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, cast

import asyncssh
import trio
import trio_asyncio

from megafleet.gproc.protocol import ConnectFailed

HIGH_WATER = 1 << 20     # stop reading from SSH when this much is buffered unread
STDERR_KEEP = 4096
KEEPALIVE_S = 5          # a dead peer is noticed after KEEPALIVE_S * KEEPALIVE_COUNT
KEEPALIVE_COUNT = 3
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                   "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"]


class ConnectError(ConnectFailed):
    """The host could not be reached or refused us; the message says why."""


class HostKeyRefused(ConnectError):
    """The host presented a key that is not in the trusted known_hosts file."""


class _Channel(asyncssh.SSHClientSession):
    """asyncio side of one session: buffers stdout, keeps the stderr tail, and
    tracks SSH flow control in both directions."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.stderr = bytearray()
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False
        self.paused = False
        self.chan: Any = None
        self.exit_status: int | None = None

    def connection_made(self, chan) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.stderr += data
            del self.stderr[:-STDERR_KEEP]
            return
        self.buf += data
        self.readable.set()
        if len(self.buf) > HIGH_WATER and not self.paused:
            self.paused = True
            self.chan.pause_reading()

    def eof_received(self) -> bool:
        self.closed = True
        self.readable.set()
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.readable.set()
        self.writable.set()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class Session:
    """A byte stream to one remote agent, used from trio."""

    def __init__(self, name: str, conn, chan, channel: _Channel):
        self.name = name
        self._conn = conn
        self._chan = chan
        self._ch = channel
        self._wait_readable = trio_asyncio.aio_as_trio(channel.readable.wait)
        self._wait_writable = trio_asyncio.aio_as_trio(channel.writable.wait)

    async def send_all(self, data: bytes) -> None:
        if self._ch.closed:
            raise trio.BrokenResourceError(f"session to {self.name} is closed")
        self._chan.write(data)
        if not self._ch.writable.is_set():
            await self._wait_writable()
            if self._ch.closed:
                raise trio.BrokenResourceError(f"session to {self.name} is closed")
        else:
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int = 1 << 18) -> bytes:
        ch = self._ch
        while not ch.buf:
            if ch.closed:
                return b""
            ch.readable.clear()
            await self._wait_readable()
        data = bytes(ch.buf[:max_bytes])
        del ch.buf[:max_bytes]
        if ch.paused and len(ch.buf) < HIGH_WATER // 2:
            ch.paused = False
            self._chan.resume_reading()
        return data

    def stderr_tail(self) -> str:
        return self._ch.stderr.decode(errors="replace").strip()

    async def send_eof(self) -> None:
        if not self._ch.closed:
            self._chan.write_eof()
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the channel and the connection: the remote agent sees its stdin
        close and exits."""
        self._conn.close()
        with trio.move_on_after(5) as scope:
            scope.shield = True
            try:
                await trio_asyncio.aio_as_trio(self._conn.wait_closed)()
            except Exception:
                pass


class SSHTransport:
    def __init__(self, identity: str | None, known_hosts: str | None, connect_timeout: float = 15.0):
        self.identity = identity
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout

    async def connect(self, spec: dict[str, Any]) -> Session:
        """Connect to the host `spec` ({name, address, port, user, agent}) and
        start its agent. Raises ConnectError (or HostKeyRefused) with a clear
        message; never hangs longer than connect_timeout."""
        return await trio_asyncio.aio_as_trio(self._connect)(spec)

    async def _connect(self, spec: dict[str, Any]) -> Session:
        where = f"{spec['name']} ({spec['user']}@{spec['address']}:{spec['port']})"
        options: dict[str, Any] = dict(
            port=spec["port"], username=spec["user"], config=[], agent_path=None,
            known_hosts=self.known_hosts if self.known_hosts else (),
            password_auth=False, kbdint_auth=False, host_based_auth=False,
            gss_auth=False, gss_kex=False,
            # AES-GCM first: one C call per packet (AES-NI), where ChaCha20-Poly1305
            # costs asyncssh several; pushes are bound by this on the controller.
            encryption_algs=ENCRYPTION_ALGS,
            connect_timeout=self.connect_timeout, login_timeout=self.connect_timeout,
            keepalive_interval=KEEPALIVE_S, keepalive_count_max=KEEPALIVE_COUNT)
        options = {k: v for k, v in options.items() if v != ()}
        if self.identity:
            options["client_keys"] = [self.identity]
        try:
            conn = await asyncio.wait_for(asyncssh.connect(spec["address"], **options),
                                          self.connect_timeout + 1)
        except asyncssh.HostKeyNotVerifiable as e:
            source = self.known_hosts or "~/.ssh/known_hosts"
            raise HostKeyRefused(f"{where}: host key not trusted ({e.reason}); it is not in "
                                 f"{source}: refusing to connect") from None
        except asyncssh.PermissionDenied as e:
            raise ConnectError(f"{where}: authentication refused ({e.reason}); is the fleet key "
                               f"{self.identity or '(default keys)'} authorised there?") from None
        except asyncssh.DisconnectError as e:
            raise ConnectError(f"{where}: SSH disconnected: {e.reason}") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise ConnectError(f"{where}: no answer within {self.connect_timeout:g} s") from None
        except OSError as e:
            raise ConnectError(f"{where}: {e.strerror or e}") from None
        except (asyncssh.Error, ValueError, KeyError) as e:
            raise ConnectError(f"{where}: {e}") from None
        try:
            command = shlex.join(spec["agent"])
            chan, session = await conn.create_session(_Channel, command, encoding=None)
            channel = cast(_Channel, session)    # the one its factory, _Channel, made
        except (asyncssh.Error, OSError) as e:
            conn.close()
            raise ConnectError(f"{where}: cannot start the agent: {e}") from None
        return Session(spec["name"], conn, chan, channel)


@asynccontextmanager
async def open_transport(identity: str | None, known_hosts: str | None,
                         connect_timeout: float = 15.0) -> AsyncIterator[SSHTransport]:
    """Run the asyncio loop that SSH sessions need, for the duration of the block."""
    async with trio_asyncio.open_loop():
        yield SSHTransport(identity, known_hosts, connect_timeout)
