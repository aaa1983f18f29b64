"""GPU launchers on a machine without an NVIDIA driver (CI, this project's
machines): every path says what is missing in one line and starts nothing;
layouts are checked on a described 8-GPU node."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

import rdask
from rdask import cuda, topology

BIN = os.path.dirname(sys.executable)
CUDA_WORKER = os.path.join(BIN, "rdask-cuda-worker")
RDASK = os.path.join(BIN, "rdask")
DGX = os.path.join(os.path.dirname(__file__), "..", "..", "worker", "tests", "fixtures", "dgx-like.xml")


def has_driver() -> bool:
    try:
        cuda.gpu_devices()
        return True
    except rdask.GpuUnavailableError:
        return False


no_driver = pytest.mark.skipif(has_driver(), reason="this machine has an NVIDIA driver")


@no_driver
def test_cuda_worker_without_a_driver_exits_1_with_one_clear_line():
    out = subprocess.run([CUDA_WORKER, "tcp://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "libnvidia-ml.so.1" in lines[0] and "Traceback" not in out.stderr


@no_driver
def test_local_cuda_cluster_without_a_driver_raises_before_starting_anything():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(rdask.GpuUnavailableError, match="libnvidia-ml.so.1"):
        rdask.LocalCUDACluster()
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, "no worker process was started"


def test_cuda_worker_names_flags_it_does_not_support():
    out = subprocess.run([CUDA_WORKER, "tcp://127.0.0.1:1", "--rmm-pool-size", "10GB"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--rmm-pool-size is not supported" in out.stderr
    out = subprocess.run([CUDA_WORKER, "tcp://127.0.0.1:1", "--protocol", "inproc"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "protocol 'inproc' is not supported" in out.stderr


def test_cuda_layout_of_a_described_eight_gpu_node():
    out = subprocess.run([RDASK, "topology", "--cuda", "--xml", DGX, "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    workers = json.loads(out.stdout)["workers"]
    assert len(workers) == 8
    for i, w in enumerate(workers):
        assert w["nthreads"] == 1
        assert w["numa"] == i // 2
        assert w["cpus"] == list(range(16 * (i // 2), 16 * (i // 2) + 16))
        visible = w["gpu"]["visible_devices"].split(",")
        assert visible[0] == str(i) and sorted(visible, key=int) == [str(k) for k in range(8)]


def test_cuda_plan_limits_device_memory_and_labels_each_gpu():
    topo = topology.read(xml=DGX)
    gpus = [{"index": g["index"], "uuid": f"GPU-{g['index']}", "name": g["name"], "pci_bus_id": g["pci_bus_id"],
             "memory": 40 << 30, "cpus": []} for g in topo["gpus"]]
    specs = cuda.plan(topo, gpus, visible="3,0", device_memory_limit=0.8)
    assert [s["gpu"]["visible_devices"] for s in specs] == ["3,0", "0,3"]
    assert all(s["device_memory_limit"] == int((40 << 30) * 0.8) for s in specs)
    assert specs[0]["gpu_label"] == "3: NVIDIA A100-SXM4-40GB (0000:52:00.0)"
    fixed = cuda.plan(topo, gpus, visible="1", device_memory_limit="10GiB")
    assert fixed[0]["device_memory_limit"] == 10 << 30
    env = cuda._worker_env(specs[0])
    assert env["CUDA_VISIBLE_DEVICES"] == "3,0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        cuda.plan(topo, gpus, visible="9")


def test_cuda_worker_ucx_flags_need_ucx():
    out = subprocess.run([CUDA_WORKER, "tcp://127.0.0.1:1", "--enable-nvlink", "--dashboard-address", ":0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "enable_nvlink need protocol 'ucx'" in out.stderr, out.stderr
    # A worker's dashboard address is accepted with a warning, as by rdask-worker.
    assert "--dashboard-address is accepted and ignored" in out.stderr, out.stderr
    assert cuda.ucx_env("ucx") == {}, "without flags UCX picks its transports"
    assert cuda.ucx_env("ucx", enable_nvlink=True, enable_infiniband=True) == {"UCX_TLS": "cuda_copy,rc,cuda_ipc,tcp"}
    assert cuda.ucx_env("ucx", enable_rdmacm=True, net_devices="mlx5_0:1") == \
        {"UCX_TLS": "cuda_copy,rdmacm", "UCX_NET_DEVICES": "mlx5_0:1"}
    with pytest.raises(TypeError, match="rmm_pool_size not supported"):
        rdask.LocalCUDACluster(rmm_pool_size="1GB")
    with pytest.raises(ValueError, match="need protocol 'ucx'"):
        rdask.LocalCUDACluster(enable_nvlink=True)


FAKE_GPUS = [{"index": i, "uuid": f"GPU-{i}", "name": "Test GPU", "pci_bus_id": f"0000:0{i}:00.0",
              "memory": 1 << 30, "cpus": []} for i in range(2)]


def make_standin(n):
    from rdask.testing import StandInArray

    return StandInArray(np.arange(n, dtype=np.float64))


@pytest.mark.skipif(not rdask._rdask.ucx_status()[0] and not os.environ.get("RDASK_REQUIRE_UCX"), reason="needs UCX")
def test_ucx_says_which_memory_it_moves_as_device_frames():
    """A dask-cuda user on UCX expects GPU-to-GPU transfers; rdask says
    whether this UCX can (CUDA transports) or device values are staged."""
    code = "import rdask._rdask as r, rdask.cuda as c; print(r.ucx_memory_kinds()); print(c.ucx_device_path())"
    for off in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "RDASK_UCX_DEVICE_FRAMES"}
        if off:
            env["RDASK_UCX_DEVICE_FRAMES"] = "0"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        kinds, line = out.stdout.splitlines()
        if off:
            assert kinds == "[]" and line.startswith("device frames are off (RDASK_UCX_DEVICE_FRAMES=0"), out.stdout
        elif "cuda" in kinds:  # a UCX with CUDA transports (the GPU machine's carried one)
            assert kinds == "['host', 'cuda']" and "GPU to GPU" in line, out.stdout
        else:  # Debian's libucx
            assert kinds == "['host']" and line.startswith("this UCX has no CUDA transports"), out.stdout
            assert "libucx-cu13" in line


@pytest.mark.skipif(not rdask._rdask.ucx_status()[0] and not os.environ.get("RDASK_REQUIRE_UCX"), reason="needs UCX")
def test_local_cuda_cluster_over_ucx_gives_its_workers_the_protocol_and_ucx_settings(monkeypatch):
    """dask-cuda's `LocalCUDACluster(protocol="ucx", enable_tcp_over_ucx=True)`:
    one worker per GPU (two described GPUs; the stand-in device), each
    listening on UCX with the settings the flags stand for, and device
    values between them go as device frames."""
    monkeypatch.setattr(cuda, "gpu_devices", lambda: FAKE_GPUS)
    monkeypatch.setenv("RDASK_DEVICE", "standin")
    monkeypatch.setenv("RDASK_DEVICE_IPC", "0")  # as between nodes
    with rdask.LocalCUDACluster(protocol="ucx", enable_tcp_over_ucx=True, dashboard_address=None) as cluster, \
            rdask.Client(cluster) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2 and all(a.startswith("ucx://") for a in workers), list(workers)
        env = client.run(lambda: (os.environ.get("UCX_TLS"), os.environ.get("CUDA_VISIBLE_DEVICES")))
        assert sorted(v[1] for v in env.values()) == ["0,1", "1,0"]
        assert {v[0] for v in env.values()} == {"cuda_copy,tcp"}
        a, b = sorted(workers)
        x = client.submit(make_standin, 100_000, workers=[a])
        assert client.submit(lambda v: float(v.array.sum()), x, workers=[b]).result() == float(sum(range(100_000)))
        got = client.run(lambda: rdask._rdask.receive_stats(), workers=[b])[b]
        assert got["direct_arrays"] == 1, got
