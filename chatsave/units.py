"""Sizes (``5MB``, ``400KiB``) and durations (``90s``, ``10m``, ``30d``) as people write them."""

from __future__ import annotations

import re
from datetime import timedelta

from chatsave.errors import UsageError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40,
}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``text``: ``5MB`` is 5*10^6, ``400KiB`` is 400*2^10; a bare number is bytes."""
    match = _SIZE.fullmatch(text or "")
    unit = (match[2] or "").lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise UsageError(f"{what}: not a size: {text!r}",
                         hint="write sizes like 5MB (10^6 bytes), 400KiB (2^10) or 1500000")
    return int(float(match[1]) * _SIZE_UNITS[unit])


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """A duration: ``90s``, ``10m``, ``12h``, ``30d``, ``2w``; a bare number is seconds."""
    match = _DURATION.fullmatch(text or "")
    if not match:
        raise UsageError(f"{what}: not a duration: {text!r}",
                         hint="write durations like 90s, 10m, 12h, 30d or 2w")
    return timedelta(seconds=float(match[1]) * _DURATION_UNITS[(match[2] or "s").lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
