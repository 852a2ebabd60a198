"""gproc: reach and drive many hosts through a tree of persistent agents over SSH.

The controller connects, over SSH, to a few hosts and starts `megafleet agent`
there; each agent starts the agents of the subtree it was given (fanout children
each), so n hosts are reached in about log_fanout(n) steps, once per session. All
later operations reuse those sessions.

Python API (trio)::

    from megafleet.gproc import Fleet, inventory

    inv = inventory.load("hosts.toml")
    async with Fleet.connect(inv, fanout=8, connect_timeout=15) as fleet:
        fleet.status                    # {host: HostState("up"|"unreachable"|"lost", error)}
        r = await fleet.exec(["uname", "-r"], hosts=None, timeout=60,
                             on_output=lambda host, fd, data: ...)
        r.results["node1"].rc, r.gathered()          # per host; folded like clush -b
        await fleet.push("img.cpio.zst", "/var/cache/megafleet/img.cpio.zst")
        await fleet.call("host.apply", per_host={"node1": manifest1, ...},
                         modules=["megafleet.host"], on_event=lambda host, data: ...)

Every operation returns a `Report` with one `HostResult` per selected host:
status "ok", "failed" (error says why: exit code, timeout, agent lost, checksum)
or "unreachable". Operations never hang: each has a timeout, unreachable hosts
answer at once, and the children of an agent that dies are re-attached to its
parent and served again (a push is replayed from the parent's own copy).

Handlers for `call` are registered by name with `megafleet.gproc.handlers`
(`@handlers.handler("host.apply")`); gproc never imports the engines itself.

Modules: `inventory` (hosts file), `protocol` (frames), `tree` (layout),
`transport` (asyncssh, the only asyncio code), `node` (relay logic shared by the
controller and the agents), `agent` (the agent process), `leaf` (the light agent
of hosts without children), `handlers`, `fleet` (this API), `testfleet`
(namespace hosts with sshd, for tests and bench), `cli`.
"""

from __future__ import annotations

__all__ = ["Fleet", "FleetError", "HostResult", "Report"]


def __getattr__(name: str):
    # Lazy: the agent imports this package and must not pay for trio when it
    # runs as a leaf.
    if name in __all__:
        from megafleet.gproc import fleet
        return getattr(fleet, name)
    raise AttributeError(name)
