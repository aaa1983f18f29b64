"""Keys: dask keys (str or tuples) as the strings the scheduler knows, and
deterministic tokens for `pure` calls."""

from __future__ import annotations

import hashlib
import uuid

from dask.base import tokenize
from dask.utils import funcname as _funcname

_SIMPLE = (int, float, str, bytes, bool, type(None))


# Keys travel as strings. The encoding must be injective over the key types
# dask allows (str, bytes, int, float, bool, None and tuples of them): two
# distinct keys sharing a name would silently hand one task's result to the
# other. Rules, told apart by the first character:
#   - a tuple is its repr, which starts with "(" (compact and readable in logs);
#   - a str that starts with neither "(" nor ESCAPE is itself (the common case);
#   - any other key (a str starting with "(" or ESCAPE, bytes, numbers, None)
#     is ESCAPE + repr(key); reprs of these types start with a quote, "b'",
#     a digit, "-", "i", "n", "T", "F" or "N", so they never meet each other.
# Inside a tuple every element is a repr, which is injective per type.
ESCAPE = "~"
_NEEDS_ESCAPE = ("(", ESCAPE)


def key_str(key) -> str:
    """The scheduler's name for a dask key (see the rules above)."""
    if type(key) is str:
        if not key.startswith(_NEEDS_ESCAPE):
            return key
    elif type(key) is tuple:
        return repr(key)
    return ESCAPE + repr(key)


def funcname(func) -> str:
    """The name part of a generated key. Never starts with "(" or ESCAPE, so
    keys made from it (also those made in Rust) are their own encoding."""
    try:
        name = _funcname(func)
    except Exception:
        return "task"
    return name.lstrip("(" + ESCAPE) or "task"


def fast_token(base: str, args: tuple) -> str:
    """Token of `args` under `base`: an md5 of the repr for plain scalars
    (a microsecond; `client.map` over 100k items calls this 100k times),
    dask's tokenize for anything else."""
    if all(type(a) in _SIMPLE for a in args):
        text = base + "|" + "|".join(f"{type(a).__name__}:{a!r}" for a in args)
        return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()
    return tokenize(base, *args)


def call_key(func, args: tuple, kwargs: dict, pure: bool) -> str:
    name = funcname(func)
    if not pure:
        return f"{name}-{uuid.uuid4().hex}"
    return f"{name}-{fast_token(tokenize(func, kwargs), args)}"
