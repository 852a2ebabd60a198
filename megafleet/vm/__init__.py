"""The per-host VM engine: boot and tear down guests in bulk.

- `manifest`: the API other packages call (`GuestSpec`, `NicSpec`, `apply`,
  `teardown`, `BootReport`).
- `engine`: admission-controlled bulk boot, readiness, retries, teardown, `ls`.
- `admission`: concurrent boots from CPUs and load; the memory budget.
- `state`: the guests table; resources go to the shared ledger (owner "vm").
- drivers: `qemu_driver`, `libvirt_driver`, `container_driver` (+ `nsspawn`).
- `cli`: `megafleet vm boot|ls|stop|kill|teardown`.
"""
