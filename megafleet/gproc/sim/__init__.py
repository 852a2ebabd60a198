"""A simulator of the gproc control plane at sizes no test machine has.

Everything is the real code (the compiler, placement, manifest split, `Fleet`,
`Node`, the agents' `run_agent`, the frame protocol, progress coalescing)
except two parts, both replaced here and named as simulations:

* the wire: `links.SimNetwork` stands in for SSH. A connect starts the real
  agent code for that host as a trio task on an in-memory duplex link whose
  two directions each have a latency, a bandwidth (a frame occupies the link
  for size / bandwidth) and a per-byte receive cost (decoding, calibrated on
  this machine); hosts can be made dead (connections refused) or killed
  (their agent ends, its parent sees the session close);
* each host's work: `hosts.SimHosts` registers simulation handlers for the
  names `megafleet.host` serves (`host.probe`, `host.apply`, `host.down`,
  `host.status`). Apply sleeps a guest boot-time distribution measured on this
  machine (bench/RESULTS.md, boot), fails a given fraction of guests and
  answers with the same result shape a real host gives.

Run under trio's `MockClock(autojump_threshold=0)`, the simulated time is the
time the wire and the boots take; CPU spent in this one process is not
counted (every host has its own CPU in the cluster it stands for), which is
why every figure it gives is labelled "simulated".

Nothing here is imported by the product: only bench/million.py and the tests.
"""
