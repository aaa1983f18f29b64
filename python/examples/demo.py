"""The main demo: dask.distributed-style code on an rdask cluster.

    python python/examples/demo.py                    # starts a LocalCluster
    python python/examples/demo.py --scheduler-file F # joins a running cluster
"""

import argparse
import operator
import os
import time

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd

from rdask import Client, as_completed, get_worker


def step(title):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def done(t0, what):
    print(f"   {what} ({time.perf_counter() - t0:.2f} s)", flush=True)


def where(x):
    return x, get_worker().name, os.getpid()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scheduler-file")
    p.add_argument("--map-tasks", type=int, default=100_000)
    a = p.parse_args()
    client = Client(scheduler_file=a.scheduler_file) if a.scheduler_file else Client(n_workers=2, threads_per_worker=1)
    with client:
        info = client.scheduler_info()
        print(f"connected: {client}")
        for w in info["workers"].values():
            print(f"   worker {w['name']:<24} {w['address']:<24} threads={w['nthreads']} memory_limit={w['memory_limit']}")

        t = step("futures: submit, dependencies, as_completed")
        x = client.submit(operator.add, 1, 2)
        y = client.submit(operator.mul, x, 10)
        placed = client.map(where, range(6), pure=False)
        seen = sorted({name for _, name, _ in client.gather(placed)})
        print(f"   (1 + 2) * 10 = {y.result()}; tasks ran on workers {seen}")
        order = [f.result()[0] for f in as_completed(client.map(where, [3, 1, 2], key=["w3", "w1", "w2"]))]
        done(t, f"as_completed yielded {sorted(order)}")

        t = step(f"client.map of {a.map_tasks:,} trivial calls + gather")
        futures = client.map(operator.neg, range(a.map_tasks))
        total = sum(client.gather(futures))
        elapsed = time.perf_counter() - t
        assert total == -sum(range(a.map_tasks))
        print(f"   sum = {total:,}: {a.map_tasks / elapsed:,.0f} tasks/s end to end")
        del futures

        t = step("errors travel with their type and traceback")
        bad = client.submit(operator.truediv, 1, 0)
        try:
            bad.result()
        except ZeroDivisionError as e:
            print(f"   raised ZeroDivisionError({e}) on the client; cluster still fine: {client.submit(sum, [1, 2]).result()}")
        done(t, "ok")

        t = step("dask.delayed tree reduction (depth 10) via dask.compute")
        leaves = [dask.delayed(operator.add)(i, 1) for i in range(1024)]
        while len(leaves) > 1:
            leaves = [dask.delayed(operator.add)(leaves[i], leaves[i + 1]) for i in range(0, len(leaves), 2)]
        (res,) = dask.compute(leaves[0])
        assert res == sum(range(1, 1025))
        done(t, f"sum = {res}")

        t = step("dask.array: (x + x.T).mean(axis=0).std() on 4000x4000, 500x500 chunks")
        x = da.random.default_rng(0).random((4000, 4000), chunks=(500, 500))
        v = (x + x.T).mean(axis=0).std().compute()
        done(t, f"std = {v:.6f}")

        t = step("dask.dataframe: groupby-agg and a join")
        pdf = pd.DataFrame({"k": np.arange(200_000) % 97, "v": np.arange(200_000, dtype="float64")})
        df = dd.from_pandas(pdf, npartitions=8)
        g = df.groupby("k").v.mean().compute()
        right = dd.from_pandas(pd.DataFrame({"k": np.arange(97), "name": [f"g{i}" for i in range(97)]}), npartitions=2)
        joined = df.merge(right, on="k").compute()
        assert len(joined) == len(pdf) and np.isclose(g.loc[3], pdf[pdf.k == 3].v.mean())
        done(t, f"{len(g)} groups, {len(joined):,} joined rows")

        t = step("dask.bag: word frequencies")
        words = db.from_sequence(["rust", "dask", "rdask", "rust"] * 1000, npartitions=4)
        freq = dict(words.frequencies().compute())
        done(t, f"{freq}")

        t = step("persist once, reuse twice")
        p = df.v.persist()
        done(t, f"sum = {p.sum().compute():,.0f}, max = {p.max().compute():,.0f}")
    print("\nclient closed" + ("" if a.scheduler_file else " (and the LocalCluster it started)"))


if __name__ == "__main__":
    main()
