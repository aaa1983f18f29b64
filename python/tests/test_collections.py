"""Dask collections computed on rdask, each compared with dask's synchronous
scheduler (and, where cheap, with plain numpy/pandas)."""

from __future__ import annotations

import operator
import os

import dask
import rdask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from rdask import Client, Future, LocalCluster, get_client, wait


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def both(client, x):
    """(value on rdask, value with the sync scheduler)."""
    (ours,) = dask.compute(x, scheduler=client.get)
    (ref,) = dask.compute(x, scheduler="sync")
    return ours, ref


@pytest.fixture(scope="module")
def pdf():
    rng = np.random.default_rng(42)
    n = 600
    return pd.DataFrame({
        "g": rng.choice(["a", "b", "c", "d"], n),
        "k": rng.integers(0, 50, n),
        "x": rng.normal(size=n),
        "y": rng.integers(0, 1000, n),
    })


# ---------------------------------------------------------------- delayed
def test_delayed_tree(client):
    level = [dask.delayed(inc)(i) for i in range(16)]
    while len(level) > 1:
        level = [dask.delayed(add)(a, b) for a, b in zip(level[::2], level[1::2])]
    total = level[0]
    ours, ref = both(client, total)
    assert ours == ref == sum(range(1, 17))
    # several outputs at once, in their structure
    outs = dask.compute({"a": dask.delayed(inc)(1), "b": [dask.delayed(add)(2, 3)]}, scheduler=client.get)
    assert outs == ({"a": 2, "b": [5]},)
    # the default scheduler is the rdask client (set_as_default)
    assert total.compute() == ref


# ---------------------------------------------------------------- array
def test_array_reductions(client):
    x = da.random.RandomState(0).random_sample((300, 200), chunks=(100, 50))
    for expr in (x.sum(), x.mean(), x.std(), x.sum(axis=0), x.max(axis=1)):
        ours, ref = both(client, expr)
        np.testing.assert_allclose(ours, ref)
    ours_sum = client.compute(x.sum()).result(timeout=60)
    assert ours_sum == pytest.approx(x.compute(scheduler="sync").sum())


def test_array_transpose_add_and_rechunk(client):
    x = da.random.RandomState(1).random_sample((120, 120), chunks=(30, 40))
    ours, ref = both(client, x + x.T)
    np.testing.assert_allclose(ours, ref)
    np.testing.assert_allclose(ours, ours.T)  # symmetric
    r = x.rechunk((60, 20))
    assert r.chunks == ((60, 60), (20,) * 6)
    ours, ref = both(client, r)
    np.testing.assert_array_equal(ours, ref)
    ours, ref = both(client, (r @ x.T).sum(axis=1))
    np.testing.assert_allclose(ours, ref)


# ---------------------------------------------------------------- dataframe
def test_dataframe_groupby_agg(client, pdf):
    ddf = dd.from_pandas(pdf, npartitions=4)
    agg = ddf.groupby("g").agg({"x": "sum", "y": "mean", "k": "max"})
    ours, ref = both(client, agg)
    pd.testing.assert_frame_equal(ours.sort_index(), ref.sort_index())
    expected = pdf.groupby("g").agg({"x": "sum", "y": "mean", "k": "max"})
    # (dask makes the group labels pyarrow strings, pandas its own string dtype)
    pd.testing.assert_frame_equal(ours.sort_index(), expected.sort_index(), check_exact=False,
                                  check_index_type=False)
    counts, ref_counts = both(client, ddf.groupby("k").y.count())
    pd.testing.assert_series_equal(counts.sort_index(), ref_counts.sort_index())


