"""The GPU data plane on a real GPU: CuPy arrays (and PyTorch and Numba ones
where installed) through every path rdask moves device values on, checked
as a user would: the values that arrive are the right type, on the GPU,
with the right contents, and the counters say which path they took.

Without CuPy or a GPU the file is skipped, saying why; the GPU machine runs
it from gpu/device-check-data.sh. With RDASK_GPU_TEST_ARRAY=standin the same
checks run on the host-memory stand-in (`rdask.testing.StandInArray`), as
CI does, so that this file is known to work before a GPU is at hand."""

from __future__ import annotations

import os

import numpy as np
import pytest

import rdask
from conftest import wait_until
from rdask import Client, LocalCluster

KIND = os.environ.get("RDASK_GPU_TEST_ARRAY", "cupy")
MB = 1 << 20


def _missing() -> str | None:
    if KIND == "standin":
        return None
    if KIND != "cupy":
        return f"RDASK_GPU_TEST_ARRAY={KIND!r}: expected cupy or standin"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
    except Exception as e:  # no CuPy, no driver, no device
        return f"no GPU for CuPy here: {type(e).__name__}: {e}"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(autouse=True)
def device(monkeypatch):
    if KIND == "standin":
        monkeypatch.setenv("RDASK_DEVICE", "standin")
    monkeypatch.setenv("RDASK_GPU_TEST_ARRAY", KIND)  # the workers' KIND
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")  # counted, never moved (unless a test sets one)


# --- arrays of the library under test (these run in the workers too) ---

def xp():
    """The array module: CuPy, or NumPy under the stand-in."""
    if KIND == "cupy":
        import cupy

        return cupy
    return np


def device_array(host):
    """`host` (a NumPy array) as a device array."""
    if KIND == "cupy":
        import cupy

        return cupy.asarray(host)
    from rdask.testing import StandInArray

    return StandInArray(host)


def to_host(x) -> np.ndarray:
    if KIND == "cupy":
        return x.get()
    return np.asarray(x.array)


def library(x) -> str:
    return type(x).__module__.partition(".")[0]


EXPECTED_LIBRARY = "cupy" if KIND == "cupy" else "rdask"


def full(i, n):
    return device_array(np.full(n, float(i)))


def total(*xs):
    return sum(float(to_host(x).sum()) for x in xs)


def make_pattern(n):
    """A large array whose elements differ by position, and a small one."""
    if KIND == "cupy":
        import cupy

        return cupy.arange(n, dtype=cupy.float64) % 1000.0, cupy.full(5, 7, dtype=cupy.int16)
    return device_array(np.arange(n, dtype=np.float64) % 1000.0), device_array(np.full(5, 7, dtype=np.int16))


def check_pattern(pair):
    big, small = pair
    host = to_host(big)
    want = np.arange(host.size, dtype=np.float64) % 1000.0
    return library(big), bool(np.array_equal(host, want)), to_host(small).tolist(), library(small)


def _ucx_or_skip():
    ok, why = rdask._rdask.ucx_status()
    if not ok:
        pytest.skip(f"UCX is not usable here: {why}")


# --- the tests ---

