"""Former name of the vm engine's spec and API, kept while callers move:
`megafleet.vm.spec` (GuestSpec, NicSpec, validation, BootReport) and
`megafleet.vm.api` (apply, teardown). New code imports those."""

from __future__ import annotations

from typing import Any

from megafleet.vm.spec import *  # noqa: F401,F403
from megafleet.vm.spec import DRIVER_NIC_KINDS, DRIVERS, NIC_KINDS, Progress, percentile  # noqa: F401


def __getattr__(name: str) -> Any:
    # apply/teardown load the engine: only when asked for, as before.
    if name in ("apply", "teardown"):
        from megafleet.vm import api
        return getattr(api, name)
    raise AttributeError(name)
