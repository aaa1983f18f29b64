"""Futures inside task arguments and result structures.

On submit, futures nested in the arguments (lists, tuples, dicts, sets) are
replaced by `DepRef(i)` markers and become the task's dependencies; the
worker puts the i-th input value back in their place.
"""

from __future__ import annotations

from .future import Future

_CONTAINERS = (list, tuple, dict, set, frozenset)


class DepRef:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __reduce__(self):
        return DepRef, (self.index,)

    def __repr__(self):
        return f"DepRef({self.index})"


# The walkers below are module-level functions that take their state as
# arguments. A nested recursive closure would be a reference cycle (the
# function holds the cell that holds it) keeping what it closes over (the
# futures found, the gathered values) alive until the cyclic garbage
# collector happens to run: released futures and large results would linger.


def pack_futures(obj, client):
    """(obj with futures replaced, [dependency keys])."""
    deps: list[str] = []
    return _pack(obj, client, deps, {}), deps


def _pack(x, client, deps: list, index: dict):
    t = type(x)
    if isinstance(x, Future):
        if x.client is not client:
            raise ValueError(f"future {x.key!r} belongs to another client")
        skey = x._state.skey
        i = index.get(skey)
        if i is None:
            i = index[skey] = len(deps)
            deps.append(skey)
        return DepRef(i)
    if t is list:
        return [_pack(v, client, deps, index) for v in x]
    if t is tuple:
        return tuple(_pack(v, client, deps, index) for v in x)
    if t is dict:
        return {k: _pack(v, client, deps, index) for k, v in x.items()}
    if t in (set, frozenset):
        return t(_pack(v, client, deps, index) for v in x)
    return x


def unpack_deps(obj, inputs: list):
    """Worker side: DepRef markers -> input values."""
    t = type(obj)
    if t is DepRef:
        return inputs[obj.index]
    if t is list:
        return [unpack_deps(v, inputs) for v in obj]
    if t is tuple:
        return tuple(unpack_deps(v, inputs) for v in obj)
    if t is dict:
        return {k: unpack_deps(v, inputs) for k, v in obj.items()}
    if t in (set, frozenset):
        return t(unpack_deps(v, inputs) for v in obj)
    return obj


def flatten_futures(x) -> list:
    out: list = []
    _flatten_into(x, out)
    return out


def _flatten_into(v, out: list):
    if isinstance(v, Future):
        out.append(v)
    elif isinstance(v, dict):
        for y in v.values():
            _flatten_into(y, out)
    elif isinstance(v, _CONTAINERS):
        for y in v:
            _flatten_into(y, out)


_SKIP = object()


def unpack_structure(x, values: dict, skip: bool = False):
    """Replaces futures by their values; with `skip`, futures without a value
    (failed or cancelled) are left out of lists and dicts."""
    if isinstance(x, Future):  # the common single-future case, without recursion
        return values.get(x._state.skey, _SKIP) if skip else values[x._state.skey]
    return _unpack(x, values, skip)


def _unpack(v, values: dict, skip: bool):
    if isinstance(v, Future):
        return values.get(v._state.skey, _SKIP) if skip else values[v._state.skey]
    if isinstance(v, dict):
        items = ((k, _unpack(y, values, skip)) for k, y in v.items())
        return {k: y for k, y in items if y is not _SKIP}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = [y for y in (_unpack(y, values, skip) for y in v) if y is not _SKIP]
        return items if type(v) is list else type(v)(items)
    return v
