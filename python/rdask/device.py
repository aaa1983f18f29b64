"""Device values: arrays in GPU memory travel as device frames.

An object with `__cuda_array_interface__` (a CuPy array, a Numba device
array, a PyTorch CUDA tensor, or a type registered here) is not pickled
through host objects: its memory leaves the device as one frame (one
device-to-host copy, `_rdask.device_download`), and the header records
which frames are device memory. On arrival each device frame is copied into
new device memory (`_rdask.device_upload`, a `DeviceBuffer` exposing
`__cuda_array_interface__`) and wrapped as the original type without
another copy (`cupy.asarray`, `numba.cuda.as_cuda_array`, `torch.as_tensor`).

Frame layout of a value holding device arrays:

    [b"RDV1" + <u32 host buffers H> + <u32 device arrays D> + D x <u64 bytes> + pickle,
     *host buffers (pickle protocol 5 out-of-band), *device frames]

Each device array's bytes are one or more consecutive frames (a worker
sending a large device value cuts it into staging chunks as it copies it off
the device, `dumps_staged`); its size in the header says how many bytes, and
so which frames, are its. An empty array has no frame.

A plain pickle never starts with b"RDV1" (protocol 5 starts with 0x80), so
values without device arrays keep the plain layout and cost nothing extra.
The device path is used only in processes where a device library is loaded
(or a type is registered): elsewhere pickling stays the C fast path.

`RDASK_DEVICE=standin` makes the "device" host memory (`rdask.testing.
StandInArray`), which is how this path is tested on machines without a GPU.
"""

from __future__ import annotations

import functools
import io
import itertools
import pickle
import struct
import sys
import threading
import types
from typing import Any, Callable

import cloudpickle

MARK = b"RDV1"
_HEAD = struct.Struct("<4sII")
_SIZE = struct.Struct("<Q")

# type -> function(DeviceBuffer) -> object of that type
_registry: dict[type, Callable] = {}
_local = threading.local()


def register_device_type(cls: type, rebuild: Callable) -> None:
    """Sends instances of `cls` (which expose `__cuda_array_interface__`,
    C-contiguous) as device frames; `rebuild(buffer)` makes one again from
    the `DeviceBuffer` the receiver allocated (it must keep the buffer
    alive, as `cupy.asarray` does). `rebuild` travels by reference."""
    _registry[cls] = rebuild


def possible() -> bool:
    """Whether this process may hold device arrays (a device library is
    imported or a type registered)."""
    m = sys.modules
    if _registry or "cupy" in m or "numba.cuda" in m or "numba_cuda" in m:
        return True
    # PyTorch is often imported for CPU work: only once it has used CUDA.
    torch = m.get("torch")
    try:
        return torch is not None and torch.cuda.is_initialized()
    except Exception:
        return False


_ITEMSIZE: dict[str, int] = {}


def _itemsize(typestr: str) -> int:
    """Bytes per element of an array-interface type string ("<f8", "|b1",
    "<M8[ns]", "|V16", ...)."""
    n = _ITEMSIZE.get(typestr)
    if n is None:
        import numpy as np

        n = _ITEMSIZE[typestr] = np.dtype(typestr).itemsize
    return n


def _interface(obj) -> dict | None:
    """The array interface of a device array rdask sends as a device frame."""
    t = type(obj)
    if t in _registry:
        return obj.__cuda_array_interface__
    mod = _library(t)
    if mod == "torch":
        if not getattr(obj, "is_cuda", False) or obj.requires_grad:
            return None
    elif mod not in ("cupy", "numba"):
        return None
    try:
        return obj.__cuda_array_interface__
    except (AttributeError, TypeError, RuntimeError):
        return None


def _library(t: type) -> str:
    """The array library of a type: its top-level package, with the
    numba-cuda package's (`numba_cuda`, which `numba.cuda` is) as numba."""
    mod = t.__module__.partition(".")[0]
    return "numba" if mod == "numba_cuda" else mod


def _rebuilder(obj) -> Callable:
    t = type(obj)
    if t in _registry:
        return _registry[t]
    mod = _library(t)
    if mod == "cupy":
        import cupy

        return cupy.asarray
    if mod == "numba":
        from numba import cuda

        return cuda.as_cuda_array
    # PyTorch describes bfloat16 as "<f2", float16's type string: the
    # tensor's own dtype travels too, and the arrival is viewed as it.
    return functools.partial(_torch_from_device, dtype=str(obj.dtype).removeprefix("torch."))


def _torch_from_device(buf, dtype: str | None = None):
    import torch

    t = torch.as_tensor(buf, device="cuda")
    want = getattr(torch, dtype, None) if dtype else None
    if want is not None and t.dtype != want:
        t = t.view(want)  # same item size: bfloat16 from float16's bytes
    return t


