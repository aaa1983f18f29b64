"""The GPU data plane on a machine without a GPU: with RDASK_DEVICE=standin
the device is host memory (`rdask.testing.StandInArray`), and the whole
device path runs as on CuPy arrays: device frames between workers and to
the client, the device memory limit with device-to-host spilling and back,
the figures in `scheduler_info()`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import dask
import numpy as np
import pytest

import rdask
from rdask import Client, LocalCluster

MB = 1 << 20


def make(i, n):
    from rdask.testing import StandInArray

    return StandInArray(np.full(n, float(i)))


def make_empty():
    from rdask.testing import StandInArray

    return StandInArray(np.zeros((0, 3), dtype=np.int32))


def how_it_arrived(x):
    """What a task sees of a device input: rdask's device memory (a
    DeviceBuffer under the array) when it came as a device frame."""
    return type(x).__name__, type(x._owner).__name__, float(x.array.sum())


def total(*xs):
    return sum(float(x.array.sum()) for x in xs)


def _until(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = check()
        if out:
            return out
        time.sleep(0.1)
    return None


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setenv("RDASK_DEVICE", "standin")


def test_device_values_travel_between_workers_and_to_the_client_as_device_frames(standin, monkeypatch):
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")  # counted, never moved
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        x = client.submit(make, 3, 1000, workers=[a])
        seen = client.submit(how_it_arrived, x, workers=[b]).result()
        assert seen == ("StandInArray", "DeviceBuffer", 3000.0)
        back = x.result()
        assert type(back._owner).__name__ == "DeviceBuffer" and np.array_equal(back.array, np.full(1000, 3.0))

        def counted():
            w = client.scheduler_info()["workers"][a]
            return w if w["device_memory"] >= 8000 else None

        info = _until(counted)
        assert info, client.scheduler_info()["workers"][a]
        assert info["device_memory_limit"] == 0 and info["device_spilled_total_bytes"] == 0
        del x
        assert _until(lambda: client.scheduler_info()["workers"][a]["device_memory"] == 0), "released values leave the device count"


def test_device_values_three_times_the_limit_spill_to_host_and_come_back(standin, monkeypatch):
    limit = 8 * MB
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", str(limit))
    n = MB // 8  # 1 MiB per value
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        parts = client.map(make, range(24), n=n)
        rdask.wait(parts)

        def settled():
            w = next(iter(client.scheduler_info()["workers"].values()))
            ok = w["device_memory"] <= limit and w["device_spilled_bytes"] + w["device_memory"] == 24 * MB
            return w if ok else None

        info = _until(settled)
        assert info, next(iter(client.scheduler_info()["workers"].values()))
        assert info["device_spilled_values"] >= 16 and info["device_spilled_total_bytes"] >= 16 * MB
        # The dashboard shows the same: /metrics for Prometheus, the workers page's data.
        from prometheus_client.parser import text_string_to_metric_families

        base = cluster.dashboard_link.rsplit("/", 1)[0]

        def metrics():  # published a little after the heartbeat
            with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
                m = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
            return m if m["dask_worker_device_moved_to_host_bytes_total"] >= 16 * MB else None

        samples = _until(metrics)
        assert samples, "the dashboard's metrics show the device memory moved to host"
        assert samples["dask_worker_device_memory_limit_bytes"] == limit
        assert 0 < samples["dask_worker_device_memory_bytes"] <= limit
        with urllib.request.urlopen(base + "/api/snapshot", timeout=10) as r:
            row = json.loads(r.read())["workers"][0]
        assert row["device_limit"] == limit and row["device_spilled_bytes"] >= 16 * MB
        # Tasks need them again: they come back to the device.
        sums = client.map(total, *[parts[i::6] for i in range(6)])
        assert sum(client.gather(sums)) == sum(float(i) * n for i in range(24))
        w = _until(lambda: (lambda w: w if w["device_unspilled_total_bytes"] >= 16 * MB else None)(
            next(iter(client.scheduler_info()["workers"].values()))))
        assert w, "spilled values were brought back for the tasks"


def hold(x, seconds, started):
    open(started, "w").close()
    time.sleep(seconds)
    return float(x.array.sum())


def test_a_device_value_in_use_elsewhere_stays_on_the_device(standin, monkeypatch, tmp_path):
    """Moving a value whose arrays something else still holds (a running
    task's input; a view kept as another result, as a CuPy slice keeps its
    base) would free nothing and part the copies: the device tier moves
    others instead."""
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", str(8 * MB))
    n = 6 * MB // 8
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster, Client(cluster) as client:
        a = client.submit(make, 1, n)
        rdask.wait(a)
        started = tmp_path / "started"
        held = client.submit(hold, a, 3.0, str(started), pure=False)
        assert _until(started.exists), "the task holding `a` runs"
        later = [client.submit(make, i, n, pure=False) for i in (2, 3)]
        rdask.wait(later)

        def worker():
            return next(iter(client.scheduler_info()["workers"].values()))

        assert _until(lambda: worker()["device_memory"] <= 8 * MB and worker()["device_spilled_values"] >= 2), worker()
        assert held.result() == float(n)
        # Never moved: still the array its task made (one brought back from
        # host memory would sit in rdask's device memory); the later ones
        # were moved instead.
        assert client.submit(how_it_arrived, a, pure=False).result() == ("StandInArray", "NoneType", float(n))
        assert [client.submit(how_it_arrived, x, pure=False).result()[1] for x in later] == ["DeviceBuffer"] * 2


def test_without_a_device_the_device_path_says_why():
    code = (
        "import numpy as np, rdask\n"
        "from rdask import _rdask, serialize\n"
        "from rdask.testing import StandInArray\n"
        "try:\n"
        "    _rdask.device_name()\n"
        "except rdask.GpuUnavailableError as e:\n"
        "    print('name:', e)\n"
        "try:\n"
        "    serialize.dumps(StandInArray(np.ones(3)))\n"
        "except rdask.GpuUnavailableError as e:\n"
        "    print('dumps:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RDASK_DEVICE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("no CUDA" in line and "libcuda" in line for line in lines), out.stdout


def test_cpu_workers_report_no_device_memory(client):
    for w in client.scheduler_info()["workers"].values():
        assert (w["device_memory"], w["device_memory_limit"], w["device_spilled_bytes"]) == (0, 0, 0)


@contextlib.contextmanager
def _host_target_worker(tmp_path):
    """A client of one worker with a 64 MiB host limit whose managed memory
    above 0.6 of it goes to disk (the process-memory thresholds are off: a
    Python worker's own RSS is near that limit)."""
    config = {"distributed.worker.memory.target": 0.6, "distributed.worker.memory.spill": False,
              "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False}
    with dask.config.set(config), LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=64 * MB,
                                               local_directory=str(tmp_path), dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def test_device_values_go_on_to_disk_under_the_host_limit_and_come_back(standin, monkeypatch, tmp_path):
    # Device limit 8 MiB; host: values above 0.6 of 64 MiB go to disk.
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", str(8 * MB))
    n = MB // 8
    with _host_target_worker(tmp_path) as client:
        parts = client.map(make, range(64), n=n)
        rdask.wait(parts)

        # 8 MiB stay on the device; of the 56 MiB moved to host memory, what
        # is above the host target (38.4 MiB) goes on to disk.
        def settled():
            w = next(iter(client.scheduler_info()["workers"].values()))
            ok = w["spilled_values"] >= 16 and w["device_memory"] <= 8 * MB and w["device_spilled_bytes"] <= 0.6 * 64 * MB
            return w if ok else None

        info = _until(settled)
        assert info, next(iter(client.scheduler_info()["workers"].values()))
        assert info["device_spilled_total_bytes"] > 0 and info["spilled_total_bytes"] >= 16 * MB
        sums = client.map(total, *[parts[i::16] for i in range(16)])
        assert sum(client.gather(sums)) == sum(float(i) * n for i in range(64))
        # Read back from disk, the values were device arrays again.
        assert client.submit(how_it_arrived, parts[0]).result()[:2] == ("StandInArray", "DeviceBuffer")


def test_device_values_count_against_the_device_limit_not_the_host_one(standin, monkeypatch, tmp_path):
    """As in dask-cuda, a device array counts against the device memory
    limit: 48 MiB of device values on a worker whose host target is 38 MiB
    stay on the device, nothing is written to disk, and the host figures
    show only their host part. Moved to host memory, they count there."""
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    n = MB // 8
    with _host_target_worker(tmp_path) as client:
        parts = client.map(make, range(48), n=n)
        rdask.wait(parts)

        def worker():
            return next(iter(client.scheduler_info()["workers"].values()))

        assert _until(lambda: worker()["device_memory"] == 48 * MB), worker()
        time.sleep(1.0)  # ten rounds of the memory monitor, two heartbeats
        w = worker()
        assert w["spilled_values"] == 0 and w["device_memory"] == 48 * MB, w
        assert w["managed_bytes"] < 4 * MB, w
        assert sum(client.gather(client.map(total, parts))) == sum(float(i) * n for i in range(48))


def test_scattered_device_values_reach_in_process_workers_as_device_arrays(standin, monkeypatch):
    from rdask.testing import StandInArray

    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    with LocalCluster(n_workers=2, processes=False, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        # Scattered data is a task's payload (pickled as NumPy) run where it
        # is placed; another worker fetches it from there as device frames.
        x = client.scatter(StandInArray(np.arange(10.0).reshape(2, 5)), workers=[a])
        assert client.submit(how_it_arrived, x, workers=[a], pure=False).result() == ("StandInArray", "NoneType", 45.0)
        assert client.submit(how_it_arrived, x, workers=[b], pure=False).result() == ("StandInArray", "DeviceBuffer", 45.0)
        back = x.result()
        assert back.array.shape == (2, 5) and back.array.dtype == np.float64 and back.array[1, 4] == 9.0
        empty = client.submit(make_empty, workers=[a])
        got = client.submit(lambda e: (e.array.shape, e.array.dtype.str, type(e._owner).__name__), empty, workers=[b]).result()
        assert got == ((0, 3), "<i4", "DeviceBuffer")


def make_pattern(n):
    from rdask.testing import StandInArray

    return StandInArray(np.arange(n, dtype=np.float64) % 1000.0), StandInArray(np.full(5, 7, dtype=np.int16))


def check_pattern(pair):
    big, small = pair
    want = np.arange(big.array.size, dtype=np.float64) % 1000.0
    return (type(big._owner).__name__, bool(np.array_equal(big.array, want)), small.array.tolist(),
            type(small._owner).__name__)


def pattern_from_a_to_b(client, n):
    """Makes the pattern value on the first worker and checks it as an input
    on the second; returns both workers and the value's future."""
    a, b = sorted(client.scheduler_info()["workers"])
    x = client.submit(make_pattern, n, workers=[a])
    assert client.submit(check_pattern, x, workers=[b]).result() == ("DeviceBuffer", True, [7] * 5, "DeviceBuffer")
    return a, b, x


@pytest.mark.parametrize("protocol", ["tcp", "ucx"])
def test_large_device_values_leave_their_worker_in_staging_chunks(standin, monkeypatch, protocol):
    if protocol == "ucx" and not rdask._rdask.ucx_status()[0]:
        pytest.skip(f"UCX is not usable here: {rdask._rdask.ucx_status()[1]}")
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_DEVICE_IPC", "0")  # as between nodes
    monkeypatch.setenv("RDASK_DEVICE_DIRECT", "0")  # as over a UCX without the device's memory
    n = (40 * MB + 12_344) // 8  # a little over 40 MiB: 6 chunks of 8 MiB at most
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, protocol=protocol) as cluster, \
            Client(cluster) as client:
        a, b, x = pattern_from_a_to_b(client, n)
        big, small = x.result()  # the client is a requester too
        assert np.array_equal(big.array, np.arange(n, dtype=np.float64) % 1000.0) and small.array.tolist() == [7] * 5
        stats = client.run(lambda: rdask._rdask.staging_stats(), workers=[a])[a]
        chunk = stats["chunk_bytes"]
        # Two requests (worker b, the client); per value the big array's
        # chunks and one for the small array (chunks never span arrays).
        assert stats["values"] == 2 and stats["chunks"] == 2 * (-(-(n * 8) // chunk) + 1), stats
        assert stats["bytes"] == 2 * (n * 8 + 10), stats
        assert 1 <= stats["most_buffers"] <= 4, "host memory of a transfer stays within the staging pool"
        # The receivers copied each chunk into device memory as it came.
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        assert got["values"] == 1 and got["chunks"] == stats["chunks"] // 2 and got["imported_arrays"] == 0, got
        assert rdask._rdask.receive_stats()["values"] >= 1, "the client too"


def test_device_bytes_count_nested_arrays_once_each(standin):
    from rdask import serialize
    from rdask.testing import StandInArray

    a, b = StandInArray(np.ones(1000)), StandInArray(np.ones(10, np.int8))
    assert serialize.device_nbytes(a) == 8000
    assert serialize.device_nbytes([a, a, {"x": (b, [a])}]) == 8010
    assert serialize.device_nbytes({"deep": [[[[[[(b,)]]]]]], "host": np.ones(10**6)}) == 10

    class Matrix:  # arrays held as attributes, as a CuPy sparse matrix holds them
        def __init__(self, data, indices):
            self.data, self.indices, self.shape = data, indices, (3, 3)

    assert serialize.device_nbytes(Matrix(a, b)) == 8010
    assert serialize.device_nbytes([Matrix(a, b), a]) == 8010
    # Cycles are looked at once; objects that misbehave when looked at are passed over.
    import weakref

    class Gone:
        pass

    loop = [a]
    loop.append(loop)
    dead = weakref.proxy(Gone())  # touching it raises ReferenceError
    assert serialize.device_nbytes([loop, dead, Matrix(b, dead)]) == 8010
    # A huge list is looked at only so far: bounded work for any result.
    many = [1.0] * 50_000 + [a]
    assert serialize.device_nbytes(many) == 0 and serialize.device_nbytes(many[::-1]) == 8000


def test_device_frames_round_trip_any_dtype_and_nested(standin):
    from rdask import serialize
    from rdask.testing import StandInArray

    stamps = StandInArray(np.array(["2026-12-02T20:00", "2027-01-01"], dtype="datetime64[ns]"))
    grid = StandInArray(np.arange(12, dtype=np.complex128).reshape(3, 4))
    value = {"t": stamps, "nested": [grid, (StandInArray(np.zeros(0, np.int8)), 3)], "host": np.ones(4)}
    frames = serialize.dumps(value)
    assert bytes(memoryview(frames[0])[:4]) == b"RDV1"
    back, _, device = serialize.loads_sized(frames)
    assert back["t"].array.dtype == stamps.array.dtype and (back["t"].array == stamps.array).all()
    assert (back["nested"][0].array == grid.array).all() and back["nested"][1][1] == 3
    assert back["nested"][1][0].array.shape == (0,) and (back["host"] == 1).all()
    assert type(back["t"]._owner).__name__ == "DeviceBuffer"
    # Counted: every array, however deeply nested.
    assert device == stamps.nbytes + grid.nbytes
    # A view that outlives its StandInArray keeps the device memory alive.
    view = np.asarray(serialize.loads_value(serialize.dumps(grid)))
    del back
    assert (view == grid.array).all()


def test_a_value_of_a_script_class_is_copied_off_the_device_once():
    """Plain pickle names `__main__` for a script's class and the value is
    pickled again by cloudpickle: its device arrays are still read once."""
    code = """
import os
os.environ["RDASK_DEVICE"] = "standin"
import numpy as np
import rdask._rdask as r
from rdask import serialize
from rdask.testing import StandInArray

class Holder:
    def __init__(self, a):
        self.a = a

before = r.staging_stats()["waited_stream"]
back = serialize.loads_value(serialize.dumps(Holder(StandInArray(np.arange(1000.0), stream=7))))
print(r.staging_stats()["waited_stream"] - before, float(back.a.array.sum()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "499500.0"], out.stdout


def test_non_contiguous_cupy_arrays_travel_as_contiguous_copies():
    """CuPy arrays that are not C-contiguous (a transpose) travel as a
    C-contiguous copy made when the bytes are read; here a stand-in CuPy
    module over host memory (the real one needs a GPU)."""
    code = """
import os, sys, types
os.environ["RDASK_DEVICE"] = "standin"
import numpy as np
from rdask import device, serialize
from rdask.testing import StandInArray

cupy = types.ModuleType("cupy")
class ndarray:
    def __init__(self, a):
        self.a = a
    @property
    def __cuda_array_interface__(self):
        a = self.a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False),
                "strides": None if a.flags.c_contiguous else a.strides, "version": 3}
ndarray.__module__ = "cupy"
copies = []
def ascontiguousarray(x):
    copies.append(1)
    return ndarray(np.ascontiguousarray(x.a))
cupy.ndarray, cupy.ascontiguousarray = ndarray, ascontiguousarray
cupy.asarray = lambda buf: ndarray(StandInArray.from_device(buf).array)
sys.modules["cupy"] = cupy

grid = np.arange(12, dtype=np.int32).reshape(3, 4)
back = serialize.loads_value(serialize.dumps([ndarray(grid.T), ndarray(grid)]))
print(back[0].a.tolist() == grid.T.tolist(), back[0].a.flags.c_contiguous, back[1].a.tolist() == grid.tolist(), len(copies))
frames, parts, keep = device.dumps_staged(ndarray(grid.T), lambda head, buffers: [head, *buffers])
print(len(parts), parts[0][1], any(isinstance(k, ndarray) and k.a.flags.c_contiguous for k in keep))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "1", "1", "48", "True"], out.stdout


def test_a_requester_killed_mid_transfer_leaves_the_sender_serving(standin, monkeypatch):
    import signal

    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_DEVICE_IPC", "0")  # staging chunks, as between nodes
    n = 192 * MB // 8
    with LocalCluster(n_workers=3, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, timeout=30) as client:
        by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
        holder, victim, other = by_name["0"], by_name["1"], by_name["2"]
        x = client.submit(make_pattern, n, workers=[holder])
        rdask.wait(x)
        client.submit(check_pattern, x, workers=[victim], pure=False)  # starts a 192 MiB fetch
        time.sleep(0.05)
        os.kill(cluster.workers["1"].pid, signal.SIGKILL)
        # The holder goes on serving the value, in chunks, to everyone else.
        got = client.submit(check_pattern, x, workers=[other], pure=False).result(timeout=60)
        assert got == ("DeviceBuffer", True, [7] * 5, "DeviceBuffer")
        big, _ = x.result(timeout=60)
        assert big.array[-1] == (n - 1) % 1000.0


@pytest.mark.parametrize("mib", [0, 40])
def test_device_values_between_processes_of_a_node_go_by_ipc(standin, monkeypatch, mib):
    """Workers of one node (and a client there) import a device value from
    its holder's memory (CUDA IPC on a GPU; the stand-in reads the holder's
    memory through the kernel): no bytes over the network, and the holder
    lets go of it once the requester says it copied it."""
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    n = (mib * MB + 12_344) // 8
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        a, b, x = pattern_from_a_to_b(client, n)
        big, small = x.result()  # the client, on this node too
        assert np.array_equal(big.array, np.arange(n, dtype=np.float64) % 1000.0) and small.array.tolist() == [7] * 5
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        assert got["imported_arrays"] == 2 and got["imported_bytes"] == n * 8 + 10 and got["chunks"] == 0, got
        assert rdask._rdask.receive_stats()["imported_arrays"] >= 2, "the client imported too"

        def sent():
            return client.run(lambda: rdask._rdask.staging_stats(), workers=[a])[a]

        stats = sent()
        assert stats["shared_values"] == 2 and stats["values"] == 0 and stats["bytes"] == 0, stats
        assert _until(lambda: sent()["shared_held"] == 0), "released after the copies: %r" % sent()


def test_a_refused_ipc_import_falls_back_to_the_network(standin, monkeypatch):
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_STANDIN_IPC", "refuse")  # as GPUs without peer access
    n = 20 * MB // 8
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        a, b, x = pattern_from_a_to_b(client, n)
        y = client.submit(make_pattern, n, workers=[a], pure=False)
        assert client.submit(check_pattern, y, workers=[b]).result()[1], "the next value comes over the network at once"
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        assert got["imported_arrays"] == 0 and got["values"] == 2 and got["chunks"] > 0, got
        stats = client.run(lambda: rdask._rdask.staging_stats(), workers=[a])[a]
        assert stats["shared_values"] == 1 and stats["values"] == 2, "one offer, then staging only: %r" % stats
        assert _until(lambda: client.run(lambda: rdask._rdask.staging_stats(), workers=[a])[a]["shared_held"] == 0)


def test_memory_mapped_here_already_is_fetched_over_the_network_that_once(standin, monkeypatch):
    """CUDA refuses to map memory a second time in a process (UCX's CUDA IPC
    may have mapped it): that value comes over the network, and the next
    ones are imported by IPC again, unlike a peer whose imports are refused."""
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_STANDIN_IPC", "mapped-once")
    n = 20 * MB // 8
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        a, b, x = pattern_from_a_to_b(client, n)
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        assert got["imported_arrays"] == 0 and got["values"] == 1 and got["chunks"] > 0, got
        chunks = got["chunks"]
        y = client.submit(make_pattern, n, workers=[a], pure=False)
        assert client.submit(check_pattern, y, workers=[b]).result()[1]
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        assert got["imported_arrays"] == 2 and got["chunks"] == chunks, "the next value is imported: %r" % got


@pytest.mark.parametrize("mib", [0, 20])
def test_device_memory_that_cannot_be_shared_goes_as_bytes(standin, monkeypatch, mib):
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_STANDIN_IPC", "unshareable")  # as a stream-ordered pool's memory
    n = (mib * MB + 800) // 8
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        a, b, x = pattern_from_a_to_b(client, n)
        stats = client.run(lambda: rdask._rdask.staging_stats(), workers=[a])[a]
        assert stats["shared_values"] == 0 and stats["values"] == (1 if mib else 0), stats
        assert client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]["imported_arrays"] == 0


