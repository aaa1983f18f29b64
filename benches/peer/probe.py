"""Small probes of rdask alone, for looking into one figure of the peer
benchmark (2 worker processes x 1 thread, like it):

    .venv/bin/python benches/peer/probe.py move --mib 1024 --rounds 3
    .venv/bin/python benches/peer/probe.py map --tasks 100000 --rounds 3

`move`: an array made on one worker, read by a task on the other, released,
again; prints each transfer's time and the bytes the receiving worker keeps
for reuse (`bufpool`). `map`: client.map over distinct inputs, then gather;
prints the time in map() and in gather().
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rdask import Client, LocalCluster, _rdask, wait


def make(nbytes):
    return np.ones(nbytes // 8)


def nbytes(x):
    return x.nbytes


def pooled():
    return _rdask.receive_pool_bytes()


def inc(x):
    return x + 1


def probe_move(client, mib: int, rounds: int):
    a, b = sorted(client.scheduler_info()["workers"])[:2]
    n = mib << 20
    for r in range(rounds):
        src = client.submit(make, n, workers=[a], pure=False)
        wait([src])
        t0 = time.perf_counter()
        got = client.submit(nbytes, src, workers=[b], pure=False).result()
        dt = time.perf_counter() - t0
        assert got == n, (got, n)
        del src
        time.sleep(1)  # the release reaches both workers
        kept = client.submit(pooled, workers=[b], pure=False).result()
        print(f"move {mib} MiB round {r}: {dt:.3f} s = {mib / dt:.0f} MiB/s; receiver keeps {kept >> 20} MiB for reuse")


def probe_map(client, tasks: int, rounds: int):
    for r in range(rounds):
        t0 = time.perf_counter()
        futures = client.map(inc, range(r * tasks, (r + 1) * tasks))
        t1 = time.perf_counter()
        values = client.gather(futures)
        t2 = time.perf_counter()
        assert values[-1] == (r + 1) * tasks
        del futures, values
        print(f"map {tasks} round {r}: {tasks / (t2 - t0):.0f} tasks/s; map() {t1 - t0:.3f} s, gather() {t2 - t1:.3f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["move", "map"])
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster, set_as_default=False) as client:
        if a.what == "move":
            probe_move(client, a.mib, a.rounds)
        else:
            client.gather(client.map(inc, range(-1000, 0)))  # warm up
            probe_map(client, a.tasks, a.rounds)


if __name__ == "__main__":
    main()