def test_dataframe_merge_and_join(client, pdf):
    left = dd.from_pandas(pdf, npartitions=4)
    right_pdf = pd.DataFrame({"k": np.arange(0, 50, 2), "label": [f"L{i}" for i in range(25)]})
    right = dd.from_pandas(right_pdf, npartitions=3)
    merged = left.merge(right, on="k", how="inner")
    ours, ref = both(client, merged)

    def norm(df):
        return df.sort_values(["k", "y", "x"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(norm(ours), norm(ref))
    assert len(ours) == int((pdf.k % 2 == 0).sum())
    joined = left.set_index("k").join(right.set_index("k"), how="left")
    ours, ref = both(client, joined)
    key = ["y", "x"]
    pd.testing.assert_frame_equal(ours.reset_index().sort_values(key).reset_index(drop=True),
                                  ref.reset_index().sort_values(key).reset_index(drop=True))


def test_dataframe_set_index(client, pdf):
    ddf = dd.from_pandas(pdf, npartitions=5)
    indexed = ddf.set_index("y")
    ours, ref = both(client, indexed)
    assert ours.index.is_monotonic_increasing
    key = ["y", "x"]
    pd.testing.assert_frame_equal(ours.reset_index().sort_values(key).reset_index(drop=True),
                                  ref.reset_index().sort_values(key).reset_index(drop=True))
    assert ours.shape == pdf.shape[:1] + (3,)


def test_dataframe_read_csv(client, tmp_path, pdf):
    for i in range(3):
        pdf.iloc[i * 200:(i + 1) * 200].to_csv(tmp_path / f"part-{i}.csv", index=False)
    ddf = dd.read_csv(str(tmp_path / "part-*.csv"))
    assert ddf.npartitions >= 3
    total, ref_total = both(client, ddf.y.sum())
    assert total == ref_total == pdf.y.sum()
    ours, ref = both(client, ddf)
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), ref.reset_index(drop=True))
    pd.testing.assert_frame_equal(ours.reset_index(drop=True)[["k", "y"]], pdf[["k", "y"]])


def test_dataframe_to_parquet_roundtrip(client, tmp_path, pdf):
    ddf = dd.from_pandas(pdf, npartitions=3)
    out = tmp_path / "out.parquet"
    ddf.to_parquet(str(out), write_index=False, compute=False).compute(scheduler=client.get)
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".parquet")
    assert len(files) == 3
    back = pd.read_parquet(out)
    cols = ["g", "k", "x", "y"]
    pd.testing.assert_frame_equal(
        back.sort_values(cols).reset_index(drop=True)[cols],
        pdf.sort_values(cols).reset_index(drop=True)[cols],
        check_dtype=False,
    )


# ---------------------------------------------------------------- bag
def test_bag_map_filter_fold(client):
    b = db.from_sequence(range(100), npartitions=4)
    result = b.map(inc).filter(lambda v: v % 2 == 0).fold(operator.add)
    ours, ref = both(client, result)
    assert ours == ref == sum(v + 1 for v in range(100) if (v + 1) % 2 == 0)
    ours, ref = both(client, b.map(lambda v: v * v).filter(lambda v: v % 3 == 0))
    assert ours == ref


def test_bag_foldby(client):
    words = ["apple", "bob", "cat", "apple", "dog", "cat", "apple", "egg"] * 5
    b = db.from_sequence(words, npartitions=3)
    counted = b.foldby(lambda w: w, lambda acc, _: acc + 1, 0, operator.add, 0)
    ours, ref = both(client, counted)
    assert sorted(ours) == sorted(ref) == sorted({"apple": 15, "bob": 5, "cat": 10, "dog": 5, "egg": 5}.items())
    freq, ref_freq = both(client, b.frequencies())
    assert sorted(freq) == sorted(ref_freq)


# ---------------------------------------------------------------- xarray
def test_xarray_with_dask_chunks(client):
    xr = pytest.importorskip("xarray")
    values = np.random.default_rng(3).normal(size=(40, 30))
    arr = xr.DataArray(values, dims=("time", "space"),
                       coords={"time": np.arange(40), "space": np.arange(30)}).chunk({"time": 10})
    assert arr.chunks is not None
    m = arr.mean("time")
    ours = m.compute(scheduler=client.get)
    ref = m.compute(scheduler="sync")
    xr.testing.assert_allclose(ours, ref)
    np.testing.assert_allclose(ours.values, values.mean(axis=0))
    anomalies = (arr - arr.mean("time")).std("space")
    xr.testing.assert_allclose(anomalies.compute(scheduler=client.get), anomalies.compute(scheduler="sync"))
    ds = xr.Dataset({"v": arr, "w": arr * 2})
    grouped = ds.groupby(ds.time % 4).sum()
    xr.testing.assert_allclose(grouped.compute(scheduler=client.get), grouped.compute(scheduler="sync"))


# ---------------------------------------------------------------- nested compute
def compute_inside_with_client_compute(n, timeout=60):
    c = get_client()
    parts = [dask.delayed(inc)(i) for i in range(n)]
    total = dask.delayed(sum)(parts)
    return c.compute(total).result(timeout=timeout), os.getpid()