@pytest.mark.parametrize("protocol", ["tcp", "ucx"])
def test_a_full_device_makes_room_for_arriving_values(standin, monkeypatch, protocol):
    """No limit set, but the device itself runs full (a stand-in of 14 MiB):
    a value arriving from a peer moves the least recently used device
    values to host memory instead of failing the fetch. Over TCP the value
    is imported by IPC; over UCX it comes as device frames, which land in
    host memory when the device is full and are copied in once room is made."""
    if protocol == "ucx":
        if not rdask._rdask.ucx_status()[0]:
            pytest.skip(f"UCX is not usable here: {rdask._rdask.ucx_status()[1]}")
        monkeypatch.setenv("RDASK_DEVICE_IPC", "0")
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_STANDIN_CAPACITY", str(14 * MB))
    n = 4 * MB // 8
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, protocol=protocol) as cluster, \
            Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        xs = [client.submit(make, i, n, workers=[a], pure=False) for i in range(6)]
        # One after another, so each input stays on b as a replica.
        for i, x in enumerate(xs):
            assert client.submit(how_it_arrived, x, workers=[b], pure=False).result() == \
                ("StandInArray", "DeviceBuffer", float(i * n))
        moved = _until(lambda: client.scheduler_info()["workers"][b]["device_spilled_total_bytes"] or None)
        assert moved and moved >= 4 * MB * 3, client.scheduler_info()["workers"][b]
        # Replicas moved to host memory come back to the device when used
        # (making room again).
        assert client.submit(total, xs[0], xs[1], workers=[b], pure=False).result() == float(n)
        if protocol == "ucx":
            got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
            assert got["direct_arrays"] == 6 and got["direct_on_host"] >= 1 and got["chunks"] == 0, got


