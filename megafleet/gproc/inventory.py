"""The host inventory: which hosts exist and how to reach their agents.

A TOML file::

    # Every key of [defaults] applies to each host that does not set it itself.
    [defaults]
    user = "root"
    port = 22
    agent = "megafleet agent"           # remote command that starts the agent
    identity = "/etc/megafleet/fleet_key"      # SSH private key (also used by agents)
    known_hosts = "/etc/megafleet/known_hosts" # host keys; never disabled

    [[host]]
    name = "node1"
    address = "10.0.0.1"
    labels = ["rack1", "gpu"]
    capacity = 200                      # how many VMs placement may put here

    # Many hosts at once, in ClusterShell's NodeSet notation; every key but
    # `hosts` is a default for the hosts of the range (a [[host]] table may
    # not repeat a name a range gives).
    [[range]]
    hosts = "node[0001-4480]"           # or "rack[1-4]-n[01-32]", "a[1-3],b7"
    address = "10.1.[0-17].[1-250]"     # optional: as many addresses, paired in
                                        # order; without it, each name is
                                        # resolved (DNS, /etc/hosts) at load
    capacity = 250
    mem_mb = 262144                     # guest memory budget for placement

`load("slurm")` takes the hosts of the current Slurm allocation instead
(`SLURM_JOB_NODELIST`), addresses resolved by name, capacity from the CPUs
Slurm gives each node (`SLURM_JOB_CPUS_PER_NODE`, else `SLURM_CPUS_ON_NODE`,
times GUESTS_PER_CPU) and memory from `SLURM_MEM_PER_NODE`;
`load("slurm:FILE")` also reads FILE, whose [defaults] apply to them and whose
[[host]] or [[range]] entries override what Slurm says for their hosts.

`identity` and `known_hosts` are paths that must be valid on every host, because
inner agents use them to reach their own children (deploy the fleet key there, or
share the files, as the tests do). Relative paths are relative to the file.
`agent` is a string split like a shell would (shlex) or a list of words; it is
quoted again word by word when it goes to SSH, so it is never interpreted.

Every error names the file, the host entry and the key that is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from megafleet.names import InvalidName, check_name

DEFAULT_AGENT = ("megafleet", "agent")
HOST_KEYS = {"name", "address", "port", "user", "labels", "capacity", "mem_mb", "agent"}
RANGE_KEYS = (HOST_KEYS - {"name"}) | {"hosts"}
DEFAULT_KEYS = {"port", "user", "labels", "capacity", "mem_mb", "agent", "identity", "known_hosts"}
# Guests placement may put on a Slurm node per CPU Slurm gives us there, when
# the inventory does not say: small guests mostly idle (250 containers ran on
# each of 4 hosts sharing 2 CPUs in bench/up.py); override with `capacity`.
GUESTS_PER_CPU = 8


class InventoryError(ValueError):
    pass


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    labels: tuple[str, ...] = ()
    capacity: int = 0
    agent: tuple[str, ...] = DEFAULT_AGENT
    mem_mb: int = 0                      # guest memory budget; 0: the controller's default

    def spec(self) -> dict[str, Any]:
        """What travels down the tree so that a parent agent can reach this host."""
        return {"name": self.name, "address": self.address, "port": self.port,
                "user": self.user, "agent": list(self.agent)}


@dataclass(frozen=True)
class Inventory:
    hosts: tuple[Host, ...]
    identity: str | None = None
    known_hosts: str | None = None
    source: str = "<inventory>"
    by_name: dict[str, Host] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self.by_name.update({h.name: h for h in self.hosts})

    def select(self, names: list[str] | None = None, labels: list[str] | None = None) -> list[Host]:
        """Hosts by name (in inventory order) and/or carrying all the given labels.
        An unknown name is an error, not an empty selection."""
        chosen = list(self.hosts)
        if names:
            unknown = [n for n in names if n not in self.by_name]
            if unknown:
                raise InventoryError(f"{self.source}: no host named {', '.join(unknown)}")
            wanted = set(names)
            chosen = [h for h in chosen if h.name in wanted]
        if labels:
            chosen = [h for h in chosen if set(labels) <= set(h.labels)]
        return chosen


def _agent_words(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            words = shlex.split(value)
        except ValueError as e:
            raise InventoryError(f"{where}: cannot split agent command: {e}") from None
    elif isinstance(value, list) and all(isinstance(w, str) for w in value):
        words = list(value)
    else:
        raise InventoryError(f"{where}: expected a string or a list of strings, got {value!r}")
    if not words:
        raise InventoryError(f"{where}: the agent command is empty")
    return tuple(words)


def _host(entry: Any, defaults: dict[str, Any], where: str) -> Host:
    if not isinstance(entry, dict):
        raise InventoryError(f"{where}: expected a table, got {entry!r}")
    unknown = set(entry) - HOST_KEYS
    if unknown:
        raise InventoryError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(allowed: {', '.join(sorted(HOST_KEYS))})")
    merged = {**defaults, **entry}
    if "name" not in entry:
        raise InventoryError(f"{where}: missing key 'name'")
    try:
        name = check_name(entry["name"], "host name")
    except InvalidName as e:
        raise InventoryError(f"{where}.name: {e}") from None
    where = f"{where} ({name})"
    address = merged.get("address")
    if not isinstance(address, str) or not address:
        raise InventoryError(f"{where}.address: expected an IP address or DNS name, got {address!r}")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        try:
            check_name(address, "address")
        except InvalidName:
            raise InventoryError(f"{where}.address: {address!r} is neither an IP address "
                                 "nor a DNS name") from None
    port = merged.get("port", 22)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InventoryError(f"{where}.port: expected an integer 1-65535, got {port!r}")
    user = merged.get("user", "root")
    try:
        check_name(user, "user")
    except InvalidName as e:
        raise InventoryError(f"{where}.user: {e}") from None
    labels = merged.get("labels", [])
    if not isinstance(labels, list):
        raise InventoryError(f"{where}.labels: expected a list of names, got {labels!r}")
    for label in labels:
        try:
            check_name(label, "label")
        except InvalidName as e:
            raise InventoryError(f"{where}.labels: {e}") from None
    capacity = merged.get("capacity", 0)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
        raise InventoryError(f"{where}.capacity: expected an integer >= 0, got {capacity!r}")
    mem_mb = merged.get("mem_mb", 0)
    if not isinstance(mem_mb, int) or isinstance(mem_mb, bool) or mem_mb < 0:
        raise InventoryError(f"{where}.mem_mb: expected an integer >= 0 (MB), got {mem_mb!r}")
    agent = _agent_words(merged.get("agent", list(DEFAULT_AGENT)), f"{where}.agent")
    return Host(name, address, port, user, tuple(labels), capacity, agent, mem_mb)


def expand(nodeset: str) -> list[str]:
    """The names of a ClusterShell NodeSet (`node[0001-0004]`, `rack[1-2]-n[1-3]`,
    `a1,b[2-3]`), in NodeSet order. Raises ValueError with ClusterShell's reason."""
    from ClusterShell.NodeSet import NodeSet, NodeSetParseError, RangeSetParseError

    if not isinstance(nodeset, str) or not nodeset.strip():
        raise ValueError("expected a host range such as node[0001-0064], got " + repr(nodeset))
    try:
        return list(NodeSet(nodeset))
    except (NodeSetParseError, RangeSetParseError) as e:
        raise ValueError(str(e)) from None


