"""netlang: the megafleet network description language (`*.fleet`).

Grammar reference
=================

A description is a list of statements, one per line (or separated by `;`).
`#` starts a comment; a `\\` at the end of a line continues it. Words are
separated by spaces; quoted strings ("...") are paths. Statements about one node
may carry a `{ ... }` block whose lines are more properties of that node.

Names and counts
----------------
A name starts with a letter, then letters, digits, `_`, `-`, `.` (at most 63).
`NAME[A..B]` declares B-A+1 names: `web[1..1000]` is web1 ... web1000;
`r[01..10]` pads to the width of the first number (r01 ... r10); a suffix may
follow the range (`h[1..3]x`). Nodes and switches share one namespace.
Limit: a description declares at most 1,000,000 names (nodes of all ranges
together); a range over it is refused with its file:line before anything is
built. The environment variable MEGAFLEET_MAX_NAMES sets another limit.
The testbed's name (`-N`, else derived from the file name the same way by
`up` and `net up`: a stem of at most 8 letters and digits as it is, a longer
one cut to 5 plus 3 characters of a hash of the whole stem) has at most 8
characters: it prefixes every interface (at most 15 bytes, Linux's limit) and
namespace the testbed creates. Generated interface names never collide: each is
allocated once per testbed (readable when it fits, hashed otherwise, re-hashed
on a clash) and checked unique; a name already present on a host is refused.
A testbed name taken on a host by another description is refused by `up` and
`net up` alike.

References (anywhere a statement names other things) may be a name, a range
(`web[1..10]`, every name must exist), a glob (`lan*`, `r?`) or `@GROUP` (every
member of a group).

Parameters and includes
-----------------------
    param NAME = VALUE        a default; `-D NAME=VALUE` on the command line wins
    ... $NAME ...             substituted inside any word: `host h[1..$n] on lan1`
    include "FILE"            relative to the including file; cycles are errors

Images
------
    image NAME from "PATH"    an image spec (imagegen TOML) for vm nodes

Address pools
-------------
    pool NAME CIDR [per /LEN]
The first pool of each family (IPv4, IPv6) is its default. Switches take one
subnet of LEN (default /24 for IPv4, /64 for IPv6) from the default pool of each
declared family; point-to-point links take a /30 (IPv4) and /126 (IPv6).
Explicit subnets anywhere are skipped by pools; pools may not overlap.

Switches
--------
    switch REF [subnet CIDR|POOL|auto|none]... [mtu N] [vde]
`subnet` may be repeated (one per family). Without `subnet`: `auto` when a pool
exists; otherwise the subnet is derived from the explicit addresses (with prefix
length) of the interfaces on it, or the switch is layer 2 only. `vde` runs the
switch as a vde_switch process instead of a Linux bridge. A switch with VLANs is
one layer-2 network per VLAN; `subnet CIDR` describes its untagged network, each
VLAN gets an automatic subnet.
Limits: `mtu` 68-65535. Ports: a Linux bridge takes at most 1,023; a switch (or
one VLAN of it) with more is built as a tree of bridges with no change to the
description (a root bridge and leaves sharing the ports evenly, about 256 ports
each while the root has room for that many leaves and at most 1,022 ports, each
leaf joined to the root by a veth; switch links and VXLAN tunnels stay on the
root), up to 1,022,000 ports per switch and VLAN; more is refused by `net
check` with the switch's line. A broadcast on a big switch is one copy per
port at once, so `up` raises the host's net.core.netdev_max_backlog (default
1,000) to twice the largest switch while the testbed is up, and the neighbour
(ARP/NDP) table, one for all namespaces and 1,024 entries by default, to four
entries per port (gc_thresh3); both are put back on `down`.

Nodes
-----
    host   REF [on ATTACH]... [route CIDR via ADDR]... [exec "CMD"]...
    vm     REF image NAME [mem SIZE] [vcpus N] [driver qemu|libvirt|container] [on ATTACH]...
    router REF [on ATTACH]... [ospf [OSPF-PROPS]] [bgp [as] N] [route CIDR via ADDR]...
           [exec "CMD"]... [image NAME [mem SIZE] [vcpus N] [driver D]]   (with an image: a VM router)
A block form puts properties on their own lines; `iface` is a synonym of `on`:

    router gw {
      iface core 10.0.0.1/24
      iface lan* auto          # one interface per matching switch
      ospf area 0
      exec "ip addr add 192.0.2.1/32 dev lo"
    }

ATTACH is `SWITCH-REF [ADDRESS|auto|none]... [vlan N] [LINK-PROPS]`:

- no address or `auto`: an address from each subnet of that network; `none`:
  no address (layer 2 only);
- an explicit address `10.0.0.10` (or `10.0.0.10/24`, `fd00::10/64`): for a
  counted group, the first address; members get consecutive ones;
- `vlan N` (1-4094): an access port in VLAN N, isolated from the switch's other
  VLANs (each VLAN is its own bridge on the host);
- LINK-PROPS: `rate 100mbit` (tbf), `delay 20ms`, `jitter 2ms`, `loss 0.1%` (netem),
  `mtu N` (68-65535, must equal the switch's MTU). Delay, jitter and loss on a
  vm's port are refused (a guest's NIC cannot join the VDE wire that carries
  them); so are rate and impairments on a vm's port of a VDE switch, and a
  libvirt or container vm on a VDE switch (those drivers have no VDE NIC).

Startup commands
----------------
    exec "CMD"                on a host or a namespace router; repeatable
`net up` (and `up` on each host) runs a node's commands in order once its
network is built and the routing daemons are started, inside the node's network
namespace (`ip netns exec NS ARGV...`, as root; mounts, files and processes are
the host's), every node's at the same time; containerlab's `exec` becomes this.
CMD is split into argv like a POSIX shell splits words (Python's `shlex`:
quotes with `'`, backslash escapes), and argv[0] is run directly: never through
a shell, so pipes, redirections, `&&`, globs and variables are not interpreted
unless the command itself is a shell (`exec "sh -c 'echo 1 > /tmp/x'"`, the
description's own choice). Each command is waited for up to 10 s
(MEGAFLEET_EXEC_WAIT_S): one that exits non-zero, or cannot be started, stops
`net up` with the node, the command, its exit status, the end of its output and
the statement's file:line (the testbed stays as built for `net down`); one still
running then is a long-lived process (a server): recorded in the ledger, left
running, stopped by `down` (a daemon a command forks off is stopped by `down`
too: it runs in the node's namespace). Output goes to
RUN_DIR/net/TESTBED/exec/NODE.log.
A command runs when the testbed is built, not again when an unchanged testbed
is brought up again; a changed description (`megafleet up` of an edited file)
runs the commands that are new.
Limits: CMD is one quoted word, so it cannot hold `"` or a line break (quote
inside it with `'`); `$NAME` in it is a parameter, substituted as anywhere (a
literal `$` before a letter cannot be written); not on vms nor on routers with
an image (no namespace of theirs on the host: their image's services run there).
A group may give `exec` as a default: its hosts and routers run it before their
own commands.

Groups with defaults
--------------------
    group NAME [PROPERTY...] {
      vm web[1..100]           # takes the group's image, mem, ...: its own win
      host probe on lan2
    }
Defaults apply to each member where its kind accepts them; `@NAME` refers to
all members.

Links
-----
    link REF [ADDR...] -- REF [ADDR...] [LINK-PROPS] [vlan N[,M...]] [subnet CIDR|POOL|auto|none]
- switch -- switch: the two become one layer-2 network (a veth between bridges);
  with `vlan 10,20` a tagged trunk carrying those VLANs (ids 1-4094, each
  once; a VLAN no port uses is still carried). Links that close a loop of
  switches (in one VLAN) are refused: bridges run no spanning tree. VDE switches
  take no links;
- node -- switch: one more interface on that node (like `on`);
- node -- node: a point-to-point link with its own /30 (and /126), addresses
  explicit or automatic. Patterns on both sides link every pair. The same pair
  linked twice is two links (two interfaces on each). Not to a vm: put it on
  a switch.
- `NODE:IFNAME` on either side (`link r1:e1-1 -- r2:eth3`) names that node's
  interface (at most 15 bytes; hosts and routers only, one node, unique within
  it); unnamed interfaces are eth0, eth1, ... by their order (imported
  containerlab, netlab and GNS3 labs keep their interface names this way).
Delay, jitter, loss and rate apply in each direction: a `delay 50ms` link adds
100 ms to a ping's round trip. (Delay, jitter and loss run through VDE's
wirefilter on this host, whose kernel has no netem; rate is tc tbf.)

Routing
-------
Hosts and vms get a default gateway: the first router on the first of their
networks that has one (IPv4 and IPv6 separately). Routers without `ospf` or
`bgp` get static routes computed from the graph, on shortest paths. Where
routers and networks form a tree (per address family; racks under pods under a
spine), a router gets a default route toward the tree's center (the router
above it), a route to each network below each other router of its upstream
network and below each router under it, and no route to what lies beyond its
default; the center's routers have no default, so a packet to an address
outside the testbed stops there. Prefixes going the same way are merged
(10.0.0.0/24 and 10.0.1.0/24 into 10.0.0.0/23) when the tree has more than 256
networks. Anywhere else (a ring, a mesh), and on a router given its own `route
default`, a router gets a route to every subnet it is not on, via the first
router on a shortest path. `ospf` runs FRR's ospfd on every
IPv4 interface of the router and ospf6d on every IPv6 one (hello 1 s, dead 4 s,
point-to-point on links, passive on a network no other router is on, connected
networks redistributed); `bgp AS` runs bgpd,
peering with every other BGP router on a shared network, over IPv4 where both
have an IPv4 address there and over IPv6 where both have an IPv6 one (each
session carries its own family, so IPv6-only and dual-stack links announce
IPv6 prefixes too). A router is
a network namespace, or a VM when given an image (on switches only): the guest
forwards, gets its static routes on the kernel command line, and with `ospf` or
`bgp` the generated FRR configuration is written into it and its daemons
started there through the guest's exec channel (the image must hold FRR, as
examples/images/router.toml does).

OSPF-PROPS, in any order after `ospf`:

    area N | A.B.C.D          the area of all its interfaces (default 0)
    cost N                    interface cost, 1-65535
    hello S   dead S          hello and dead intervals, whole seconds (`10` or
                              `10s`), 1-65535; dead > hello. Only hello: dead =
                              4 x hello; only dead: hello = dead / 4 (at least 1)
    spf DELAY HOLD MAX        SPF throttle, durations in whole ms (`200ms 1s 10s`),
                              each <= 600000 ms, DELAY <= HOLD <= MAX
    lsa T                     LSA pacing: the shortest interval between two
                              originations of one LSA and between two arrivals
                              of one LSA that are accepted (<= 5000 ms)
    daemon frr|bird|auto      which routing daemon runs OSPF (below)

Timers not given scale with the number of OSPF routers N in the description
(`megafleet.netlang.ospftimers`): N <= 50 keeps hello 1 s, dead 4 s and the
daemon's SPF/LSA defaults; above, hello = ceil(N/75) s (at most 10), dead 4x,
SPF delay/hold/max = min(N, 1000) ms / min(5N, 5000) ms / 10 s, LSA 1000 ms.
Explicit values always win. A bad value is an error with file:line.

`daemon`: FRR (zebra + ospfd, + ospf6d with IPv6) or BIRD 2 (one `bird`
process per router doing OSPFv2 and OSPFv3, its routes exported to the
router's kernel table). `auto` (the default) picks BIRD for namespace routers
without `bgp` when the description has 200 or more OSPF routers, FRR otherwise:
on a 2-core host 750 BIRD routers start and converge in about a minute and a
half, where 1,500 FRR daemons take several minutes just to start. `daemon bird`
is refused on routers with an image (VM routers run their image's FRR) or with
`bgp`. BIRD takes hello, dead and cost as they are; `spf` becomes its `tick`
(SPF at most once per HOLD, rounded up to whole seconds); it has no LSA pacing
setting (RFC 2328's fixed intervals), so `lsa` does not apply to it.

Routers start with admission control: at most 2 x CPUs routers starting at
once, and none while the host has more than 2 x CPUs runnable threads (on a
busy host nearly one by one, which converges best), with a progress line every 5 s
(`megafleet.netlang.routers`). `down` kills a testbed's routing daemons all at
once (no graceful stop: it would make the routers still running recompute).

Assertions
----------
    reachable A B             every node of A can reach every node of B
Checked when compiling, per address family (it holds when IPv4 or IPv6
carries every pair): the nodes share a network addressed in that family, or
both have gateways in one routed component of that family (networks joined by
routers with addresses of that family). It is reported as unprovable, with the
assertion's line, when that component's routers learn routes in different ways
(static, OSPF, BGP: nothing is redistributed between them), or when more than
two BGP routers in it share an AS (no iBGP full mesh or route reflector is
generated).
`megafleet up` then checks every assertion live, once the guests are ready:
a ping from inside each node of A to the first address (per family) of each
node of B, repeated until routing has converged (at most 60 s); failures are
listed with the assertion's file:line and make `up` exit 1. `megafleet verify`
runs the same checks at any time (`megafleet.experiment.verify`).

Fault schedules
---------------
    at +30s link r1 -- r2 down          once, 30 s after `up` returned
    at +60s link r1 -- r2 up
    at +45s node web[1..10] restart     stop, start, restart or kill
    every 20s for 2m link core* loss 5% at +0, +20 s, ... while before +2 min
    every 30s for 5m from +10s node r2 restart
Times: 500ms, 30s, 2m, 1h (a leading + is allowed). A link is `A -- B` (node --
switch, node -- node, switch -- switch) or `A` alone (every link of A), with
the usual references; its action is `down`, `up` or settings (`delay D`,
`jitter J`, `loss P%`, `rate R`; `none` removes one). References and links are
checked at compile time (file:line); `every` needs `for` (a schedule ends).
`megafleet up` starts the schedule in the background when it returns (or run
it with `megafleet run-schedule`); each action is a `fault` event in telemetry
(`megafleet telemetry events --kind fault`). Delay, jitter and loss on a running
link are VDE wirefilter (this kernel has no netem), spliced into the link's host
side; on a node -- node link only rate can change at runtime
(`megafleet.netlang.faults`, `megafleet.experiment`).

Compilation
-----------
parse (lark, LALR) -> declarations (names expanded) -> wiring (layer-2 networks,
interfaces) -> addressing (explicit, overlaps, pools) -> routes and checks ->
networkx graph. Every error has file:line:col, the line and a caret; all are
reported at once. See `megafleet.netlang.compiler.compile_file`.
"""

from megafleet.netlang.compiler import compile_file, compile_text  # noqa: F401
from megafleet.netlang.errors import CompileError  # noqa: F401
