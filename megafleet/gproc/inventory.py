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

`identity` and `known_hosts` are paths that must be valid on every host, because
inner agents use them to reach their own children (deploy the fleet key there, or
share the files, as the tests do). Relative paths are relative to the file.
`agent` is a string split like a shell would (shlex) or a list of words; it is
quoted again word by word when it goes to SSH, so it is never interpreted.

Every error names the file, the host entry and the key that is wrong.
"""

from __future__ import annotations

import ipaddress
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megafleet.names import InvalidName, check_name

DEFAULT_AGENT = ("megafleet", "agent")
HOST_KEYS = {"name", "address", "port", "user", "labels", "capacity", "agent"}
DEFAULT_KEYS = {"port", "user", "labels", "capacity", "agent", "identity", "known_hosts"}


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
    agent = _agent_words(merged.get("agent", list(DEFAULT_AGENT)), f"{where}.agent")
    return Host(name, address, port, user, tuple(labels), capacity, agent)


def parse(text: str, source: str = "<inventory>", base: Path | None = None) -> Inventory:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InventoryError(f"{source}: {e}") from None
    unknown = set(data) - {"defaults", "host"}
    if unknown:
        raise InventoryError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))} "
                             "(allowed: [defaults], [[host]])")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InventoryError(f"{source}: defaults: expected a table")
    bad = set(defaults) - DEFAULT_KEYS
    if bad:
        raise InventoryError(f"{source}: defaults: unknown key(s) {', '.join(sorted(bad))} "
                             f"(allowed: {', '.join(sorted(DEFAULT_KEYS))})")
    files = {}
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
    hosts, seen = [], {}
    for i, entry in enumerate(entries):
        host = _host(entry, host_defaults, f"{source}: host[{i}]")
        if host.name in seen:
            raise InventoryError(f"{source}: host[{i}].name: {host.name!r} is already used by host[{seen[host.name]}]")
        seen[host.name] = i
        hosts.append(host)
    return Inventory(tuple(hosts), files["identity"], files["known_hosts"], source)


def load(path: str | Path) -> Inventory:
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
                  "agent = [" + ", ".join(_q(w) for w in h.agent) + "]"]
    return "\n".join(lines) + "\n"


def _q(s: str) -> str:
    # TOML basic strings share JSON's escapes for everything we emit.
    import json
    return json.dumps(s)
