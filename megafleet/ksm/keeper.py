"""Changing KSM knobs so that they can always be put back.

Before a knob is first changed, its original value is recorded in a small JSON
file in the state directory (record before change, like the ledger). `restore()`
writes the originals back in the kernel's required order and then forgets them.
Because the record survives a crash, the next `megafleet ksm run` (or
`megafleet ksm restore`) puts back what a killed daemon had changed.

The record holds the values from before the *first* change ever made, so a
daemon restarted after a crash does not mistake its predecessor's settings for
the host's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megafleet import paths
from megafleet.ksm.sysfs import KNOB_ORDER, KsmError, KsmSysfs, ordered, validate


def default_record() -> Path:
    return paths.state_dir() / "ksm-originals.json"


class KnobKeeper:
    def __init__(self, sysfs: KsmSysfs, record: Path | None = None):
        self.sysfs = sysfs
        self.record = Path(record) if record else default_record()

    def originals(self) -> dict[str, str]:
        try:
            data = json.loads(self.record.read_text())
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            raise KsmError(f"{self.record}: corrupt record of original KSM knobs "
                           f"(line {e.lineno}: {e.msg}); fix or remove it") from e
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise KsmError(f"{self.record}: expected an object of knob -> value strings")
        return data

    def _save(self, originals: dict[str, str]) -> None:
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(originals, indent=1, sort_keys=True))
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.record)

    def _current(self, knob: str) -> str:
        value = self.sysfs.read_one(knob)
        return str(value)

    def apply(self, settings: dict[str, object]) -> dict[str, str]:
        """Write settings (validated, all-or-nothing permission check first) after
        recording the original of each knob not yet recorded. Returns what was
        written (knobs already at the wanted value are skipped)."""
        wanted = {knob: validate(knob, value) for knob, value in settings.items()}
        current = {knob: self._current(knob) for knob in wanted
                   if (self.sysfs.root / knob).exists()}
        changes = {k: v for k, v in wanted.items() if current.get(k) != v}
        # Leaving the advisor resets pages_to_scan to the kernel default: write
        # the wanted value after it even if it reads as already set now.
        if changes.get("advisor_mode") == "none" and "pages_to_scan" in wanted:
            changes["pages_to_scan"] = wanted["pages_to_scan"]
        if not changes:
            return {}
        self.sysfs.check_can_write(list(changes))
        originals = self.originals()
        fresh = {k: current[k] for k in changes if k not in originals}
        # The advisor resets pages_to_scan when its mode changes: remember it too.
        if "advisor_mode" in changes and "pages_to_scan" not in originals:
            fresh.setdefault("pages_to_scan", self._current("pages_to_scan"))
        if fresh:
            self._save({**originals, **fresh})
        for knob, value in ordered(changes):
            # pages_to_scan is owned by the advisor while it runs: the kernel
            # refuses writes then (EINVAL), so skip it rather than fail.
            if knob == "pages_to_scan" and wanted.get("advisor_mode", self._current_mode()) == "scan-time":
                continue
            self.sysfs.write(knob, value)
        return changes

    def _current_mode(self) -> str:
        if not (self.sysfs.root / "advisor_mode").exists():
            return "none"
        return str(self.sysfs.read_one("advisor_mode"))

    def restore(self) -> dict[str, str]:
        """Put every recorded original back, then forget the record. Tolerates
        knobs that are already at their original value. Returns what was restored."""
        originals = self.originals()
        if not originals:
            return {}
        restored: dict[str, str] = {}
        errors = []
        for knob, value in sorted(originals.items(), key=lambda kv: KNOB_ORDER.index(kv[0])
                                  if kv[0] in KNOB_ORDER else len(KNOB_ORDER)):
            try:
                if self._current(knob) != value:
                    if knob == "pages_to_scan" and self._current_mode() == "scan-time":
                        continue  # cannot be written under the advisor; it owns it
                    self.sysfs.write(knob, value)
                    restored[knob] = value
            except (OSError, KsmError) as e:
                errors.append(f"{knob}={value}: {e}")
        if errors:
            raise KsmError(f"could not restore KSM knobs from {self.record}: " + "; ".join(errors))
        self.record.unlink(missing_ok=True)
        return restored
