"""Resources limit how many tasks run at once on a worker, as in Dask: a
worker with GPU=1 runs one task needing GPU=1 at a time, however many
threads it has; other tasks keep running beside it."""

from __future__ import annotations

import time

from rdask import Client, LocalCluster


def timed(i, delay):
    start = time.time()
    time.sleep(delay)
    return start, time.time()


def max_overlap(spans) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def test_a_gpu_worker_runs_one_gpu_task_at_a_time():
    with LocalCluster(n_workers=1, threads_per_worker=3, resources={"GPU": 1}, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        gpu = client.map(timed, range(4), [0.25] * 4, resources={"GPU": 1}, pure=False)
        plain = client.map(timed, range(4, 7), [0.25] * 3, pure=False)
        gpu_spans = client.gather(gpu)
        plain_spans = client.gather(plain)
        assert max_overlap(gpu_spans) == 1, gpu_spans
        # the other threads were not held back by the GPU tasks
        assert max_overlap(gpu_spans + plain_spans) >= 2
        # and two units of GPU let two such tasks run together
    with LocalCluster(n_workers=1, threads_per_worker=3, resources={"GPU": 2}, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        spans = client.gather(client.map(timed, range(4), [0.25] * 4, resources={"GPU": 1}, pure=False))
        assert max_overlap(spans) == 2, spans
