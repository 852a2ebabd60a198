"""A fleet of emulated hosts on this machine, for tests and benchmarks.

Each host is a network namespace on one bridge with its own OpenSSH sshd (own
config, host key and pid file in a work directory); the controller reaches them
from the initial namespace through the bridge's address. The hosts share this
filesystem, so their agent is `<this python> -m megafleet agent`. A fleet key
pair, an authorized_keys and a known_hosts file are generated in the work
directory and named in the generated inventory.

Everything is recorded in the ledger (owner "gproc-testfleet", keys prefixed by
the fleet's prefix) *before* it is created, and `down()` removes what the ledger
lists, so a crashed run is cleaned by `TestFleet(prefix, ...).down()` or
`teardown_prefix(prefix)`.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from megafleet import proc
from megafleet.gproc import inventory
from megafleet.ledger import Ledger
from megafleet.names import check_name, ifname

OWNER = "gproc-testfleet"
SSHD = "/usr/sbin/sshd"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return proc.run(["ip", *args], check=check)


class TestFleet:
    __test__ = False   # not a pytest class

    def __init__(self, prefix: str, count: int, workdir: Path, *, subnet: str = "10.147.1.0/24",
                 shape_mbit: int | None = None, ledger: Ledger | None = None):
        check_name(prefix, "fleet prefix")
        if len(prefix) > 8:
            raise ValueError(f"fleet prefix {prefix!r} is too long for interface names (max 8)")
        self.prefix = prefix
        self.count = count
        self.workdir = Path(workdir)
        self.net = ipaddress.ip_network(subnet)
        if count > self.net.num_addresses - 3:
            raise ValueError(f"{count} hosts do not fit in {subnet}")
        self.shape_mbit = shape_mbit
        self.ledger = ledger or Ledger()
        self.bridge = ifname(prefix, "br")
        self.gateway = str(self.net[-2])
        self.names = [f"{prefix}h{i}" for i in range(count)]
        self.sshd: dict[str, proc.RecordedProcess] = {}

    # --- naming ------------------------------------------------------------------

    def netns(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def veth(self, i: int) -> str:
        return ifname(self.prefix, "v", str(i))

    def address(self, i: int) -> str:
        return str(self.net[i + 1])

    def hostdir(self, i: int) -> Path:
        return self.workdir / "hosts" / self.netns(i)

    @property
    def inventory_path(self) -> Path:
        return self.workdir / "hosts.toml"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    @property
    def identity(self) -> Path:
        return self.workdir / "fleet_key"

    # --- bring up ----------------------------------------------------------------

    def up(self, *, workers: int = 8) -> inventory.Inventory:
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)   # OpenSSH's privilege-separation dir
        self.ledger.record(OWNER, "bridge", self.bridge, prefix=self.prefix)
        if not Path(f"/sys/class/net/{self.bridge}").exists():
            _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "replace", f"{self.gateway}/{self.net.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        if not self.identity.exists():
            proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "megafleet-fleet",
                      "-f", str(self.identity)])
        shutil.copyfile(f"{self.identity}.pub", self.workdir / "authorized_keys")
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            host_keys = list(pool.map(self._host_up, range(self.count)))
        self.known_hosts.write_text("".join(
            f"{self.address(i)} {key}\n" for i, key in enumerate(host_keys)))
        hosts = [inventory.Host(self.netns(i), self.address(i), 22, "root", ("test",), 10,
                                (sys.executable, "-m", "megafleet", "agent"))
                 for i in range(self.count)]
        self.inventory_path.write_text(inventory.render(hosts, identity=str(self.identity),
                                                        known_hosts=str(self.known_hosts)))
        for i in range(self.count):
            self._wait_port(self.address(i), 22)
        return inventory.load(self.inventory_path)

    def _host_up(self, i: int) -> str:
        ns, veth, peer = self.netns(i), self.veth(i), ifname(self.prefix, "p", str(i))
        d = self.hostdir(i)
        d.mkdir(parents=True, exist_ok=True)
        self.ledger.record(OWNER, "netns", ns, prefix=self.prefix)
        if not Path(f"/run/netns/{ns}").exists():
            _ip("netns", "add", ns)
        self.ledger.record(OWNER, "veth", veth, prefix=self.prefix, netns=ns)
        if not Path(f"/sys/class/net/{veth}").exists():
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns)
            _ip("-n", ns, "link", "set", peer, "name", "eth0")
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "replace", f"{self.address(i)}/{self.net.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        if self.shape_mbit:
            # Both directions of the host's link: the controller side shapes what the
            # host receives, the namespace side what it sends.
            for argv in (["tc", "qdisc", "replace", "dev", veth],
                         ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0"]):
                proc.run(argv + ["root", "tbf", "rate", f"{self.shape_mbit}mbit",
                                 "burst", "256kb", "latency", "50ms"])
        key = d / "host_ed25519"
        if not key.exists():
            proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", ns, "-f", str(key)])
        config = d / "sshd_config"
        config.write_text("\n".join([
            "Port 22", f"ListenAddress {self.address(i)}", f"HostKey {key}",
            f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "UseDNS no", "PrintMotd no", "PrintLastLog no",
            "MaxStartups 200:30:400", "MaxSessions 20", "LogLevel ERROR", ""]))
        self.start_sshd(i)
        return " ".join((d / "host_ed25519.pub").read_text().split()[:2])

    def start_sshd(self, i: int) -> None:
        """Start host i's sshd (again, after `stop_sshd`); its config and key
        were written by `up`."""
        ns, d = self.netns(i), self.hostdir(i)
        config = d / "sshd_config"
        self.ledger.record(OWNER, "sshd", ns, prefix=self.prefix, pidfile=str(d / "sshd.pid"))
        log = open(d / "sshd.log", "ab")
        popen = subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(config)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        # `ip netns exec` execs sshd in place: the pid is sshd's.
        recorded = proc.RecordedProcess.of(popen.pid)
        self.sshd[ns] = recorded
        self.ledger.record(OWNER, "sshd", ns, prefix=self.prefix, pidfile=str(d / "sshd.pid"),
                           pid=recorded.pid, start=recorded.start)

    @staticmethod
    def _wait_port(address: str, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((address, port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd at {address}:{port} did not come up within {timeout:g} s")
                time.sleep(0.05)

    # --- inspecting ----------------------------------------------------------------

    def stop_sshd(self, i: int) -> None:
        """Make one host unreachable (its agent sessions stay as they are)."""
        rec = self.sshd.get(self.netns(i))
        if rec is not None:
            rec.stop()

    def pids_in(self, i: int) -> list[int]:
        """Processes running inside host i's namespace (sshd and what it started)."""
        ns = self.netns(i)
        if not Path(f"/run/netns/{ns}").exists():
            return []
        out = _ip("netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split()]

    def agent_pid(self, i: int) -> int | None:
        """The pid of the megafleet agent running on host i, if one is."""
        for pid in self.pids_in(i):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"megafleet" in cmdline and b"agent" in cmdline:
                return pid
        return None

    def agent_pids(self) -> dict[str, list[int]]:
        """Processes in the namespaces other than the sshd listeners: agents and
        the per-session sshd processes serving them."""
        listeners = {r.pid for r in self.sshd.values()}
        out = {}
        for i in range(self.count):
            others = [p for p in self.pids_in(i) if p not in listeners]
            if others:
                out[self.netns(i)] = others
        return out

    # --- tear down ---------------------------------------------------------------

    def down(self) -> None:
        teardown_prefix(self.prefix, self.ledger)


def _records(ledger: Ledger, kind: str, prefix: str):
    return [r for r in ledger.list(OWNER, kind) if r.data.get("prefix") == prefix]


def teardown_prefix(prefix: str, ledger: Ledger | None = None) -> None:
    """Remove everything the ledger lists for this fleet prefix; tolerate what is gone."""
    ledger = ledger or Ledger()
    for r in _records(ledger, "sshd", prefix):
        pid, start = r.data.get("pid"), r.data.get("start")
        if pid is None:
            try:
                pid = int(Path(r.data["pidfile"]).read_text().split()[0])
                start = proc.start_time(pid)
            except (OSError, ValueError, IndexError):
                pid = None
        if pid is not None and start is not None:
            proc.RecordedProcess(pid, start).stop(grace=3)
        ledger.forget(OWNER, "sshd", r.key)
    for r in _records(ledger, "netns", prefix):
        ns = r.key
        if Path(f"/run/netns/{ns}").exists():
            # Anything still running in a namespace we created is ours (an agent
            # left by a crashed run): stop it by pid, then delete the namespace.
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                start = proc.start_time(int(pid))
                if start is not None:
                    proc.RecordedProcess(int(pid), start).stop(grace=2)
            _ip("netns", "del", ns, check=False)
        ledger.forget(OWNER, "netns", ns)
    for r in _records(ledger, "veth", prefix):
        if Path(f"/sys/class/net/{r.key}").exists():
            _ip("link", "del", r.key, check=False)
        ledger.forget(OWNER, "veth", r.key)
    for r in _records(ledger, "bridge", prefix):
        if Path(f"/sys/class/net/{r.key}").exists():
            _ip("link", "del", r.key, check=False)
        ledger.forget(OWNER, "bridge", r.key)


def leftovers(prefix: str) -> list[str]:
    """Namespaces and interfaces of this prefix that still exist (tests assert [])."""
    found = []
    if Path("/run/netns").exists():
        found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(prefix)]
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(prefix)]
    return found