@pytest.mark.parametrize("mib", [0, 40])
def test_device_values_go_as_device_frames_over_ucx(standin, monkeypatch, mib):
    """Over a UCX that moves the device's memory (CUDA transports for a GPU;
    host memory, which every UCX moves, for the stand-in) each array of a
    device value goes as one device frame: sent from the array's memory and
    received into device memory the requester allocated, with no staging
    chunks at either end."""
    if not rdask._rdask.ucx_status()[0]:
        pytest.skip(f"UCX is not usable here: {rdask._rdask.ucx_status()[1]}")
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_DEVICE_IPC", "0")  # as between nodes
    n = (mib * MB + 12_344) // 8
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", protocol="ucx") as cluster, \
            Client(cluster) as client:
        a, b, x = pattern_from_a_to_b(client, n)
        base = cluster.dashboard_link.rsplit("/", 1)[0]

        def fetched():  # the transfer figures count the arrays' bytes, not their handles
            with urllib.request.urlopen(base + "/api/snapshot", timeout=10) as r:
                got = max(row["bytes_in"] for row in json.loads(r.read())["workers"])
            return got if got >= n * 8 + 10 else None

        assert _until(fetched), "the dashboard's incoming bytes miss the device arrays"
        big, small = x.result()  # the client, over UCX too
        assert np.array_equal(big.array, np.arange(n, dtype=np.float64) % 1000.0) and small.array.tolist() == [7] * 5
        # Two requests (worker b from a; the client from a or from b's
        # replica), two arrays each.
        by_worker = client.run(lambda: rdask._rdask.staging_stats())
        sent = {k: sum(st[k] for st in by_worker.values()) for k in ("direct_values", "direct_arrays", "direct_bytes", "chunks")}
        assert sent["direct_values"] == 2 and sent["direct_arrays"] == 4, sent
        assert sent["direct_bytes"] == 2 * (n * 8 + 10) and sent["chunks"] == 0, sent
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        assert got["values"] == 1 and got["direct_arrays"] == 2 and got["direct_bytes"] == n * 8 + 10, got
        assert got["direct_on_host"] == 0 and got["chunks"] == 0 and got["imported_arrays"] == 0, got


