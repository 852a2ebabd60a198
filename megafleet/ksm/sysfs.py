"""Reading and writing the kernel's KSM interface, /sys/kernel/mm/ksm.

Which files exist depends on the kernel (the scan-time advisor arrived in 6.8,
`smart_scan` and `pages_skipped` in 6.7, `ksm_zero_pages` in 6.5...), so nothing
here assumes a file exists: counters are whatever read-only files the directory
holds, knobs are the writable ones we know how to validate.

ksmd's CPU time comes from /proc: the kernel thread whose comm is "ksmd" and whose
flags carry PF_KTHREAD. We only ever read it; it is never signalled.

The root of the sysfs directory and of /proc are parameters so that the pure
tests can run against a temporary directory; everything else uses the real ones.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KSM_ROOT = Path("/sys/kernel/mm/ksm")
PROC_ROOT = Path("/proc")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PF_KTHREAD = 0x00200000  # include/linux/sched.h


class KsmError(RuntimeError):
    """Something about KSM the user must fix (missing, not writable...)."""


class KnobError(ValueError):
    """A knob name or value that is not acceptable; names the knob and why."""


# --- knob validation -------------------------------------------------------------

def _int_range(low: int, high: int) -> Callable[[str, str], str]:
    def check(knob: str, value: str) -> str:
        text = str(value).strip()
        if not re.fullmatch(r"\d+", text):
            raise KnobError(f"{knob}={value!r}: must be a whole number from {low} to {high}")
        number = int(text)
        if not low <= number <= high:
            raise KnobError(f"{knob}={number}: out of range, must be from {low} to {high}")
        return str(number)
    return check


def _choice(*choices: str) -> Callable[[str, str], str]:
    def check(knob: str, value: str) -> str:
        text = str(value).strip()
        if text not in choices:
            raise KnobError(f"{knob}={value!r}: must be one of {', '.join(choices)}")
        return text
    return check


UINT_MAX = 2**32 - 1

# The knobs we set, each with its validator. Ranges are what the kernel accepts,
# narrowed where a value would be harmful (sleep_millisecs=0 makes ksmd spin).
# merge_across_nodes is deliberately absent: it can only change while nothing is
# merged and it changes NUMA placement; it is not a tuning knob.
KNOBS: dict[str, Callable[[str, str], str]] = {
    "run": _choice("0", "1", "2"),
    "pages_to_scan": _int_range(1, UINT_MAX),
    "sleep_millisecs": _int_range(1, 3_600_000),
    "max_page_sharing": _int_range(2, 1_000_000),
    "use_zero_pages": _choice("0", "1"),
    "smart_scan": _choice("0", "1"),
    "stable_node_chains_prune_millisecs": _int_range(1, UINT_MAX),
    "advisor_mode": _choice("none", "scan-time"),
    "advisor_max_cpu": _int_range(1, 100),
    "advisor_target_scan_time": _int_range(1, UINT_MAX),
    "advisor_min_pages_to_scan": _int_range(1, UINT_MAX),
    "advisor_max_pages_to_scan": _int_range(1, UINT_MAX),
}

# Restore and apply order matters: writing advisor_mode resets pages_to_scan, and
# pages_to_scan cannot be written while the advisor is on; `run` goes last so
# ksmd starts with the final settings.
KNOB_ORDER = [
    "advisor_mode", "advisor_max_cpu", "advisor_target_scan_time",
    "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
    "max_page_sharing", "use_zero_pages", "smart_scan",
    "stable_node_chains_prune_millisecs", "pages_to_scan", "sleep_millisecs", "run",
]


def validate(knob: str, value: object) -> str:
    """The canonical text to write for knob=value, or KnobError naming what is wrong."""
    if knob not in KNOBS:
        raise KnobError(f"unknown KSM knob {knob!r}: settable knobs are {', '.join(sorted(KNOBS))}")
    return KNOBS[knob](knob, str(value))


def parse_assignment(text: str) -> tuple[str, str]:
    """'KNOB=VALUE' -> (knob, validated value)."""
    if "=" not in text:
        raise KnobError(f"{text!r}: expected KNOB=VALUE, e.g. pages_to_scan=1000")
    knob, value = text.split("=", 1)
    return knob.strip(), validate(knob.strip(), value)


def ordered(settings: dict[str, str]) -> list[tuple[str, str]]:
    """settings in the order in which they must be written."""
    return sorted(settings.items(), key=lambda kv: KNOB_ORDER.index(kv[0]))


def _parse_value(text: str) -> int | str:
    text = text.strip()
    # advisor_mode reads "[none] scan-time": the bracketed one is selected.
    chosen = re.search(r"\[([^\]]+)\]", text)
    if chosen:
        return chosen.group(1)
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


# --- reading -----------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """One reading of the whole KSM directory plus ksmd's CPU time."""

    counters: dict[str, int | str]      # read-only files
    knobs: dict[str, int | str]         # writable files
    ksmd_cpu_s: float | None            # None when ksmd cannot be found

    def get(self, name: str, default: int = 0) -> int:
        value = self.counters.get(name, self.knobs.get(name, default))
        return value if isinstance(value, int) else default

    @property
    def saved_bytes(self) -> int:
        """Memory KSM saves: every page mapped to a shared KSM page beyond the
        first, plus pages merged into the kernel's zero page (use_zero_pages)."""
        return (self.get("pages_sharing") + self.get("ksm_zero_pages")) * PAGE_SIZE

    @property
    def saved_mb(self) -> float:
        return self.saved_bytes / 2**20

    @property
    def sharing_ratio(self) -> float | None:
        """pages_sharing / pages_shared: how many sites share each KSM page."""
        shared = self.get("pages_shared")
        return self.get("pages_sharing") / shared if shared else None


