"""How values, task payloads and errors travel.

Values: pickle protocol 5 with out-of-band buffers, so the buffers of numpy
arrays and pandas frames become separate data frames sent with no extra
copy; cloudpickle is the fallback for what plain pickle refuses (lambdas,
locally defined classes). Task payloads are pickled tuples (see
`rdask.worker.execute`). Errors travel as the pickled exception plus its
formatted traceback.
"""

from __future__ import annotations

import io
import pickle
import traceback
import types
from typing import Any

import cloudpickle

from dask.sizeof import sizeof

from . import device

HIGHEST = 5


def dumps(obj: Any) -> list:
    """Object -> [header, *buffers] (buffers are zero-copy views); with
    device arrays in it, [marked header, *buffers, *device frames]
    (`rdask.device`)."""
    if device.possible():
        return device.dumps(obj, _host_frames)
    buffers: list = []
    try:
        header = pickle.dumps(obj, protocol=HIGHEST, buffer_callback=buffers.append)
        if b"__main__" in header:
            raise pickle.PicklingError("refers to __main__")
    except Exception:
        buffers = []
        header = cloudpickle.dumps(obj, protocol=HIGHEST, buffer_callback=buffers.append)
    return _host_frames(header, buffers)


def dumps_staged(obj: Any):
    """For a worker sending a device value to a peer: its frames but for its
    device arrays, which the worker copies off the device in chunks while it
    sends (`rdask.device.dumps_staged`); None when there are none."""
    return device.dumps_staged(obj, _host_frames) if device.possible() else None


def _host_frames(header, buffers: list) -> list:
    frames = [header]
    for b in buffers:
        try:
            frames.append(b.raw())
        except BufferError:  # not contiguous: one copy
            frames.append(memoryview(b).tobytes())
    return frames


def loads(frames: list) -> tuple[Any, int]:
    """[header, *buffers] -> (object, estimated bytes)."""
    obj = loads_value(frames)
    return obj, nbytes(obj)


def loads_sized(frames: list) -> tuple[Any, int, int]:
    """[header, *buffers] -> (object, estimated bytes, device bytes)."""
    obj = loads_value(frames)
    return obj, nbytes(obj), device_nbytes(obj)


def loads_value(frames: list) -> Any:
    if device.is_marked(frames[0]):
        return device.loads(frames)
    return pickle.loads(frames[0], buffers=frames[1:])


def device_nbytes(obj: Any) -> int:
    """Bytes of device memory `obj` holds (its device arrays, also inside
    nested lists, tuples, sets, dicts and objects' attributes); 0 where no
    device library is loaded."""
    return device.nbytes(obj) if device.possible() else 0


def nbytes(obj: Any) -> int:
    try:
        return int(sizeof(obj))
    except Exception:
        return 64


class _MainPickler(pickle.Pickler):
    """Plain pickle, except that functions and classes of `__main__` (which a
    worker cannot import) travel by value, cloudpickled once per object and
    cached: a graph of 10k tasks calling one script-defined function pickles
    that function once, not 10k times."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type)) and getattr(obj, "__module__", None) == "__main__":
            return loads_function, (dumps_function(obj),)
        return NotImplemented


class PayloadPickler:
    """`dumps_payload` for many payloads in a row (a graph's tasks): once one
    of them needed the `__main__` pickler, the rest go straight to it instead
    of being pickled twice each."""

    def __init__(self):
        self.main = False

    def __call__(self, obj: Any) -> bytes:
        if not self.main:
            try:
                b = pickle.dumps(obj, protocol=HIGHEST)
                if b"__main__" not in b:
                    return b
                self.main = True
            except Exception:
                return dumps_payload(obj)
        try:
            f = io.BytesIO()
            _MainPickler(f, protocol=HIGHEST).dump(obj)
            return f.getvalue()
        except Exception:
            return dumps_payload(obj)


def dumps_payload(obj: Any) -> bytes:
    """A task payload; raises TypeError naming the culprit if it cannot be pickled.
    Plain pickle first (fast); when that fails or names `__main__`, the
    caching pickler above; cloudpickle for whatever else plain pickle refuses
    (lambdas and closures defined in modules)."""
    try:
        b = pickle.dumps(obj, protocol=HIGHEST)
        if b"__main__" not in b:
            return b
        f = io.BytesIO()
        _MainPickler(f, protocol=HIGHEST).dump(obj)
        return f.getvalue()
    except Exception:
        pass
    try:
        return cloudpickle.dumps(obj, protocol=HIGHEST)
    except Exception as e:
        raise TypeError(f"could not serialize task: {type(e).__name__}: {e}") from e


_function_cache: dict = {}


def dumps_function(func) -> bytes:
    """cloudpickle of a function, cached (client.map pickles it once)."""
    try:
        return _function_cache[func]
    except (KeyError, TypeError):
        pass
    try:
        b = cloudpickle.dumps(func, protocol=HIGHEST)
    except Exception as e:
        raise TypeError(f"could not serialize function {func!r}: {type(e).__name__}: {e}") from e
    try:
        if len(_function_cache) > 1000:
            _function_cache.clear()
        _function_cache[func] = b
    except TypeError:  # unhashable callable
        pass
    return b


_loaded_functions: dict = {}


def loads_function(b: bytes):
    f = _loaded_functions.get(b)
    if f is None:
        f = pickle.loads(b)
        if len(_loaded_functions) > 1000:
            _loaded_functions.clear()
        _loaded_functions[b] = f
    return f


def dumps_error(exc: BaseException) -> bytes:
    """The exception and its traceback text; a stand-in if it won't pickle."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for dump in (pickle.dumps, cloudpickle.dumps):
        try:
            b = dump((exc, tb), protocol=HIGHEST)
            pickle.loads(b)  # some exceptions pickle but cannot be rebuilt
            return b
        except Exception:
            continue
    return pickle.dumps((RuntimeError(f"{type(exc).__name__}: {exc}"), tb), protocol=HIGHEST)


def loads_error(payload, message: str) -> tuple[BaseException, str]:
    """(exception, remote traceback text) from an error payload."""
    if payload is not None and len(payload):
        try:
            exc, tb = pickle.loads(payload)
            return exc, tb
        except Exception:
            pass
    return RuntimeError(message), ""