def test_device_arrays_round_trip_through_rdask_copies_in_every_shape_and_dtype():
    """One process: rdask copies each array off the device and back into
    device memory it allocated (no network), for the layouts users make."""
    from rdask import serialize

    values = {
        "grid": np.arange(12, dtype=np.complex128).reshape(3, 4),
        "transposed": np.arange(12, dtype=np.int32).reshape(3, 4).T,  # not C-contiguous
        "empty": np.zeros((0, 3), dtype=np.int8),
        "flags": np.array([True, False, True]),
        "big": np.arange(5 * MB // 8, dtype=np.float64),
    }
    if KIND == "standin":
        values.pop("transposed")  # the stand-in holds C-contiguous arrays only
    frames = serialize.dumps({k: device_array(v) for k, v in values.items()})
    back, _, device_bytes = serialize.loads_sized(frames)
    for k, v in values.items():
        got = back[k]
        assert library(got) == EXPECTED_LIBRARY, (k, type(got))
        assert to_host(got).dtype == v.dtype and np.array_equal(to_host(got), v), k
    assert device_bytes == sum(v.nbytes for v in values.values())
    assert rdask._rdask.device_name()  # the device rdask opened, e.g. "GPU 0 (NVIDIA H200)"


WAYS = {
    # name: (protocol, environment)
    "ipc": ("tcp", {"RDASK_DEVICE_IPC": "1"}),
    "staged": ("tcp", {"RDASK_DEVICE_IPC": "0", "RDASK_DEVICE_DIRECT": "0"}),
    "ucx_frames": ("ucx", {"RDASK_DEVICE_IPC": "0", "RDASK_DEVICE_DIRECT": "1"}),
    "ucx_staged": ("ucx", {"RDASK_DEVICE_IPC": "0", "RDASK_DEVICE_DIRECT": "0"}),
}


@pytest.mark.parametrize("way", list(WAYS))
def test_a_device_value_moves_between_workers(monkeypatch, way):
    """A 40 MiB device value (plus a small array) made on one worker is an
    input on the other and the client's result, by CUDA IPC (workers of one
    node), in staging chunks (as between nodes over TCP), or over UCX as
    device frames where this UCX moves the device's memory."""
    protocol, env = WAYS[way]
    if protocol == "ucx":
        _ucx_or_skip()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    n = (40 * MB + 12_344) // 8
    nbytes = n * 8 + 10
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, protocol=protocol) as cluster, \
            Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make_pattern, n, workers=[a])
        assert client.submit(check_pattern, x, workers=[b]).result() == \
            (EXPECTED_LIBRARY, True, [7] * 5, EXPECTED_LIBRARY)
        assert check_pattern(x.result()) == (EXPECTED_LIBRARY, True, [7] * 5, EXPECTED_LIBRARY), "at the client"
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        sent = client.run(lambda: rdask._rdask.staging_stats(), workers=[a])[a]
        if way == "ipc":
            assert got["imported_arrays"] == 2 and got["imported_bytes"] == nbytes and got["chunks"] == 0, got
            assert sent["shared_values"] >= 1 and sent["bytes"] == 0, sent
        elif way == "ucx_frames" and (device_kind() in rdask._rdask.ucx_memory_kinds()
                                      or os.environ.get("RDASK_EXPECT_UCX_CUDA") == "1"):
            # (gpu/device-check-data.sh expects it where its UCX lists CUDA transports.)
            assert got["direct_arrays"] == 2 and got["direct_bytes"] == nbytes and got["chunks"] == 0, got
            assert got["direct_on_host"] == 0, got
        else:  # staged: also device frames over a UCX that cannot move this device's memory
            assert got["values"] == 1 and got["chunks"] >= 5 and got["imported_arrays"] == 0, got
            assert got["direct_arrays"] == 0, got
            assert sent["values"] >= 1 and sent["bytes"] >= nbytes and 1 <= sent["most_buffers"] <= 4, sent


def device_kind() -> str:
    """The memory kind UCX must move for this file's arrays."""
    return "cuda" if KIND == "cupy" else "host"


def test_device_values_three_times_the_limit_spill_to_host_and_come_back(monkeypatch):
    limit = 64 * MB
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", str(limit))
    n = 8 * MB // 8
    count = 24  # 192 MiB of values
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        parts = client.map(full, range(count), n=n)
        rdask.wait(parts)

        def worker():
            return next(iter(client.scheduler_info()["workers"].values()))

        settled = wait_until(lambda: (lambda w: w if w["device_memory"] <= limit and
                                      w["device_spilled_bytes"] + w["device_memory"] == count * n * 8 else None)(worker()),
                             30, what="device memory under the limit, the rest on host")
        assert settled["device_spilled_values"] >= 16 and settled["device_spilled_total_bytes"] >= 128 * MB
        sums = client.map(total, *[parts[i::6] for i in range(6)])
        assert sum(client.gather(sums)) == sum(float(i) * n for i in range(count))
        wait_until(lambda: worker()["device_unspilled_total_bytes"] >= 128 * MB, 30, what="values back on the device")


