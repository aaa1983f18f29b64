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

    [b"RDV1" + <u32 host buffers> + <u32 device frames> + pickle,
     *host buffers (pickle protocol 5 out-of-band), *device frames]

A plain pickle never starts with b"RDV1" (protocol 5 starts with 0x80), so
values without device arrays keep the plain layout and cost nothing extra.
The device path is used only in processes where a device library is loaded
(or a type is registered): elsewhere pickling stays the C fast path.

`RDASK_DEVICE=standin` makes the "device" host memory (`rdask.testing.
StandInArray`), which is how this path is tested on machines without a GPU.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import threading
from typing import Any, Callable

import cloudpickle

MARK = b"RDV1"
_HEAD = struct.Struct("<4sII")

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
    return bool(_registry) or "cupy" in m or "numba.cuda" in m or "torch" in m


def _itemsize(typestr: str) -> int:
    return int(typestr[2:])


def _interface(obj) -> dict | None:
    """The array interface of a device array rdask sends as a device frame."""
    t = type(obj)
    if t in _registry:
        return obj.__cuda_array_interface__
    mod = t.__module__.partition(".")[0]
    if mod == "torch":
        if not getattr(obj, "is_cuda", False) or obj.requires_grad:
            return None
    elif mod not in ("cupy", "numba"):
        return None
    try:
        return obj.__cuda_array_interface__
    except (AttributeError, TypeError, RuntimeError):
        return None


def _rebuilder(obj) -> Callable:
    t = type(obj)
    if t in _registry:
        return _registry[t]
    mod = t.__module__.partition(".")[0]
    if mod == "cupy":
        import cupy

        return cupy.asarray
    if mod == "numba":
        from numba import cuda

        return cuda.as_cuda_array
    return _torch_from_device


def _torch_from_device(buf):
    import torch

    return torch.as_tensor(buf, device="cuda")


def _nbytes_of(cai: dict) -> int:
    n = _itemsize(cai["typestr"])
    for d in cai["shape"]:
        n *= d
    return n


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


def nbytes(obj: Any) -> int:
    """Device bytes of `obj`, or of the items of a list, tuple or dict."""
    cai = _interface(obj)
    if cai is not None:
        return _nbytes_of(cai)
    if isinstance(obj, (list, tuple)) and len(obj) <= 10_000:
        return sum(_nbytes_of(c) for c in map(_interface, obj) if c is not None)
    if isinstance(obj, dict) and len(obj) <= 10_000:
        return sum(_nbytes_of(c) for c in map(_interface, obj.values()) if c is not None)
    return 0


class _DeviceFrames:
    """What the picklers below share: device arrays become references to
    device frames, copied to host here."""

    def _device_reduce(self, obj):
        cai = _interface(obj)
        if cai is None:
            return NotImplemented
        if not _contiguous(cai):
            if type(obj).__module__.partition(".")[0] != "cupy":
                return NotImplemented  # pickled as the library pickles it
            import cupy

            obj = cupy.ascontiguousarray(obj)
            cai = obj.__cuda_array_interface__
        from . import _rdask

        n = _nbytes_of(cai)
        self.device_frames.append(_rdask.device_download(cai["data"][0], n))
        index = len(self.device_frames) - 1
        return _from_device_frame, (index, _rebuilder(obj), tuple(cai["shape"]), cai["typestr"])


class _Pickler(_DeviceFrames, pickle.Pickler):
    def __init__(self, file, buffers: list):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.device_frames: list = []

    def reducer_override(self, obj):
        return self._device_reduce(obj)


class _CloudPickler(_DeviceFrames, cloudpickle.Pickler):
    def __init__(self, file, buffers: list):
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.device_frames = []

    def reducer_override(self, obj):
        out = self._device_reduce(obj)
        return super().reducer_override(obj) if out is NotImplemented else out


def dumps(obj: Any, host_frames: Callable) -> list:
    """`rdask.serialize.dumps` where device arrays may be in `obj`."""
    for cls in (_Pickler, _CloudPickler):
        buffers: list = []
        f = io.BytesIO()
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
        if not p.device_frames:
            return host_frames(header, buffers)
        marked = _HEAD.pack(MARK, len(buffers), len(p.device_frames)) + header
        return host_frames(marked, buffers) + p.device_frames
    raise AssertionError("unreachable")


def is_marked(head) -> bool:
    return len(head) >= _HEAD.size and bytes(memoryview(head)[:4]) == MARK


def loads(frames: list) -> Any:
    """The inverse of `dumps` for a marked header: device frames go back
    into device memory."""
    head = memoryview(frames[0])
    _, nhost, ndev = _HEAD.unpack_from(head)
    outer = getattr(_local, "frames", None)
    _local.frames = frames[1 + nhost:1 + nhost + ndev]
    try:
        return pickle.loads(head[_HEAD.size:], buffers=frames[1:1 + nhost])
    finally:
        _local.frames = outer


def _from_device_frame(index: int, rebuild: Callable, shape: tuple, typestr: str):
    from . import _rdask

    frame = _local.frames[index]
    return rebuild(_rdask.device_upload(frame, list(shape), typestr))