class KsmSysfs:
    """The KSM directory of this host (or a stand-in directory in pure tests)."""

    def __init__(self, root: Path | str = KSM_ROOT, proc: Path | str = PROC_ROOT):
        self.root = Path(root)
        self.proc = Path(proc)
        self._ksmd: tuple[int, str] | None = None  # pid and its stat start time

    def available(self) -> bool:
        return (self.root / "run").is_file()

    def require(self) -> None:
        if not self.available():
            raise KsmError(f"{self.root}: no KSM here (kernel built without CONFIG_KSM, "
                           "or sysfs not mounted)")

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def writable(self, name: str) -> bool:
        """Whether this file is a knob the kernel lets root write (mode bit),
        independent of who we are."""
        try:
            return bool((self.root / name).stat().st_mode & 0o200)
        except FileNotFoundError:
            return False

    def read_one(self, name: str) -> int | str:
        return _parse_value((self.root / name).read_text())

    def read(self) -> Snapshot:
        self.require()
        counters: dict[str, int | str] = {}
        knobs: dict[str, int | str] = {}
        for name in self.names():
            try:
                value = self.read_one(name)
            except OSError:
                continue  # a file the kernel refuses to read: skip, do not guess
            (knobs if self.writable(name) else counters)[name] = value
        return Snapshot(counters, knobs, self.ksmd_cpu_s())

    # --- writing -------------------------------------------------------------------

    def check_can_write(self, knobs: list[str]) -> None:
        """Raise KsmError unless every knob exists here and can be written by us,
        so that a change is either applied whole or not started at all."""
        self.require()
        for knob in knobs:
            validate(knob, _example_value(knob))
            path = self.root / knob
            if not path.exists():
                raise KsmError(f"{path}: this kernel has no KSM knob {knob!r}")
            if not self.writable(knob) or not os.access(path, os.W_OK):
                raise KsmError(f"{path}: permission denied; setting KSM knobs needs root "
                               "(and sysfs mounted read-write). Nothing was changed.")

    def write(self, knob: str, value: object) -> None:
        text = validate(knob, value)
        path = self.root / knob
        try:
            with open(path, "w") as f:
                f.write(text)
        except PermissionError as e:
            raise KsmError(f"{path}: permission denied writing {text!r}; needs root") from e
        except OSError as e:
            raise KsmError(f"{path}: the kernel refused {knob}={text} ({e.strerror})") from e

    # --- ksmd ----------------------------------------------------------------------

    def _stat(self, pid: int) -> list[str] | None:
        try:
            raw = (self.proc / str(pid) / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        # comm may hold spaces or ')': split after the last ')'
        return [raw[: raw.rindex(")") + 1]] + raw[raw.rindex(")") + 2:].split()

    def ksmd_pid(self) -> int | None:
        """ksmd's pid: comm 'ksmd' and a kernel thread (PF_KTHREAD), so a user
        process that calls itself ksmd is never mistaken for it."""
        if self._ksmd is not None:
            pid, start = self._ksmd
            fields = self._stat(pid)
            if fields is not None and fields[20] == start:
                return pid
            self._ksmd = None
        for entry in self.proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() != "ksmd":
                    continue
            except OSError:
                continue
            fields = self._stat(int(entry.name))
            # fields[0] is "pid (comm)"; then state=1, ppid=2, ..., flags=7
            if fields is None or not int(fields[7]) & PF_KTHREAD:
                continue
            self._ksmd = (int(entry.name), fields[20])
            return int(entry.name)
        return None

    def ksmd_cpu_s(self) -> float | None:
        """User plus system CPU seconds ksmd has used since boot."""
        pid = self.ksmd_pid()
        if pid is None:
            return None
        fields = self._stat(pid)
        if fields is None:
            return None
        # utime and stime are fields 14 and 15 of stat (1-based): here 12 and 13
        return (int(fields[12]) + int(fields[13])) / CLOCK_TICKS


def _example_value(knob: str) -> str:
    return {"run": "0", "advisor_mode": "none", "max_page_sharing": "2",
            "use_zero_pages": "0", "smart_scan": "0"}.get(knob, "1")


# --- host memory ---------------------------------------------------------------

GUEST_COMMS = ("qemu-system",)   # comm is cut to 15 bytes: "qemu-system-x86"


def guest_rss_kb(proc: Path | str = PROC_ROOT) -> int:
    """Resident memory of all QEMU processes on this host, in kB: the memory KSM
    can merge for guests (QEMU marks guest RAM mergeable). Host-wide anonymous
    memory would also count builds and tools that KSM cannot help with."""
    proc = Path(proc)
    total_pages = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith(GUEST_COMMS):
                continue
            total_pages += int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return total_pages * PAGE_SIZE // 1024

def meminfo(proc: Path | str = PROC_ROOT) -> dict[str, int]:
    """/proc/meminfo in kB (MemTotal, MemAvailable, AnonPages, ...)."""
    out: dict[str, int] = {}
    for line in (Path(proc) / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out
