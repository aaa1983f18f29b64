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


# Dask's memory thresholds (distributed.worker.memory.*), fractions of the
# worker's memory limit; False/None switches one off.
MEMORY_THRESHOLDS = ("target", "spill", "pause", "terminate")
MEMORY_DEFAULTS = {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}


def parse_fraction(name: str, value):
    """A threshold as Dask's config holds it: a fraction in (0, 1], or
    False / None / 'false' / 'off' for off."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("false", "off", "none", "no", "0"):
            return None
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"memory {name} fraction {value!r} is not a number or 'false'") from None
    value = float(value)
    if value == 0:
        return None
    if not 0 < value <= 1:
        raise ValueError(f"memory {name} fraction must be in (0, 1] or false, got {value}")
    return value


def memory_thresholds(**given) -> dict:
    """The four thresholds: those given (not None) win, then Dask's config
    (`dask.config.set({"distributed.worker.memory.target": 0.5})`, or the
    DASK_DISTRIBUTED__WORKER__MEMORY__TARGET variable), then Dask's defaults."""
    out = {}
    for name in MEMORY_THRESHOLDS:
        value = given.get(name)
        if value is None:
            value = _dask_config(f"distributed.worker.memory.{name}", MEMORY_DEFAULTS[name])
        out[name] = parse_fraction(name, value)
    return out


def _dask_config(key: str, default):
    env = "DASK_" + key.upper().replace(".", "__").replace("-", "_")
    if env in os.environ:
        return os.environ[env]
    try:
        import dask.config
    except ImportError:
        return default
    return dask.config.get(key, default)


def thresholds_tuple(t: dict):
    return tuple(t[name] for name in MEMORY_THRESHOLDS)


def add_memory_flags(p):
    """The thresholds as command-line flags (each also in Dask's config)."""
    for name in MEMORY_THRESHOLDS:
        p.add_argument(f"--memory-{name}-fraction", default=None, metavar="FRACTION",
                       help=f"{name} threshold as a fraction of --memory-limit, or 'false' "
                            f"(default: distributed.worker.memory.{name} from Dask's config, else {MEMORY_DEFAULTS[name]})")


def thresholds_from_args(a) -> dict:
    return memory_thresholds(**{name: getattr(a, f"memory_{name}_fraction") for name in MEMORY_THRESHOLDS})
