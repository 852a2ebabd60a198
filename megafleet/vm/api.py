"""The vm engine's API: bring guests up and take them down (the types they
take and return are in `megafleet.vm.spec`; see its docstring for the contract
of NICs, idempotence and per-guest configuration)."""

from __future__ import annotations

from typing import Any

from megafleet.vm.engine import Engine
from megafleet.vm.spec import BootReport, GuestSpec, Progress


async def apply(specs: list[GuestSpec], *, progress: Progress | None = None,
                **options: Any) -> BootReport:
    """Boot every guest of `specs` that is not already running; see the module
    docstring. Options (all optional): timeout_s (per attempt), retries,
    max_parallel, mem_budget_mb. Raises SpecError or BudgetError before anything
    starts when the specs are wrong or do not fit in memory."""
    return await Engine(**options).apply(specs, progress=progress)


async def teardown(pattern: str = "*") -> list[str]:
    """Stop and remove every guest whose name matches the fnmatch `pattern`, with
    everything recorded for it (processes, domains, sockets, overlays, files).
    Returns the names removed."""
    return await Engine().teardown(pattern)


async def remove(names: set[str] | list[str], ledger: Any = None) -> None:
    """Stop and remove the named guests, all in one engine pass (in parallel),
    with everything recorded for them; names not running are fine. `ledger`: the
    megafleet.ledger.Ledger to use (default: this host's)."""
    engine = Engine(ledger=ledger) if ledger is not None else Engine()
    await engine._remove(set(names))