def fold(names: list[str]) -> str:
    """Host names in NodeSet's folded form: node[0012,0450-0452] (as clubak)."""
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(names))


def resolve(name: str) -> str:
    """A host's address from its name (DNS, /etc/hosts). Raises InventoryError."""
    try:
        return socket.gethostbyname(name)
    except (OSError, UnicodeError) as e:
        raise InventoryError(f"{name}: cannot resolve the host's address: {e}") from None


def _line_of(text: str, pattern: str, nth: int) -> int:
    """1-based line of the nth (0-based) line matching `pattern`; 0 if none."""
    seen = -1
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(pattern, line):
            seen += 1
            if seen == nth:
                return number
    return 0


def _range_hosts(entry: Any, defaults: dict[str, Any], i: int, source: str, text: str,
                 resolver) -> list[Host]:
    header = _line_of(text, r"\s*\[\[\s*range\s*\]\]", i)
    where = f"{source}:{header}: range[{i}]" if header else f"{source}: range[{i}]"
    if not isinstance(entry, dict):
        raise InventoryError(f"{where}: expected a table, got {entry!r}")
    unknown = set(entry) - RANGE_KEYS
    if unknown:
        raise InventoryError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(allowed: {', '.join(sorted(RANGE_KEYS))})")
    if "hosts" not in entry:
        raise InventoryError(f"{where}: missing key 'hosts' (a range such as node[0001-0064])")
    # The line of the `hosts` key itself, for the message about a bad range.
    line = header
    lines = text.splitlines()
    for number in range(header, len(lines) + 1) if header else ():
        if re.match(r"\s*hosts\s*=", lines[number - 1]):
            line = number
            break
    at = f"{source}:{line}" if line else source
    try:
        names = expand(entry["hosts"])
    except ValueError as e:
        raise InventoryError(f"{at}: range[{i}].hosts: bad host range {entry['hosts']!r}: {e}") from None
    addresses: list[str | None]
    if "address" in entry:
        try:
            addresses = list(expand(entry["address"]))
        except ValueError as e:
            raise InventoryError(f"{at}: range[{i}].address: bad address range {entry['address']!r}: {e}") from None
        if len(addresses) != len(names):
            raise InventoryError(f"{at}: range[{i}]: {len(names)} hosts ({entry['hosts']}) but "
                                 f"{len(addresses)} addresses ({entry['address']}); give one per host "
                                 "or none (names are then resolved)")
    else:
        addresses = [None] * len(names)
    base = {k: v for k, v in entry.items() if k not in ("hosts", "address")}
    hosts = []
    for name, address in zip(names, addresses):
        if address is None:
            try:
                check_name(name, "host name")
            except InvalidName as e:
                raise InventoryError(f"{at}: range[{i}].hosts: {e}") from None
            address = resolver(name)
        hosts.append(_host({"name": name, "address": address, **base}, defaults, f"{at}: range[{i}]"))
    return hosts


