"""Parsing the values of properties: sizes, rates, durations, percentages, numbers.
Each returns the value or raises ValueError with a message meant for the user."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+)([KMGT]?)(?:i?B)?", re.I)
_RATE = re.compile(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)?", re.I)
_TIME = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s)", re.I)
_PCT = re.compile(r"(\d+(?:\.\d+)?)%?")

_RATE_MULT = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
              "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def mem_mib(text: str) -> int:
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 64M or 1G)")
    n, unit = int(m.group(1)), (m.group(2) or "M").upper()
    mib = {"K": n / 1024, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]
    if mib < 1 or mib != int(mib):
        raise ValueError(f"invalid size {text!r}: memory is given in whole MiB (at least 1M)")
    return int(mib)


def rate_bit(text: str) -> int:
    m = _RATE.fullmatch(text)
    if not m or m.group(2) is None:
        raise ValueError(f"invalid rate {text!r} (use e.g. 100mbit, 1gbit, 10mbps)")
    bits = float(m.group(1)) * _RATE_MULT[m.group(2).lower()]
    if bits < 8:
        raise ValueError(f"invalid rate {text!r}: too small")
    return int(bits)


def duration_us(text: str) -> int:
    m = _TIME.fullmatch(text)
    if not m:
        raise ValueError(f"invalid duration {text!r} (use e.g. 20ms, 500us, 1s)")
    mult = {"us": 1, "ms": 1000, "s": 1_000_000}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))


def percent(text: str) -> float:
    m = _PCT.fullmatch(text)
    if not m or float(m.group(1)) > 100:
        raise ValueError(f"invalid percentage {text!r} (use e.g. 0.1% or 5%)")
    return float(m.group(1))


def integer(text: str, lo: int, hi: int, what: str) -> int:
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise ValueError(f"invalid {what} {text!r} (a whole number from {lo} to {hi})")
    return int(text)


def fmt_rate(bits: int) -> str:
    return f"{bits}bit"


def fmt_us(us: int) -> str:
    return f"{us}us"
