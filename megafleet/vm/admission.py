"""Admission control: how many guests may boot at once, and whether a boot fits
in the host's memory at all.

Boot storms are CPU-bound (under TCG a guest kernel burns ~4-5 s of CPU before it
is ready), so starting every guest at once only makes them all slow and starves
the host (minimega issue #3). The engine instead keeps a bounded number of guests
*booting* (started, not yet ready); the bound follows the CPU count and shrinks
(to half at most) while other work keeps more tasks runnable than there are CPUs.

The memory budget is checked before anything starts, with the one memory model
of megafleet: each guest costs its driver's footprint (`megafleet.vm.driver.
DRIVER_KINDS`: a QEMU guest its RAM plus QEMU's overhead, a container a few MiB),
its RAM reduced by the share KSM is expected to merge (`ksm_sharing`, the same
figure `megafleet plan` placed with). So whatever placement puts on a host, that
host's admission accepts when given the same budget and sharing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megafleet.vm import driver as driver_registry

# Guests booting at once per CPU, by how much CPU a boot costs. A TCG boot keeps
# a CPU busy for seconds, but not all the time (timers, calibration waits), so a
# few per CPU keep the CPUs full; a KVM boot mostly waits. A driver with a boot
# kind of its own (a container's init is a few milliseconds of work) says how
# many in its registry entry.
BOOTS_PER_CPU = {"tcg": 4, "kvm": 16, **{k.boot_kind: k.boots_per_cpu for k in driver_registry.DRIVER_KINDS.values()
                                         if k.boot_kind and k.boots_per_cpu}}
MAX_PARALLEL = 256

# Kept for callers that name them; the registry in megafleet.vm.driver is the truth.
QEMU_OVERHEAD_MB = driver_registry.QEMU_OVERHEAD_MB
CONTAINER_MB = driver_registry.CONTAINER_MB


class BudgetError(RuntimeError):
    """A boot that would not fit in the host's memory budget."""


def boots_per_cpu(kind: str) -> int:
    return BOOTS_PER_CPU[kind]


def parallel_boots(kind: str, ncpu: int, others_runnable: float, *,
                   maximum: int | None = None) -> int:
    """How many guests of `kind` ("tcg", "kvm", "container") may be booting now.

    Starts from ncpu * BOOTS_PER_CPU[kind]. `others_runnable` is the number of
    runnable tasks on the host that are not our booting guests: each one beyond
    the CPU count takes one boot away, down to half the full number, so a busy
    host gets room while our boots still progress."""
    per_cpu = BOOTS_PER_CPU[kind]
    ncpu = max(1, ncpu)
    full = per_cpu * ncpu
    overload = max(0.0, others_runnable - ncpu)
    value = max(full // 2, int(round(full - overload)))
    return max(1, min(value, maximum or MAX_PARALLEL))


def host_runnable() -> tuple[int, int]:
    """(CPUs usable by this process, runnable tasks on the host right now).

    The instantaneous count (/proc/loadavg, 4th field) rather than the load
    average: the average lags by a minute and would still count a boot storm
    that has ended."""
    ncpu = len(os.sched_getaffinity(0))
    with open("/proc/loadavg") as f:
        running = int(f.read().split()[3].split("/")[0])
    return ncpu, running


class LoadTracker:
    """Smoothed count of other runnable tasks (exponential average of samples)."""

    def __init__(self, weight: float = 0.3):
        self.weight = weight
        self.value: float | None = None

    def update(self, runnable: int, ours: int) -> float:
        # Minus our own booting guests and the sampling process itself.
        others = max(0.0, float(runnable - ours - 1))
        self.value = others if self.value is None else (
            self.weight * others + (1 - self.weight) * self.value)
        return self.value


def guest_cost_mb(driver: str, mem_mb: int, ksm_sharing: float = 0.0) -> float:
    """Host MiB one guest is charged against the budget: its driver's footprint
    with `ksm_sharing` of its RAM expected to merge."""
    return driver_registry.driver_kind(driver).footprint_mb(mem_mb, ksm_sharing)


@dataclass(frozen=True)
class MemoryPicture:
    total_mb: int
    available_mb: int
    ksm_saved_mb: int


def read_memory(proc_meminfo: Path = Path("/proc/meminfo"),
                ksm_dir: Path = Path("/sys/kernel/mm/ksm")) -> MemoryPicture:
    info = {}
    for line in proc_meminfo.read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0])  # kB
    try:
        sharing = int((ksm_dir / "pages_sharing").read_text())
    except (OSError, ValueError):
        sharing = 0
    page = os.sysconf("SC_PAGE_SIZE")
    return MemoryPicture(total_mb=info["MemTotal"] // 1024,
                         available_mb=info.get("MemAvailable", info["MemFree"]) // 1024,
                         ksm_saved_mb=sharing * page // (1 << 20))


def default_budget_mb(memory: MemoryPicture) -> int:
    """90% of the host's RAM: the rest is for the host itself."""
    return memory.total_mb * 9 // 10


def check_budget(new: list[tuple[str, str, int]], running: list[tuple[str, int]],
                 budget_mb: int, memory: MemoryPicture, *, ksm_sharing: float = 0.0,
                 budget_option: str = "--mem-budget or MEGAFLEET_VM_MEM_BUDGET") -> int:
    """Refuse (BudgetError) a boot of `new` guests [(name, driver, mem_mb)] when,
    together with the `running` guests [(driver, mem_mb)], they would exceed
    `budget_mb`. Each guest costs its driver's footprint with `ksm_sharing` of its
    RAM expected to merge (as placement counts it); for the running guests, what
    KSM saves now is credited instead when it is more. `budget_option` is how the
    user of the calling command sets the budget (named in the error). Returns the
    MiB the boot needs."""
    need = sum(guest_cost_mb(d, m, ksm_sharing) for _, d, m in new)
    full = sum(driver_registry.driver_kind(d).full_mb(m) for d, m in running)
    expected = sum(guest_cost_mb(d, m, ksm_sharing) for d, m in running)
    committed = max(0.0, min(expected, full - memory.ksm_saved_mb))
    total = committed + need
    # A rounding tolerance: placement sums the same floats in another order.
    if total > budget_mb + 0.5:
        sharing = f", counting {ksm_sharing:.0%} of guest RAM shared by KSM" if ksm_sharing else ""
        raise BudgetError(
            f"refusing to boot {len(new)} guest(s): they need {need:.0f} MiB{sharing}; with "
            f"the {committed:.0f} MiB of the {len(running)} guest(s) already running (KSM saves "
            f"{memory.ksm_saved_mb} MiB now), that is {total:.0f} MiB, over the host's memory "
            f"budget of {budget_mb} MiB (set another with {budget_option}, in MiB). "
            f"Nothing was started.")
    return round(need)
