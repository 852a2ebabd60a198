"""KSM for fleets of similar guests: read and set /sys/kernel/mm/ksm, a tuning
policy (a pure function of observations), and the per-host daemon.

For other packages:

* vm engine — `from megafleet.ksm.daemon import send_event`;
  `send_event("boot", n)` before a bulk boot of n guests, `send_event("teardown", n)`
  after tearing guests down. Returns False (no error) when no daemon runs.
  In-process: `Daemon.announce_boot(n)` / `announce_teardown(n)`.
* collect — `async for sample in megafleet.ksm.daemon.samples(interval): ...`
  (read only; dicts with saved_mb, sharing_ratio, ksmd_cpu_s, ksmd_cpu_pct,
  counters, knobs), or `Daemon(on_sample=callback)` for the daemon's samples,
  which add the policy's mode and reason.
* host — `await nursery.start(Daemon().run)`; cancelling it restores the host's
  original knobs.
"""

from pathlib import Path as _Path


def socket_path() -> _Path:
    """Where the host's KSM daemon listens for boot and teardown events. Here,
    not in `daemon`: the vm engine looks for it before each bulk boot, and the
    daemon module (its policy and keeper) is a tenth of a small `up`'s imports."""
    from megafleet import paths
    return paths.run_dir() / "ksm.sock"