def parse(text: str, source: str = "<inventory>", base: Path | None = None, *,
          resolver=None) -> Inventory:
    """An inventory from TOML text. `resolver(name) -> address` resolves the
    hosts of ranges given without addresses (default: `resolve`)."""
    return _parse(text, source, base, resolver)[0]


def _parse(text: str, source: str, base: Path | None, resolver) -> tuple[Inventory, dict[str, Any]]:
    resolver = resolver or resolve
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InventoryError(f"{source}: {e}") from None
    unknown = set(data) - {"defaults", "host", "range"}
    if unknown:
        raise InventoryError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                             "(allowed: [defaults], [[host]], [[range]])")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InventoryError(f"{source}: defaults: expected a table")
    bad = set(defaults) - DEFAULT_KEYS
    if bad:
        raise InventoryError(f"{source}: defaults: unknown key(s) {', '.join(sorted(bad))} "
                             f"(allowed: {', '.join(sorted(DEFAULT_KEYS))})")
    files: dict[str, str | None] = {}        # identity, known_hosts: a path or none
    for key in ("identity", "known_hosts"):
        value = defaults.get(key)
        if value is None:
            files[key] = None
            continue
        if not isinstance(value, str) or not value:
            raise InventoryError(f"{source}: defaults.{key}: expected a file path, got {value!r}")
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        files[key] = str(path)
    host_defaults = {k: v for k, v in defaults.items() if k in HOST_KEYS}
    entries = data.get("host", [])
    if not isinstance(entries, list):
        raise InventoryError(f"{source}: host: use [[host]] tables, one per host")
    ranges = data.get("range", [])
    if not isinstance(ranges, list):
        raise InventoryError(f"{source}: range: use [[range]] tables, one per host range")
    hosts: list[Host] = []
    seen: dict[str, str] = {}                # host name -> where the inventory gives it
    for i, entry in enumerate(entries):
        host = _host(entry, host_defaults, f"{source}: host[{i}]")
        if host.name in seen:
            raise InventoryError(f"{source}: host[{i}].name: {host.name!r} is already used by {seen[host.name]}")
        seen[host.name] = f"host[{i}]"
        hosts.append(host)
    for i, entry in enumerate(ranges):
        for host in _range_hosts(entry, host_defaults, i, source, text, resolver):
            if host.name in seen:
                line = _line_of(text, r"\s*\[\[\s*range\s*\]\]", i)
                raise InventoryError(f"{source}:{line}: range[{i}]: host {host.name!r} is already "
                                     f"given by {seen[host.name]}")
            seen[host.name] = f"range[{i}]"
            hosts.append(host)
    return Inventory(tuple(hosts), files["identity"], files["known_hosts"], source), host_defaults