def _nbytes_of(cai: dict) -> int:
    n = _itemsize(cai["typestr"])
    for d in cai["shape"]:
        n *= d
    return n


def _stream_code(cai: dict) -> int:
    """What must finish before the array may be read, from the interface's
    `stream` (version 3): -1 none given (the whole device), 0 `None` (the
    producer says it is ready), else the stream (1 and 2: the legacy and
    per-thread default streams). 0 is not a valid stream: the whole device."""
    if "stream" not in cai:
        return -1
    s = cai["stream"]
    if s is None:
        return 0
    return int(s) if int(s) > 0 else -1


def _contiguous(cai: dict) -> bool:
    strides = cai.get("strides")
    if strides is None:
        return True
    expect = _itemsize(cai["typestr"])
    for dim, stride in zip(reversed(cai["shape"]), reversed(strides)):
        if dim > 1 and stride != expect:
            return False
        expect *= dim
    return True


# Most objects `nbytes` looks at in one value (a result that is a list of a
# million floats costs a bounded walk, not a million checks).
_LOOK_AT_MOST = 10_000


def nbytes(obj: Any) -> int:
    """Device bytes `obj` holds: its device arrays, also inside lists,
    tuples, sets, dict values and objects' attributes (a sparse matrix's
    arrays, a dataclass's) nested to any depth (up to 10,000 objects looked
    at); an array held twice counts once."""
    seen, total, budget = set(), 0, _LOOK_AT_MOST
    looked_into: set[int] = set()  # containers and objects, once each (cycles)
    stack = [obj]
    while stack and budget > 0:
        x = stack.pop()
        budget -= 1
        cai = _interface(x)
        if cai is not None:
            # A view at the same address but of another size is another array.
            array = (cai["data"][0], _nbytes_of(cai))
            if array not in seen:
                seen.add(array)
                total += array[1]
            continue
        # By type(), not isinstance(): a proxy answers `__class__` itself.
        t = type(x)
        if issubclass(t, (str, bytes, int, float, type, types.ModuleType)) or id(x) in looked_into:
            continue
        looked_into.add(id(x))
        if issubclass(t, (list, tuple, set, frozenset)):
            stack.extend(itertools.islice(x, budget))
        elif issubclass(t, dict):
            stack.extend(itertools.islice(x.values(), budget))
        else:
            # The instance's own attributes, not through its class (a proxy
            # would forward, or run code, or raise something else).
            try:
                attributes = object.__getattribute__(x, "__dict__")
            except Exception:
                continue
            if isinstance(attributes, dict):
                stack.extend(itertools.islice(attributes.values(), budget))
    return total