def compute_inside_with_dask_compute(n):
    x = da.arange(n, chunks=max(1, n // 4))
    (s,) = dask.compute(x.sum(), scheduler=get_client().get)
    return int(s)


def test_nested_compute_from_tasks():
    # One worker with two threads: the outer task holds one thread while the
    # graph it computes runs on the other. (On single-thread workers this
    # deadlocks: see test_nested_compute_on_single_thread_workers.)
    with LocalCluster(n_workers=1, threads_per_worker=2) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        value, pid = client.submit(compute_inside_with_client_compute, 8, pure=False).result(timeout=60)
        assert value == sum(range(1, 9))
        assert pid != os.getpid()
        assert client.submit(compute_inside_with_dask_compute, 100, pure=False).result(timeout=60) == sum(range(100))
        # the outer call being a dask.delayed task on the cluster, too
        outer = dask.delayed(compute_inside_with_dask_compute, pure=False)(40)
        assert outer.compute(scheduler=client.get) == sum(range(40))


def test_nested_compute_on_single_thread_workers():
    # dask.distributed finishes this: the idle second worker gets the inner tasks.
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        value, _ = client.submit(compute_inside_with_client_compute, 2, 5, pure=False).result(timeout=30)
        assert value == 3


def compute_inside_worker_client(n):
    with rdask.worker_client() as c:
        futures = c.map(inc, range(n))
        return sum(c.gather(futures))


def test_tasks_waiting_on_tasks_on_one_single_thread_worker():
    # Every task that waits holds the only thread; each secedes, so the
    # tasks it waits for still run, here on the same worker.
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        outer = client.map(compute_inside_with_client_compute, [3, 4, 5], pure=False)
        assert [v for v, _ in client.gather(outer)] == [6, 10, 15]
        assert client.submit(compute_inside_worker_client, 10, pure=False).result(timeout=30) == 55
        assert client.submit(compute_inside_with_dask_compute, 12, pure=False).result(timeout=30) == sum(range(12))
        # the pool is back to one thread: plain tasks still run
        assert client.gather(client.map(inc, range(5))) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- persist
def record_call(path, value):
    with open(path, "a") as f:
        f.write("called\n")
    return value


def test_persisted_collections_are_reused(client, tmp_path, pdf):
    log = tmp_path / "calls.log"
    d = dask.delayed(record_call, pure=False)(str(log), 21)
    dp = client.persist(d)
    futures = [v for v in dict(dp.__dask_graph__()).values() if isinstance(v, Future)]
    assert len(futures) == 1
    wait(futures, timeout=30)
    assert dask.delayed(add)(dp, 1).compute(scheduler=client.get) == 22
    assert dask.delayed(operator.mul)(dp, 2).compute(scheduler=client.get) == 42
    assert log.read_text().count("called") == 1, "the persisted task ran again"

    x = da.random.RandomState(5).random_sample((200, 200), chunks=(50, 50))
    xp = client.persist(x)
    futures = [v for v in dict(xp.__dask_graph__()).values() if isinstance(v, Future)]
    assert len(futures) == 16
    wait(futures, timeout=60)
    where = client.who_has(futures)  # (keyed by the scheduler's key strings)
    assert len(where) == 16 and all(where.values())
    ref = x.compute(scheduler="sync")
    np.testing.assert_allclose((xp + 1).sum().compute(scheduler=client.get), (ref + 1).sum())
    np.testing.assert_allclose(xp.T.mean(axis=0).compute(scheduler=client.get), ref.T.mean(axis=0))

    src = dd.from_pandas(pdf, npartitions=4)
    ddf = client.persist(src)
    assert len(ddf) == len(pdf)
    sums = ddf.groupby("g").y.sum().compute(scheduler=client.get)
    ref_sums = src.groupby("g").y.sum().compute(scheduler="sync")
    pd.testing.assert_series_equal(sums.sort_index(), ref_sums.sort_index())
    assert sums.sum() == pdf.y.sum()
    top, ref_top = ddf.x.nlargest(5).compute(scheduler=client.get), src.x.nlargest(5).compute(scheduler="sync")
    pd.testing.assert_series_equal(top, ref_top)


def test_a_client_passed_as_the_scheduler(client):
    """`dask.compute(x, scheduler=client)` and `x.compute(scheduler=client)`,
    as users of distributed write them."""
    import dask
    import dask.array as da

    x = da.arange(100, chunks=10).sum()
    assert client.asynchronous is False
    assert dask.compute(x, scheduler=client) == (4950,)
    assert x.compute(scheduler=client) == 4950