def test_a_full_device_asks_array_libraries_for_their_cached_memory_first():
    """CuPy's pools (and PyTorch's caching allocator) keep freed device
    memory that rdask's own allocations cannot use: when the device is full,
    rdask asks them to give it back before anything else."""
    code = """
import sys, types
import rdask._rdask as r
MB = 1 << 20
cached = [r.device_upload([bytes(4 * MB)], [4 * MB], "|u1") for _ in range(2)]  # a pool's blocks
calls = []
class Pool:
    def free_all_blocks(self):
        calls.append(1)
        cached.clear()
cupy = types.ModuleType("cupy")
cupy.get_default_memory_pool = cupy.get_default_pinned_memory_pool = Pool
sys.modules["cupy"] = cupy
buf = r.device_upload([bytes(4 * MB)], [4 * MB], "|u1")
print(buf.nbytes, len(calls) > 0)
"""
    env = {**os.environ, "RDASK_DEVICE": "standin", "RDASK_STANDIN_CAPACITY": str(10 * MB)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(4 * MB), "True"], out.stdout


def make_on_stream(n, stream):
    from rdask.testing import StandInArray

    return StandInArray(np.full(n, 1.0)) if stream == "absent" else StandInArray(np.full(n, 1.0), stream=stream)


def test_copies_off_the_device_wait_for_the_stream_the_array_names(standin, monkeypatch):
    """`__cuda_array_interface__`'s `stream` says what must finish before an
    array is read: that stream, nothing (None), or, when an older producer
    gives none, the whole device. Small values (copied off at once when
    the task ends) and large ones (staged while sent) alike."""
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    monkeypatch.setenv("RDASK_DEVICE_IPC", "0")
    monkeypatch.setenv("RDASK_DEVICE_DIRECT", "0")
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        (w,) = client.scheduler_info()["workers"]

        def waits():
            stats = client.run(lambda: rdask._rdask.staging_stats(), workers=[w])[w]
            return {k: v for k, v in stats.items() if k.startswith("waited_")}

        before = waits()
        for n in (1000, 20 * MB // 8):
            # The default streams (1, 2) are the whole device: a library may
            # name the stream current on rdask's thread, not the writer's.
            for stream, counted in ((None, "waited_not_needed"), (7, "waited_stream"), ("absent", "waited_device"),
                                    (1, "waited_device"), (2, "waited_device")):
                x = client.submit(make_on_stream, n, stream, pure=False)
                assert float(x.result().array.sum()) == n
                after = waits()
                assert after[counted] == before[counted] + 1 and sum(after.values()) == sum(before.values()) + 1, \
                    (n, stream, before, after)
                before = after
                del x


def test_an_array_said_to_be_ready_is_waited_for_when_another_process_reads_it(standin, monkeypatch):
    """`stream: None` is trusted for rdask's own copies (ordered after the
    legacy default stream's work) but not when another process imports the
    memory by IPC: the holder waits for the whole device then."""
    monkeypatch.setenv("RDASK_DEVICE_MEMORY_LIMIT", "0")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])

        def waits():
            return client.run(lambda: rdask._rdask.staging_stats(), workers=[a])[a]

        x = client.submit(make_on_stream, 1000, None, workers=[a])
        rdask.wait(x)
        before = waits()
        assert client.submit(lambda v: float(v.array.sum()), x, workers=[b]).result() == 1000.0
        after = waits()
        assert after["shared_values"] == before["shared_values"] + 1, after
        assert after["waited_device"] == before["waited_device"] + 1, (before, after)
