"""The Client API end to end: submit/map/gather/scatter, futures, the helper
functions of `distributed` and the ways of connecting and closing."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import threading
import time
import weakref
from concurrent.futures import CancelledError

import dask
import psutil
import pytest

import rdask
from rdask import (Client, CommClosedError, Future, FutureCancelledError, LocalCluster, as_completed,
                   fire_and_forget, get_client, get_worker, progress, wait)


# ---------------------------------------------------------------- task functions
def inc(x):
    return x + 1


def add(x, y):
    return x + y


def slow_inc(x, delay=0.5):
    time.sleep(delay)
    return x + 1


def describe(structure, scale=1):
    """Sums every number in a nested structure, and reports its shape."""

    def walk(v):
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple, set)):
            return sum(walk(x) for x in v)
        return v

    return walk(structure) * scale, type(structure).__name__, sorted(structure) if isinstance(structure, dict) else len(structure)


def explode_in_task(x):
    raise ValueError(f"bad value {x}")


def write_file_later(path, text, delay):
    time.sleep(delay)
    with open(path, "w") as f:
        f.write(text)
    return text


def submit_subtask(x):
    c = get_client()
    f = c.submit(inc, x, pure=False)
    return f.result(timeout=30) * 10


def whoami():
    w = get_worker()
    return w.name, w.scheduler_address, os.getpid()


def getpid(_=None):
    return os.getpid()


def rand():
    # (random.random itself would travel with a copy of this process's
    # generator state, so every call would return the same number)
    return random.random()


# ---------------------------------------------------------------- submit / map / gather
def test_submit_returns_result(client):
    f = client.submit(add, 1, 2)
    assert f.result(timeout=30) == 3
    assert client.submit(add, "a", y="b").result(timeout=30) == "ab"
    assert client.submit(lambda: {"k": [1, 2]}).result(timeout=30) == {"k": [1, 2]}


def test_map_and_gather(client):
    futures = client.map(inc, range(20))
    assert len(futures) == 20
    assert client.gather(futures) == list(range(1, 21))
    pairs = client.map(add, [1, 2, 3], [10, 20, 30])
    assert [f.result(timeout=30) for f in pairs] == [11, 22, 33]
    scaled = client.map(slow_inc, [1, 2], delay=0.01)
    assert client.gather(scaled) == [2, 3]
    # gather keeps the structure it is given
    assert client.gather({"a": futures[0], "b": (futures[1], 5)}) == {"a": 1, "b": (2, 5)}


def echo(*args):
    return args


class Tagged(int):
    pass


def test_map_over_every_kind_of_scalar_and_mixed_arguments(client):
    # plain scalars take the fast path (payloads made in Rust); the rest,
    # ints past 64 bits and subclasses included, go through pickle
    values = [0, 255, 256, 65536, -1, 2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**64, 1.5, float("inf"), -0.0,
              "", "héllo", "x" * 300, b"", b"\x00" * 300, True, False, None, Tagged(7), [1, 2], {"a": 1}]
    got = client.gather(client.map(echo, values))
    assert got == [(v,) for v in values]
    assert [type(g[0]) for g in got] == [type(v) for v in values]
    only_scalars = values[:21]
    assert client.gather(client.map(echo, only_scalars)) == [(v,) for v in only_scalars]
    assert client.gather(client.map(echo, [1, 2], ["a", "b"], [None, 2.5], [b"x", True])) == [
        (1, "a", None, b"x"), (2, "b", 2.5, True)]


def test_pure_map_and_submit_of_one_call_share_its_key(client):
    assert client.map(inc, [5])[0].key == client.submit(inc, 5).key
    assert client.map(inc, [5])[0].key != client.map(inc, [6])[0].key
    assert client.map(inc, [1])[0].key != client.map(inc, [True])[0].key
    dup = client.map(inc, [3, 3, 4])
    assert dup[0].key == dup[1].key != dup[2].key
    assert client.gather(dup) == [4, 4, 5]


def fail_unless_exists(path):
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def test_an_erred_pure_call_made_again_gives_the_same_error(client, tmp_path):
    # as in distributed: the key is held, so the same erred future comes back
    path = str(tmp_path / "flag")
    first = client.map(fail_unless_exists, [path])
    with pytest.raises(FileNotFoundError):
        first[0].result(timeout=30)
    open(path, "w").close()
    for again in (client.map(fail_unless_exists, [path])[0], client.submit(fail_unless_exists, path)):
        assert again.key == first[0].key
        with pytest.raises(FileNotFoundError):
            again.result(timeout=5)
    # released, it runs again
    del first, again
    gc.collect()
    deadline = time.monotonic() + 10
    while True:
        f = client.submit(fail_unless_exists, path)
        try:
            assert f.result(timeout=10) == path
            break
        except FileNotFoundError:
            assert time.monotonic() < deadline, "the released key never ran again"
            del f
            gc.collect()
            time.sleep(0.1)


def test_a_cancelled_pure_map_runs_again(client):
    first = client.map(slow_inc, [123], delay=1.0)
    client.cancel(first)
    with pytest.raises(CancelledError):
        first[0].result(timeout=10)
    again = client.map(slow_inc, [123], delay=0.01)
    assert again[0].result(timeout=30) == 124


def make_array(n):
    import numpy as np

    return np.arange(n)


def test_waited_and_gathered_futures_and_values_are_freed_at_once(client):
    # No reference cycle may keep futures or gathered values alive until
    # the garbage collector runs: released keys and big results must go at
    # once. (The collector is paused so that it cannot hide a cycle.)
    gc.collect()
    gc.disable()
    try:
        f = client.submit(make_array, 1000, pure=False)
        rdask.wait([f])
        rdask.wait(f)
        arrays = client.gather([f, {"x": (f,)}])
        dep = client.submit(len, f, pure=False)
        assert dep.result(timeout=30) == 1000
        fref = weakref.ref(f)
        aref = weakref.ref(arrays[0])
        key = f.key
        del f, arrays, dep
        assert fref() is None, "a future outlived its last reference"
        assert aref() is None, "a gathered value outlived its last reference"
        assert key not in client._states
    finally:
        gc.enable()


def test_futures_as_arguments_of_other_tasks(client):
    a = client.submit(inc, 1)  # 2
    b = client.submit(inc, 10)  # 11
    c = client.submit(add, a, b)
    assert c.result(timeout=30) == 13
    # futures nested in lists, tuples and dicts (and as keyword arguments)
    d = client.submit(describe, [a, (b, 1), {"z": a}], scale=b)
    assert d.result(timeout=30) == ((2 + 11 + 1 + 2) * 11, "list", 3)
    e = client.submit(describe, {"x": a, "y": [b, a, 100]})
    assert e.result(timeout=30) == (2 + 11 + 2 + 100, "dict", ["x", "y"])
    # a chain of dependents through map
    chained = client.map(inc, client.map(inc, range(5)))
    assert client.gather(chained) == [2, 3, 4, 5, 6]


def test_pure_calls_share_a_key_impure_ones_do_not(client):
    f1 = client.submit(inc, 41)
    f2 = client.submit(inc, 41)
    assert f1.key == f2.key
    assert client.submit(inc, 42).key != f1.key
    assert f1.result(timeout=30) == f2.result(timeout=30) == 42

    r1 = client.submit(rand, pure=False)
    r2 = client.submit(rand, pure=False)
    assert r1.key != r2.key
    assert r1.result(timeout=30) != r2.result(timeout=30)
    # impure map: every element its own key even for equal arguments
    m = client.map(inc, [1, 1, 1], pure=False)
    assert len({f.key for f in m}) == 3
    assert client.gather(m) == [2, 2, 2]


def test_key_argument(client):
    f = client.submit(inc, 1, key="my-own-key")
    assert f.key == "my-own-key"
    assert f.result(timeout=30) == 2
    assert "my-own-key" in client.who_has([f])
    fs = client.map(inc, [5, 6], key=["first-key", "second-key"])
    assert [x.key for x in fs] == ["first-key", "second-key"]
    assert client.gather(fs) == [6, 7]
    prefixed = client.map(inc, [1, 2], key="prefix")
    assert all(x.key.startswith("prefix") for x in prefixed)
    assert client.gather(prefixed) == [2, 3]


def test_gather_errors_skip_and_raise(client):
    good1 = client.submit(inc, 1)
    bad = client.submit(explode_in_task, 7)
    good2 = client.submit(inc, 2)
    assert client.gather([good1, bad, good2], errors="skip") == [2, 3]
    assert client.gather({"a": good1, "b": bad}, errors="skip") == {"a": 2}
    with pytest.raises(ValueError, match="bad value 7"):
        client.gather([good1, bad, good2])


def test_scatter_list_dict_and_single(client):
    futures = client.scatter([1, 2, 3])
    assert isinstance(futures, list) and all(isinstance(f, Future) for f in futures)
    assert client.submit(sum, futures).result(timeout=30) == 6

    named = client.scatter({"x": 10, "y": 20})
    assert set(named) == {"x", "y"}
    assert client.submit(add, named["x"], named["y"]).result(timeout=30) == 30

    import numpy as np

    arr = np.arange(1000.0)
    single = client.scatter(arr)
    assert isinstance(single, Future)
    assert client.submit(np.sum, single).result(timeout=30) == arr.sum()
    np.testing.assert_array_equal(single.result(timeout=30), arr)
    # scattering equal data twice gives the same key (hash=True)
    assert client.scatter(arr).key == single.key


def test_scatter_places_data_on_the_workers_named_and_broadcasts(client):
    a, b = sorted(client.scheduler_info()["workers"])
    for w in (a, b):
        futs = client.scatter([f"on-{w}-{i}" for i in range(4)], workers=[w], hash=False)
        wait(futs)
        holders = client.who_has(futs)
        assert all(holders[f.key] == [w] for f in futs), holders
    every = client.scatter({"everywhere": 5}, broadcast=True)["everywhere"]
    assert sorted(client.who_has([every])[every.key]) == [a, b]
    assert client.submit(add, every, 1, workers=[a]).result(timeout=30) == 6


# ---------------------------------------------------------------- as_completed / wait
def test_as_completed_yields_every_future(client):
    futures = client.map(slow_inc, range(6), delay=0.05)
    seen = []
    ac = as_completed(futures)
    for i, f in enumerate(ac):
        assert f.done()
        seen.append(f)
        if i == 0:  # futures can be added while iterating
            extra = client.submit(inc, 100)
            ac.add(extra)
    assert len(seen) == 7
    assert {f.key for f in seen} == {f.key for f in futures} | {extra.key}
    assert sorted(f.result(timeout=30) for f in seen) == [1, 2, 3, 4, 5, 6, 101]


def test_as_completed_with_results(client):
    futures = client.map(inc, range(10, 15))
    pairs = list(as_completed(futures, with_results=True))
    assert len(pairs) == 5
    for f, value in pairs:
        assert isinstance(f, Future)
        assert value == f.result(timeout=30)
    assert sorted(v for _, v in pairs) == [11, 12, 13, 14, 15]


def test_as_completed_order_follows_completion(client):
    # The slow task is pinned to one worker, the fast one to the other, so
    # the fast one must come out first although it was submitted second.
    slow = client.submit(slow_inc, 1, 1.5, workers=["0"], pure=False)
    fast = client.submit(slow_inc, 2, 0.0, workers=["1"], pure=False)
    order = [f.key for f in as_completed([slow, fast])]
    assert order == [fast.key, slow.key]


def test_wait_returns_done_and_not_done(client):
    futures = client.map(slow_inc, range(4), delay=0.05)
    result = wait(futures, timeout=30)
    done, not_done = result
    assert done == set(futures) and not_done == set()
    assert result.done is done
    assert all(f.done() for f in futures)


def test_wait_timeout_raises(client):
    slow = client.submit(slow_inc, 0, 3.0, pure=False)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        wait([slow], timeout=0.3)
    assert time.monotonic() - start < 2.5
    assert not slow.done()
    assert slow.result(timeout=30) == 1


def test_wait_first_completed(client):
    slow = client.submit(slow_inc, 0, 1.5, workers=["0"], pure=False)
    fast = client.submit(inc, 5, workers=["1"], pure=False)
    done, not_done = wait([slow, fast], timeout=30, return_when="FIRST_COMPLETED")
    assert fast in done
    assert slow in not_done
    assert slow.result(timeout=30) == 1


# ---------------------------------------------------------------- fire_and_forget / get_client
def test_fire_and_forget_runs_after_future_is_dropped(client, tmp_path, poll):
    target = tmp_path / "fired.txt"
    f = client.submit(write_file_later, str(target), "fired", 0.5, pure=False)
    fire_and_forget(f)
    del f
    gc.collect()
    assert not target.exists()  # it sleeps first: the future was gone before it wrote
    poll(target.exists, timeout=30, what="the fire-and-forget task writing its file")
    assert poll(lambda: target.read_text(), timeout=5, what="file contents") == "fired"


def test_get_client_inside_a_task(client):
    f = client.submit(submit_subtask, 4, pure=False)
    assert f.result(timeout=60) == 50


def test_get_worker_inside_a_task(client, cluster, worker_pids):
    name, address, pid = client.submit(whoami, pure=False).result(timeout=30)
    assert name in cluster.workers
    assert address == cluster.scheduler_address
    assert pid in worker_pids and pid != os.getpid()
    with pytest.raises(ValueError):
        get_worker()  # not in a worker


def test_get_client_outside_tasks_is_the_default(client):
    assert get_client() is client
    assert rdask.default_client() is client


# ---------------------------------------------------------------- the Future API
def test_future_api_on_success(client):
    f = client.submit(slow_inc, 1, 0.5, pure=False)
    assert isinstance(f.key, str) and f.key.startswith("slow_inc-")
    assert not f.done()
    assert f.status == "pending"
    assert f.result(timeout=30) == 2
    assert f.done() and f.status == "finished"
    assert f.exception(timeout=5) is None
    assert f.traceback(timeout=5) is None
    assert f.key in repr(f)


def test_future_api_on_error(client):
    f = client.submit(explode_in_task, 3)
    exc = f.exception(timeout=30)
    assert isinstance(exc, ValueError)
    assert str(exc) == "bad value 3"
    assert f.done() and f.status == "error"
    tb = f.traceback(timeout=5)
    assert isinstance(tb, str)
    assert "explode_in_task" in tb
    assert "bad value 3" in tb
    with pytest.raises(ValueError, match="bad value 3"):
        f.result(timeout=5)


def test_add_done_callback(client):
    called = []
    event = threading.Event()

    def callback(fut):
        called.append((fut.key, fut.status))
        event.set()

    f = client.submit(slow_inc, 1, 0.3, pure=False)
    f.add_done_callback(callback)
    assert event.wait(30), "done callback not called"
    assert called == [(f.key, "finished")]
    # on a future that is already done: called at once
    later = []
    f.add_done_callback(lambda fut: later.append(fut.result(timeout=5)))
    assert later == [2]
    # also for a failed task
    failed = threading.Event()
    g = client.submit(explode_in_task, 99)
    g.add_done_callback(lambda fut: failed.set() if fut.status == "error" else None)
    assert failed.wait(30)


def test_cancel_a_long_running_task(client):
    f = client.submit(slow_inc, 0, 3.0, pure=False)
    time.sleep(0.3)  # let it start
    start = time.monotonic()
    f.cancel()
    with pytest.raises(CancelledError) as info:
        f.result(timeout=10)
    assert isinstance(info.value, FutureCancelledError)
    assert time.monotonic() - start < 2.0, "cancel waited for the task to finish"
    assert f.cancelled() and f.status == "cancelled"
    with pytest.raises(CancelledError):
        client.gather([f])
    # the cluster keeps working
    assert client.submit(inc, 1000).result(timeout=30) == 1001


# ---------------------------------------------------------------- dask integration
def test_client_get_is_a_dask_scheduler(client):
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}
    assert client.get(dsk, "c") == 3
    assert client.get(dsk, ["b", "c"]) == [2, 3]
    x = dask.delayed(inc)(1)
    y = dask.delayed(add)(x, 10)
    assert dask.compute(y, scheduler=client.get) == (12,)
    assert y.compute(scheduler=client.get) == 12


def test_set_as_default_runs_dask_compute_on_workers(client, cluster, worker_pids):
    with Client(cluster, timeout=30) as other:  # set_as_default=True by default
        assert rdask.default_client() is other
        pid = dask.delayed(getpid)(1).compute()
        assert pid != os.getpid()
        assert pid in worker_pids
    # closing it gives the default back to the previous client
    assert rdask.default_client() is client
    assert dask.config.get("scheduler") == client.get
    assert dask.delayed(getpid)(2).compute() in worker_pids


def test_client_without_default_leaves_dask_alone(client, cluster):
    with Client(cluster, set_as_default=False, timeout=30) as other:
        assert rdask.default_client() is client
        assert other.submit(inc, 1).result(timeout=30) == 2


def test_progress_bar_reaches_100_percent(client, capsys):
    futures = client.map(slow_inc, range(4), delay=0.1, pure=False)
    progress(futures, notebook=False)
    assert all(f.done() for f in futures)
    out = capsys.readouterr().out
    assert "100% Completed" in out
    assert re.search(r"\[#{40}\]", out), out
    assert out.count("% Completed") >= 2, "the bar was drawn only once"
    assert out.endswith("\n")


def test_progress_bar_on_a_persisted_collection(client, capsys):
    parts = [dask.delayed(slow_inc, pure=False)(i, 0.3) for i in range(4)]
    persisted = client.persist(parts)
    futures = [v for p in persisted for v in dict(p.__dask_graph__()).values() if isinstance(v, Future)]
    assert len(futures) == 4
    start = time.monotonic()
    progress(*persisted, notebook=False)
    assert all(f.done() for f in futures), "progress returned before the collection was computed"
    assert time.monotonic() - start >= 0.25
    assert "100% Completed" in capsys.readouterr().out
    assert dask.compute(*persisted) == (1, 2, 3, 4)


# ---------------------------------------------------------------- connecting and closing
def test_connect_with_scheduler_file(cluster, tmp_path):
    from rdask.cli import write_scheduler_file

    path = tmp_path / "scheduler.json"
    write_scheduler_file(str(path), cluster.scheduler_address)
    assert json.loads(path.read_text())["address"] == cluster.scheduler_address
    with Client(scheduler_file=str(path), set_as_default=False, timeout=10) as c:
        assert c.scheduler_address == cluster.scheduler_address
        assert c.submit(inc, 1).result(timeout=30) == 2
        assert len(c.scheduler_info()["workers"]) == 2


def test_connect_with_address_and_cluster(cluster):
    address = cluster.scheduler_address
    assert address.startswith("tcp://")
    with Client(address, set_as_default=False, timeout=10) as c:
        assert c.submit(inc, 2).result(timeout=30) == 3
        assert sum(c.nthreads().values()) == 2
    # without the protocol prefix
    with Client(address[len("tcp://"):], set_as_default=False, timeout=10) as c:
        assert c.submit(inc, 3).result(timeout=30) == 4
    with Client(cluster, set_as_default=False, timeout=10) as c:
        assert c.cluster is cluster
        assert c.submit(inc, 4).result(timeout=30) == 5
    # cluster.get_client gives a connected client too
    c = cluster.get_client()
    try:
        assert c.submit(inc, 5).result(timeout=30) == 6
    finally:
        c.close()
    assert rdask.default_client() is not c


def test_context_manager_closes_the_client(client, cluster):
    with Client(cluster, set_as_default=False, timeout=10) as c:
        assert c.status == "running"
        f = c.submit(inc, 1, pure=False)
        assert f.result(timeout=30) == 2
    assert c.status == "closed"
    with pytest.raises(CommClosedError):
        c.submit(inc, 1)
    # a client of a cluster it did not start leaves the cluster running
    assert client.submit(inc, 7).result(timeout=30) == 8


def test_shutdown_closes_the_cluster():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1)
    address = cluster.scheduler_address
    pids = [w.pid for w in cluster.workers.values()]
    c = Client(cluster, set_as_default=False, timeout=10)
    assert c.submit(inc, 1).result(timeout=30) == 2
    c.shutdown()
    assert c.status == "closed"
    start = time.monotonic()
    with pytest.raises((TimeoutError, OSError, rdask.RdaskError)):
        Client(address, set_as_default=False, timeout=2)
    assert time.monotonic() - start < 10
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "closed" in repr(cluster)


def test_client_without_arguments_owns_its_cluster():
    c = Client(n_workers=1, threads_per_worker=1, set_as_default=False, timeout=30)
    try:
        assert isinstance(c.cluster, LocalCluster)
        info = c.scheduler_info()
        assert [w["nthreads"] for w in info["workers"].values()] == [1]
        pid = c.submit(getpid, pure=False).result(timeout=30)
        assert pid != os.getpid()
    finally:
        c.close()
    assert "closed" in repr(c.cluster)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_local_cluster_repr_and_scale():
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="1GiB") as cluster:
        assert "workers=1" in repr(cluster) and "threads=1" in repr(cluster)
        assert "1.00 GiB" in repr(cluster)
        assert "Workers" in cluster._repr_html_()
        with Client(cluster, set_as_default=False, timeout=10) as c:
            cluster.scale(2)
            info = c.scheduler_info()["workers"]
            assert len(info) == 2
            assert {w["memory_limit"] for w in info.values()} == {2**30}
            assert "workers=2" in repr(cluster)
            held = c.map(inc, range(10))
            assert c.gather(held) == list(range(1, 11))
            assert {n for a in c.who_has(held).values() for n in a} == set(info), "not spread over both workers"
            cluster.scale(1)
            assert len(c.scheduler_info()["workers"]) == 1
            # values that lived on the removed worker are computed again
            assert c.gather(held) == list(range(1, 11))
            assert c.submit(inc, 1, pure=False).result(timeout=30) == 2
    assert "status=closed" in repr(cluster)