def on_side_stream(n):
    """Work queued on a non-blocking stream and not waited for: the task
    returns while the GPU may still be writing the array."""
    if KIND != "cupy":
        from rdask.testing import StandInArray

        return StandInArray(np.arange(n, dtype=np.int64) + 150, stream=7)
    import cupy

    with cupy.cuda.Stream(non_blocking=True):
        x = cupy.arange(n, dtype=cupy.int64)
        for _ in range(50):
            x = x + 3
    return x


def check_side_stream(x):
    host = to_host(x)
    return bool(np.array_equal(host, np.arange(host.size, dtype=np.int64) + 150))


@pytest.mark.parametrize("way", ["ipc", "staged"])
def test_work_still_running_on_a_side_stream_is_finished_before_rdask_reads_the_array(monkeypatch, way):
    _, env = WAYS[way]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    n = 64 * MB // 8
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        for _ in range(3):
            x = client.submit(on_side_stream, n, workers=[a], pure=False)
            assert client.submit(check_side_stream, x, workers=[b], pure=False).result()
            assert check_side_stream(x.result())
            del x


def make_torch(n):
    import torch

    return torch.arange(n, dtype=torch.float32, device="cuda")


def describe_torch(t):
    return type(t).__module__.partition(".")[0], t.device.type, float(t.sum())


def make_torch_bf16(n):
    import torch

    return torch.arange(n, dtype=torch.bfloat16, device="cuda")  # integers to 256 are exact


def describe_torch_bf16(t):
    # PyTorch's array interface calls bfloat16 "<f2" (float16's type string).
    return str(t.dtype), float(t.float().sum())


def make_numba(n):
    from numba import cuda

    return cuda.to_device(np.arange(n, dtype=np.float64))


def describe_numba(x):
    # numba-cuda's classes live in `numba_cuda` (which `numba.cuda` is).
    return type(x).__module__.partition(".")[0].replace("numba_cuda", "numba"), float(x.copy_to_host().sum())


def _library_or_skip(name):
    if KIND != "cupy":
        pytest.skip(f"{name} arrays need a GPU")
    try:
        if name == "torch":
            import torch

            ok = torch.cuda.is_available()
        else:
            from numba import cuda

            ok = cuda.is_available()
    except Exception as e:
        pytest.skip(f"{name}: {e}")
    if not ok:
        pytest.skip(f"{name} sees no GPU")


OTHER_LIBRARIES = {  # library: (make, describe, what a task sees of make(1000))
    "torch": (make_torch, describe_torch, ("torch", "cuda", 499500.0)),
    "torch-bfloat16": (make_torch_bf16, describe_torch_bf16, ("torch.bfloat16", 4950.0)),
    "numba": (make_numba, describe_numba, ("numba", 499500.0)),
}


@pytest.mark.parametrize("way", ["ipc", "staged"])
@pytest.mark.parametrize("name", list(OTHER_LIBRARIES))
def test_pytorch_and_numba_arrays_arrive_as_their_own_type_on_the_gpu(monkeypatch, name, way):
    _library_or_skip(name.partition("-")[0])
    make, describe, want = OTHER_LIBRARIES[name]
    for k, v in WAYS[way][1].items():
        monkeypatch.setenv(k, v)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make, 100 if name == "torch-bfloat16" else 1000, workers=[a])
        assert client.submit(describe, x, workers=[b]).result() == want
        assert describe(x.result()) == want, "at the client"


def test_a_dask_array_of_cupy_chunks_computes_on_the_cluster(monkeypatch):
    """What dask-cuda users run: a dask array whose chunks are CuPy arrays,
    rechunked (chunks move between workers) and reduced."""
    if KIND != "cupy":
        pytest.skip("dask arrays of stand-in chunks have no arithmetic")
    import cupy
    import dask.array as da

    n = 8_000_000
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        x = da.arange(n, chunks=1_000_000, dtype=np.int64).map_blocks(cupy.asarray)
        y = (x.rechunk(3_000_000)[::-1] * 2).sum()
        got = client.compute(y).result()
        assert library(got) == "cupy" and int(got) == n * (n - 1)
