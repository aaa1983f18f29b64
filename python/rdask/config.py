"""Parsing the values Dask users type: memory limits and resources."""

from __future__ import annotations

import os
import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def parse_memory_limit(value, nworkers: int = 1, total: int | None = None) -> int:
    """'auto' (total / nworkers), 0/None (no limit), a fraction of total
    memory (0.5), a byte count (4e9) or a string with units ('4GiB', '500MB')."""
    total = total_memory() if total is None else total
    if value is None:
        return 0
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return total // max(1, nworkers)
        if v in ("0", "none", ""):
            return 0
        m = re.fullmatch(r"([0-9.e+]+)\s*([a-z]*)", v)
        if not m or m.group(2) not in _UNITS:
            raise ValueError(f"cannot parse memory limit {value!r} (try '4GiB', '500MB', 0.5 or 'auto')")
        number = float(m.group(1))
        if m.group(2) == "" and number <= 1:
            return int(total * number)
        return int(number * _UNITS[m.group(2)])
    value = float(value)
    if value < 0:
        raise ValueError(f"memory limit must not be negative: {value}")
    if 0 < value <= 1:
        return int(total * value)
    return int(value)


def parse_resources(text) -> dict:
    """'GPU=1 MEMORY=10e9' or 'GPU=1,FOO=2' -> {'GPU': 1.0, 'MEMORY': 1e10}."""
    if not text:
        return {}
    if isinstance(text, dict):
        return {str(k): float(v) for k, v in text.items()}
    out = {}
    for part in re.split(r"[\s,]+", text.strip()):
        if not part:
            continue
        name, sep, amount = part.partition("=")
        if not sep or not name:
            raise ValueError(f"bad resource {part!r}: expected NAME=AMOUNT, e.g. GPU=1")
        try:
            out[name] = float(amount)
        except ValueError:
            raise ValueError(f"bad resource amount in {part!r}") from None
    return out
