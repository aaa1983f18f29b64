"""Memory limits on workers: spilling to disk, pausing, and the nanny's
restart above the terminate threshold (Dask's distributed.worker.memory.*)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil
import pytest

import rdask
from rdask import Client, LocalCluster

MB = 10**6


def make_array(i: int, nbytes: int = 100 * MB):
    return np.full(nbytes // 8, float(i))


def allocate(nbytes: int):
    # Touch every page: RSS, not just address space.
    a = np.ones(nbytes // 8)
    time.sleep(0.5)
    return float(a.sum())


class RssWatch:
    """Samples a process's RSS every 10 ms in a thread; `peak` in bytes."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak


def test_twenty_100mb_arrays_on_a_1gb_worker_spill_and_come_back(tmp_path):
    limit = 1 << 30
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=limit, local_directory=str(tmp_path),
                      dashboard_address=None) as cluster, Client(cluster) as client:
        nanny = next(iter(cluster.workers.values()))
        pid = nanny.pid
        watch = RssWatch(pid)
        futures = client.map(make_array, range(20))
        rdask.wait(futures)
        # Heartbeats carry the figures: wait until one shows all 20 values.
        def settled():
            w = next(iter(client.scheduler_info()["workers"].values()))
            # All 20 values counted, and the monitor (every 100 ms) has
            # brought managed memory back under target (one value of slack).
            ok = w["spilled_bytes"] + w["managed_bytes"] >= 20 * 100 * MB and w["managed_bytes"] <= 0.6 * limit + 100 * MB
            return w if ok else None

        assert _until(settled), next(iter(client.scheduler_info()["workers"].values()))
        info = settled()
        assert info["spilled_bytes"] >= 10 * 100 * MB, info
        assert info["metrics"]["spilled_bytes"]["disk"] == info["spilled_bytes"]
        assert info["local_directory"] == str(tmp_path) and info["status"] == "running"
        assert info["memory_limit"] == limit and isinstance(info["resources"], dict)
        assert info["managed_bytes"] <= 0.6 * limit + 100 * MB
        spill_dirs = [d for d in os.listdir(tmp_path) if d.startswith("rdask-spill-")]
        assert len(spill_dirs) == 1 and os.listdir(tmp_path / spill_dirs[0]), "values are spilled under --local-directory"

        values = client.gather(futures)
        peak = watch.stop()
        for i, v in enumerate(values):
            assert v.shape == (100 * MB // 8,) and v[0] == i and v[-1] == i
        assert nanny.pid == pid and nanny.memory_kills == 0, "the worker was never restarted"
        print(f"worker RSS peak {peak / 2**20:.0f} MiB, spilled {info['spilled_bytes'] / 2**20:.0f} MiB")
        assert peak < limit, f"worker RSS peaked at {peak / 2**20:.0f} MiB over its {limit / 2**20:.0f} MiB limit"
        # A task that needs spilled inputs reads them back.
        total = client.submit(lambda *xs: sum(float(x[0]) for x in xs), *futures[:5]).result()
        assert total == sum(range(5))
        del futures, values
        # Released values leave the disk.
        deadline = time.time() + 10
        while os.listdir(tmp_path / spill_dirs[0]) and time.time() < deadline:
            time.sleep(0.1)
        assert not os.listdir(tmp_path / spill_dirs[0])


def test_a_task_that_blows_the_memory_limit_ends_in_killed_worker_and_the_worker_comes_back():
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=500 * MB, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        nanny = next(iter(cluster.workers.values()))
        with pytest.raises(rdask.KilledWorker) as err:
            client.submit(allocate, 2000 * MB, pure=False).result(timeout=120)
        assert "allocate" in str(err.value)
        assert nanny.memory_kills >= 1
        # Back, and working.
        client.wait_for_workers(1, timeout=30)
        assert client.submit(allocate, 10 * MB, pure=False).result(timeout=60) == 10 * MB // 8


def test_memory_thresholds_come_from_dask_config_and_flags():
    from rdask.config import memory_thresholds, parse_fraction

    assert memory_thresholds() == {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
    assert memory_thresholds(target="false", pause=0.5)["target"] is None
    assert memory_thresholds(pause=0.5)["pause"] == 0.5
    os.environ["DASK_DISTRIBUTED__WORKER__MEMORY__SPILL"] = "0.65"
    try:
        assert memory_thresholds()["spill"] == 0.65
    finally:
        del os.environ["DASK_DISTRIBUTED__WORKER__MEMORY__SPILL"]
    import dask

    with dask.config.set({"distributed.worker.memory.target": False}):
        assert memory_thresholds()["target"] is None
    with pytest.raises(ValueError, match="target"):
        parse_fraction("target", 60)


def _status(client):
    return next(iter(client.scheduler_info()["workers"].values()))["status"]


def _until(cond, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_a_worker_above_its_pause_threshold_starts_nothing_until_memory_drops():
    import dask

    # Spilling off, so only the pause threshold acts; 300 MB held on a
    # 600 MB worker is above 0.5 of it.
    config = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
              "distributed.worker.memory.pause": 0.5, "distributed.worker.memory.terminate": False}
    with dask.config.set(config), LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=600 * MB,
                                               dashboard_address=None) as cluster, Client(cluster) as client:
        big = client.submit(make_array, 1, 300 * MB)
        big.result()
        assert _until(lambda: _status(client) == "paused"), "the worker pauses"
        small = client.submit(float, 7)
        time.sleep(1.5)
        assert small.status == "pending", "a paused worker starts no task"
        del big
        assert _until(lambda: _status(client) == "running"), "memory dropped: the worker resumes"
        assert small.result(timeout=30) == 7.0


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB tmpfs: a disk that fills up (needs root, as in CI)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_is_a_clear_error_and_no_value_is_lost(small_disk, capfd):
    limit = 1 << 30
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=limit, local_directory=str(small_disk),
                      dashboard_address=None) as cluster, Client(cluster) as client:
        futures = client.map(make_array, range(8))
        rdask.wait(futures)
        assert _until(lambda: "No space left on device" in capfd.readouterr().err, timeout=20), \
            "the worker says why it cannot spill"
        values = client.gather(futures)
        assert [float(v[0]) for v in values] == list(range(8))
        assert all(v.shape == (100 * MB // 8,) for v in values)
