"""An idle QEMU guest costs about what its kernel costs: with the default agent
and the exec channel (served by one process that never forks while idle), its
QEMU process uses at most 1.5x the CPU of the same image booted without them
(`megafleet.agent=0`, no exec port), both measured over the same 20 s."""

from __future__ import annotations

import pytest
import trio

from megafleet.ledger import Ledger
from megafleet.vm import idlecpu

from .vmhelpers import qemu_pids

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_idle_guest_with_agent_costs_at_most_1_5x_one_without(tiny):
    result = trio.run(lambda: idlecpu.measure_idle(tiny, seconds=20.0, settle=10.0, prefix="mfvidle"))
    detail = (f"agent {result.percent(result.agent_cpu_s):.2f} % vs bare "
              f"{result.percent(result.bare_cpu_s):.2f} % of a core over {result.seconds:.1f} s")
    assert result.seconds >= 20.0
    assert result.bare_cpu_s > 0, detail       # the reference guest was measured, running
    assert result.ratio <= 1.5, detail
    # Both guests are stopped and forgotten.
    assert qemu_pids("mfvidle") == []
    assert Ledger().list(owner=idlecpu.LEDGER_OWNER) == []
