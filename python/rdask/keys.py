"""Keys: dask keys (str or tuples) as the strings the scheduler knows, and
deterministic tokens for `pure` calls."""

from __future__ import annotations

import hashlib
import uuid

from dask.base import tokenize
from dask.utils import funcname as _funcname

_SIMPLE = (int, float, str, bytes, bool, type(None))


def key_str(key) -> str:
    """The scheduler's name for a dask key: strings as they are, tuples by repr."""
    if type(key) is str:
        return key
    return repr(key)


def funcname(func) -> str:
    try:
        return _funcname(func)
    except Exception:
        return "task"


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
