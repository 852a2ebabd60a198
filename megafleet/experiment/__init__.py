"""Experiments on a running testbed: verify it, break it, change it, capture it.

The controller side (`control`, `verify`, `schedule`, `cli`) resolves the
language's references (names, ranges, globs, @group, switch -- node) against
the compiled description, then sends concrete link and node names to every host
of the testbed through gproc (or calls the same functions in-process when the
testbed is local). The host side (`hostside`) finds each link's and node's
kernel objects from what `up` recorded on that host (its stored manifest and the
ledger) and acts on them:

- link impairments at runtime: this kernel has no netem, so delay, jitter and
  loss are VDE's wirefilter, changed through its management socket; a link that
  has no wire yet gets one spliced in on the host side (the node's interface,
  its addresses and its routing daemons are untouched); a node -- node link
  (a veth between two namespaces, no host-side end) gets its wire inside the
  two namespaces, tc mirred sending the veth's traffic through it; a
  namespace's port on a VDE switch gets one between its plug and the switch
  (the plug restarted on it, the interface configured again); rate alone is
  tc tbf; a QEMU guest's port on a VDE switch cannot be changed at runtime;
- link down/up: the host-side ends go down (the node sees its carrier go);
- node stop/start/restart/kill: guests through the vm engine (same spec, same
  identity), routers' FRR daemons by recorded pid;
- capture: tcpdump on the host side of a link or on a switch's bridge, as pcap;
- verify: pings from inside the nodes for every `reachable` assertion.

Everything created is recorded in the ledger before it exists (owner "net" for
kernel objects and processes, so `down` removes them with the rest of the
testbed; owner "experiment" for the link settings, shown by `link show` and
`status`).
"""
