"""Helpers for testing code that runs on rdask (as `distributed.utils_test`).

`StandInArray` is a "device array" for machines without a GPU: a NumPy
array exposing `__cuda_array_interface__`, whose "device memory" is host
memory. With `RDASK_DEVICE=standin` in the environment of the client and
the workers, rdask's whole device path (device frames, device memory
limits, device-to-host spilling) runs on it exactly as on CuPy arrays, with
host copies where a GPU would copy over the bus.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .device import register_device_type


class StandInArray:
    """A C-contiguous NumPy array posing as device memory."""

    def __init__(self, array, owner=None, stream=...):
        self.array = np.ascontiguousarray(array)
        # What keeps the memory alive when it is rdask's (a DeviceBuffer).
        self._owner = owner
        # The interface's `stream` (version 3) when given: None (ready) or
        # a stream number; left out by default, as older producers do.
        self._stream = stream

    @property
    def __cuda_array_interface__(self):
        a = self.array
        cai = {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False),
               "strides": None, "version": 3}
        if self._stream is not ...:
            cai["stream"] = self._stream
        return cai

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    @classmethod
    def from_device(cls, buf) -> "StandInArray":
        """Wraps a stand-in `DeviceBuffer` without copying (as
        `cupy.asarray` wraps a GPU one)."""
        cai = buf.__cuda_array_interface__
        dtype = np.dtype(cai["typestr"])
        if buf.nbytes:
            raw = (ctypes.c_char * buf.nbytes).from_address(cai["data"][0])
            # The NumPy array keeps `raw` alive and `raw` the buffer: a view
            # that outlives this object still points at live memory.
            raw._rdask_owner = buf
        else:
            raw = b""
        flat = np.frombuffer(raw, dtype=dtype)
        return cls(flat.reshape(cai["shape"]), owner=buf)

    def __reduce__(self):
        # Pickled as the NumPy array it holds (a task argument, say); the
        # device path (rdask.device) never gets here.
        return StandInArray, (self.array,)

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)

    def __repr__(self):
        return f"StandInArray({self.array!r})"

    def __sizeof__(self):
        return object.__sizeof__(self) + self.array.nbytes


register_device_type(StandInArray, StandInArray.from_device)