def load(path: str | Path) -> Inventory:
    """The inventory in a TOML file; "slurm" or "slurm:FILE": the hosts of the
    current Slurm allocation (see the module docstring)."""
    if str(path) == "slurm" or str(path).startswith("slurm:"):
        return from_slurm(os.environ, str(path)[len("slurm:"):] or None)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InventoryError(f"{path}: cannot read inventory: {e.strerror}") from None
    return parse(text, str(path), path.parent.resolve())


def render(hosts: list[Host], *, identity: str | None = None, known_hosts: str | None = None) -> str:
    """TOML text for an inventory (used by the test fleet and the bench)."""
    lines = ["[defaults]"]
    if identity:
        lines.append(f"identity = {_q(identity)}")
    if known_hosts:
        lines.append(f"known_hosts = {_q(known_hosts)}")
    for h in hosts:
        lines += ["", "[[host]]", f"name = {_q(h.name)}", f"address = {_q(h.address)}",
                  f"port = {h.port}", f"user = {_q(h.user)}",
                  "labels = [" + ", ".join(_q(label) for label in h.labels) + "]",
                  f"capacity = {h.capacity}",
                  *([f"mem_mb = {h.mem_mb}"] if h.mem_mb else []),
                  "agent = [" + ", ".join(_q(w) for w in h.agent) + "]"]
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    # TOML basic strings share JSON's escapes for everything we emit.
    import json
    return json.dumps(s)


def _cpus_per_node(env: Mapping[str, str], count: int) -> list[int] | None:
    """SLURM_JOB_CPUS_PER_NODE ("32(x2),16": 32, 32, 16), else SLURM_CPUS_ON_NODE
    for every node; None when Slurm says neither."""
    spec = env.get("SLURM_JOB_CPUS_PER_NODE")
    if spec:
        out: list[int] = []
        for part in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not m:
                raise InventoryError(f"SLURM_JOB_CPUS_PER_NODE: cannot read {part!r} in {spec!r}")
            out += [int(m.group(1))] * int(m.group(2) or 1)
        if len(out) == count:
            return out
    single = env.get("SLURM_CPUS_ON_NODE")
    if single:
        if not single.isdigit():
            raise InventoryError(f"SLURM_CPUS_ON_NODE: expected a number of CPUs, got {single!r}")
        return [int(single)] * count
    return None


def from_slurm(env: Mapping[str, str], file: str | None = None, *, resolver=None) -> Inventory:
    """The hosts of the Slurm allocation described by `env` (os.environ inside
    salloc/sbatch): `SLURM_JOB_NODELIST` expanded with NodeSet, each address
    resolved by name, capacity = CPUs x GUESTS_PER_CPU, memory budget from
    `SLURM_MEM_PER_NODE` (MB). `file` (optional TOML inventory): its [defaults]
    apply, and its [[host]]/[[range]] entries replace Slurm's view of theirs.
    Raises InventoryError naming the variable or host that is wrong."""
    resolver = resolver or resolve
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise InventoryError("slurm: SLURM_JOB_NODELIST is not set: not inside a Slurm allocation "
                             "(run under salloc or sbatch, or give an inventory file)")
    try:
        names = expand(nodelist)
    except ValueError as e:
        raise InventoryError(f"SLURM_JOB_NODELIST: bad host range {nodelist!r}: {e}") from None
    cpus = _cpus_per_node(env, len(names))
    mem = env.get("SLURM_MEM_PER_NODE", "")
    if mem and not mem.isdigit():
        raise InventoryError(f"SLURM_MEM_PER_NODE: expected MB, got {mem!r}")
    if file is not None:
        fpath = Path(file)
        try:
            text = fpath.read_text()
        except OSError as e:
            raise InventoryError(f"{fpath}: cannot read inventory: {e.strerror}") from None
        base, defaults = _parse(text, str(fpath), fpath.parent.resolve(), resolver)
    else:
        base, defaults = Inventory(()), {}
    hosts = []
    for i, name in enumerate(names):
        given = base.by_name.get(name)
        if given is not None:
            hosts.append(given)
            continue
        entry: dict[str, Any] = {"name": name, "address": resolver(name)}
        if "capacity" not in defaults and cpus is not None:
            entry["capacity"] = cpus[i] * GUESTS_PER_CPU
        if "mem_mb" not in defaults and mem:
            entry["mem_mb"] = int(mem)
        hosts.append(_host(entry, defaults, f"slurm: {name}"))
    return Inventory(tuple(hosts), base.identity, base.known_hosts, f"slurm ({nodelist})")