class _NonContiguous:
    """A CuPy array whose C-contiguous copy is what travels."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def copied(self, keep: list) -> tuple:
        """`(address, bytes, stream code)` of a C-contiguous copy (same
        shape and dtype), which `keep` holds."""
        import cupy

        c = cupy.ascontiguousarray(self.array)
        keep.append(c)
        cai = c.__cuda_array_interface__
        return cai["data"][0], _nbytes_of(cai), _stream_code(cai)


def _read_all(entries: list) -> list:
    """The bytes of each non-empty array: `(address, bytes, stream code)`
    entries, or non-contiguous arrays copied C-contiguous first, one copy
    alive at a time."""
    from . import _rdask

    out = []
    for e in entries:
        copy: list = []
        if isinstance(e, _NonContiguous):
            e = e.copied(copy)
        if e[1]:
            out.append(_rdask.device_download(*e))
    return out


def _addresses(entries: list, keep: list) -> list:
    """`(address, bytes, stream code)` of each array, for reading while the
    value is sent; the contiguous copies made for it join `keep`."""
    return [e.copied(keep) if isinstance(e, _NonContiguous) else e for e in entries]


class _DeviceFrames:
    """What the picklers below share: device arrays become references to
    device frames, copied to host here."""

    def _device_reduce(self, obj):
        cai = _interface(obj)
        if cai is None:
            return NotImplemented
        n = _nbytes_of(cai)
        if _contiguous(cai):
            # Read later (copied off whole, or in chunks while the value is
            # sent): kept alive until then.
            self.device_frames.append((cai["data"][0], n, _stream_code(cai)))
        elif _library(type(obj)) == "cupy":
            # Made C-contiguous (same shape and dtype) only when read: one
            # such copy at a time on a device that may be full.
            self.device_frames.append(_NonContiguous(obj))
        else:
            return NotImplemented  # pickled as the library pickles it
        self.sizes.append(n)
        self.keep.append(obj)
        index = len(self.sizes) - 1
        return _from_device_frame, (index, _rebuilder(obj), tuple(cai["shape"]), cai["typestr"])

    def _start(self):
        self.device_frames: list = []
        self.sizes: list = []
        self.keep: list = []


class _Pickler(_DeviceFrames, pickle.Pickler):
    def __init__(self, file, buffers: list):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self._start()

    def reducer_override(self, obj):
        return self._device_reduce(obj)


class _CloudPickler(_DeviceFrames, cloudpickle.Pickler):
    def __init__(self, file, buffers: list):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self._start()

    def reducer_override(self, obj):
        out = self._device_reduce(obj)
        return super().reducer_override(obj) if out is NotImplemented else out


def _pickle(obj: Any, download: bool):
    """`(header, buffers, pickler)`; the pickler's `device_frames` are the
    device arrays' bytes with `download`, else `(address, bytes, stream
    code)` for the caller to read while `pickler.keep` holds the arrays
    (and the contiguous copies made for them)."""
    for cls in (_Pickler, _CloudPickler):
        buffers: list = []
        f = io.BytesIO()
        # Addresses first, bytes once a pickler is chosen: plain pickle may
        # fail or name `__main__`, and the arrays must not be copied twice.
        p = cls(f, buffers)
        try:
            p.dump(obj)
        except Exception:
            if cls is _CloudPickler:
                raise
            continue
        header = f.getvalue()
        if cls is _Pickler and b"__main__" in header:
            continue
        p.device_frames = _read_all(p.device_frames) if download else _addresses(p.device_frames, p.keep)
        if p.sizes:
            sizes = b"".join(_SIZE.pack(n) for n in p.sizes)
            header = _HEAD.pack(MARK, len(buffers), len(p.sizes)) + sizes + header
        return header, buffers, p
    raise AssertionError("unreachable")


def dumps(obj: Any, host_frames: Callable) -> list:
    """`rdask.serialize.dumps` where device arrays may be in `obj`: their
    bytes are copied off the device now, one frame per array."""
    header, buffers, p = _pickle(obj, download=True)
    return host_frames(header, buffers) + p.device_frames


def dumps_staged(obj: Any, host_frames: Callable):
    """For a worker sending `obj` to a peer: `(frames, parts, keep)`, where
    `frames` are the value's frames but for its device arrays, `parts` the
    (device address, bytes) the worker reads in staging chunks while it
    sends, and `keep` what must stay alive meanwhile. None when `obj` holds
    no device array."""
    header, buffers, p = _pickle(obj, download=False)
    if not p.sizes:
        return None
    return host_frames(header, buffers), p.device_frames, p.keep


# A header whose device frames are handles of arrays that arrived in parts
# and are in device memory already (the receiving process copied each
# staging chunk there as it came; `_rdask.device_claim`).
RESIDENT = b"RDVD"


def is_marked(head) -> bool:
    return len(head) >= _HEAD.size and bytes(memoryview(head)[:4]) in (MARK, RESIDENT)


def loads(frames: list) -> Any:
    """The inverse of `dumps` for a marked header: each device array's
    frames go into new device memory."""
    head = memoryview(frames[0])
    mark, nhost, ndev = _HEAD.unpack_from(head)
    start = _HEAD.size + ndev * _SIZE.size
    if mark == RESIDENT:
        handles = frames[1 + nhost:]
        if len(handles) != ndev:
            raise ValueError(f"{len(handles)} device array handles for {ndev} arrays")
        return _load(head[start:], frames[1:1 + nhost], [("claim", h) for h in handles])
    sizes = [_SIZE.unpack_from(head, _HEAD.size + i * _SIZE.size)[0] for i in range(ndev)]
    groups, at = [], 1 + nhost
    for n in sizes:
        group, got = [], 0
        while got < n:
            if at >= len(frames):
                raise ValueError(f"a device value arrived short: {got} of {n} bytes of an array")
            group.append(frames[at])
            got += len(frames[at])
            at += 1
        if got != n:
            raise ValueError(f"a device array's frames hold {got} bytes, its header says {n}")
        groups.append(("upload", group))
    return _load(head[start:], frames[1:1 + nhost], groups)


def _load(pickled, buffers, arrays: list):
    outer = getattr(_local, "frames", None)
    _local.frames = arrays
    try:
        return pickle.loads(pickled, buffers=buffers)
    finally:
        _local.frames = outer


def _from_device_frame(index: int, rebuild: Callable, shape: tuple, typestr: str):
    from . import _rdask

    how, what = _local.frames[index]
    if how == "claim":
        return rebuild(_rdask.device_claim(what, list(shape), typestr))
    return rebuild(_rdask.device_upload(what, list(shape), typestr))
