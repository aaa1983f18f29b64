"""The rest of the `distributed.Client` surface, end to end on worker
processes: run, upload_file, get_versions, has_what/processing,
retire_workers, restart, worker logs and forward_logging, LocalCluster's
name/get_logs/adapt/interface/dashboard_address, and dask's
scheduler="distributed"."""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import time
import urllib.request
import uuid
import zipfile
from concurrent.futures import CancelledError

import dask
import pytest

import rdask
from rdask import Client, LocalCluster


# ---------------------------------------------------------------- task functions
def inc(x):
    return x + 1


def add(x, y=0):
    return x + y


def whoami(dask_worker):
    return dask_worker.name, dask_worker.address, os.getpid()


def explode():
    raise ValueError("exploded on purpose")


def now():
    return time.time()


def sleep_then_now(delay):
    time.sleep(delay)
    return time.time()


def rand():
    return random.random()


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def log_lines(tag):
    logging.getLogger("rdask_test.other").warning("not forwarded %s", tag)
    logging.getLogger("rdask_test.tasks").warning("hello %s from a worker", tag)
    logging.getLogger("rdask_test.tasks.child").error("child %s", tag)
    return tag


def quick_cluster(n=1, **kwargs):
    kwargs.setdefault("dashboard_address", None)
    return LocalCluster(n_workers=n, threads_per_worker=1, memory_limit="1GiB", **kwargs)


@pytest.fixture(scope="module")
def dcluster():
    with quick_cluster(2) as c:
        yield c


@pytest.fixture(scope="module")
def dclient(dcluster):
    with Client(dcluster, timeout=30) as c:
        yield c


def addresses(client):
    return sorted(client.scheduler_info()["workers"])


# ---------------------------------------------------------------- run
def test_run_returns_one_result_per_worker(dclient, dcluster):
    pids = dclient.run(os.getpid)
    assert sorted(pids) == addresses(dclient)
    assert set(pids.values()) == {w.pid for w in dcluster.workers.values()}
    a, b = addresses(dclient)
    assert dclient.run(os.getpid, workers=[a]) == {a: pids[a]}
    # workers by name, arguments and keywords
    name_of = {addr: w["name"] for addr, w in dclient.scheduler_info()["workers"].items()}
    assert dclient.run(add, 1, y=2, workers=[name_of[b]]) == {b: 3}
    assert dclient.run(add, 1, y=2) == {a: 3, b: 3}
    with pytest.raises(ValueError, match="no such workers"):
        dclient.run(os.getpid, workers=["tcp://127.0.0.1:1"])


def test_run_passes_the_worker_as_dask_worker(dclient):
    out = dclient.run(whoami)
    info = dclient.scheduler_info()["workers"]
    for addr, (name, address, pid) in out.items():
        assert name == info[addr]["name"]
        assert address == addr


def test_run_errors_raise_or_come_back(dclient):
    with pytest.raises(ValueError, match="exploded on purpose"):
        dclient.run(explode)
    out = dclient.run(explode, on_error="return")
    assert sorted(out) == addresses(dclient)
    assert all(isinstance(e, ValueError) and "exploded" in str(e) for e in out.values())
    assert dclient.run(explode, on_error="ignore") == {}
    with pytest.raises(NotImplementedError, match="nanny"):
        dclient.run(os.getpid, nanny=True)


def test_run_goes_ahead_of_queued_tasks(dclient):
    a = addresses(dclient)[0]
    queued = [dclient.submit(sleep_then_now, 0.3, workers=[a], pure=False) for _ in range(5)]
    time.sleep(0.1)
    ran_at = dclient.run(now, workers=[a])[a]
    finished = dclient.gather(queued)
    # it ran before most of the queue (not after all of it)
    assert ran_at < max(finished)
    assert sum(t > ran_at for t in finished) >= 3


def test_run_without_waiting(dclient, tmp_path, poll):
    targets = addresses(dclient)
    assert dclient.run(write_file, str(tmp_path / "ran"), "yes", wait=False, workers=targets[:1]) is None
    poll(lambda: (tmp_path / "ran").exists(), 20, what="run(wait=False) to have run")


def scheduler_facts(dask_scheduler):
    return dask_scheduler.address, sorted(dask_scheduler.workers), os.getpid()


def test_run_on_scheduler_runs_in_the_schedulers_process(dclient, dcluster):
    # The LocalCluster's scheduler lives in this process.
    address, workers, pid = dclient.run_on_scheduler(scheduler_facts)
    assert (address, pid) == (dcluster.scheduler_address, os.getpid())
    assert workers == addresses(dclient)
    assert dclient.run_on_scheduler(add, 1, y=2) == 3
    with pytest.raises(ValueError, match="exploded on purpose") as e:
        dclient.run_on_scheduler(explode)
    assert any("Remote traceback" in n for n in getattr(e.value, "__notes__", []))


def test_run_on_scheduler_of_the_rust_binary_says_why_not(tmp_path):
    import json
    import subprocess

    binary = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "target", "release", "rdask-scheduler")
    if not os.path.exists(binary):
        pytest.skip("the Rust rdask-scheduler binary is not built")
    sched_file = tmp_path / "s.json"
    proc = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "none",
                             "--scheduler-file", str(sched_file)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        with Client(json.loads(sched_file.read_text())["address"], set_as_default=False) as c:
            with pytest.raises(NotImplementedError, match="no Python side"):
                c.run_on_scheduler(os.getpid)
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- versions
def test_get_versions_and_mismatch(dclient, monkeypatch):
    v = dclient.get_versions(check=True)
    assert set(v) >= {"scheduler", "workers", "client"}
    assert sorted(v["workers"]) == addresses(dclient)
    for side in [v["client"], *v["workers"].values()]:
        pk = side["packages"]
        assert pk["python"] == ".".join(map(str, sys.version_info[:3]))
        assert pk["dask"] == dask.__version__
        assert pk["rdask"] == rdask.__version__
        assert set(pk) >= {"numpy", "cloudpickle"}
        assert "OS" in side["host"]
    assert v["scheduler"]["packages"]["rdask"] == rdask.__version__

    monkeypatch.setattr(dask, "__version__", "0.0.1-test")
    assert dclient.get_versions()["client"]["packages"]["dask"] == "0.0.1-test"  # check=False: no error
    with pytest.raises(ValueError, match="Mismatched versions") as err:
        dclient.get_versions(check=True)
    assert "dask" in str(err.value) and "0.0.1-test" in str(err.value)
    assert "cloudpickle" not in str(err.value)


# ---------------------------------------------------------------- has_what / processing
def test_has_what_mirrors_who_has(dclient):
    futures = dclient.map(inc, range(8))
    dclient.gather(futures)
    hw = dclient.has_what()
    assert sorted(hw) == addresses(dclient)
    assert all(isinstance(keys, tuple) for keys in hw.values())
    wh = dclient.who_has(futures)
    for f in futures:
        assert {a for a, keys in hw.items() if f.key in keys} == set(wh[f.key])
    one = addresses(dclient)[0]
    assert list(dclient.has_what(workers=[one])) == [one]


def slow_tag(tag, delay=1.0):
    time.sleep(delay)
    return tag


def test_processing_lists_each_workers_tasks(dclient, poll):
    a, b = addresses(dclient)
    poll(lambda: dclient.processing() == {a: (), b: ()}, 20, what="an idle cluster")
    fa = dclient.submit(slow_tag, "on-a", workers=[a], pure=False)
    fb = dclient.submit(slow_tag, "on-b", workers=[b], pure=False)
    busy = dclient.processing()
    assert busy[a] == (fa.key,) and busy[b] == (fb.key,), busy
    assert all(n >= 1 for n in dclient.processing_counts().values())
    dclient.gather([fa, fb])
    poll(lambda: dclient.processing() == {a: (), b: ()}, 20, what="tasks to finish")


def test_replicate_puts_copies_on_every_worker(dclient):
    a, b = addresses(dclient)
    xs = [dclient.submit(inc, i, workers=[a], pure=False) for i in range(4)]
    dclient.gather(xs)
    assert all(set(v) == {a} for v in dclient.who_has(xs).values())
    dclient.replicate(xs)
    assert all(set(v) == {a, b} for v in dclient.who_has(xs).values())
    assert dclient.gather(xs) == [1, 2, 3, 4]


def test_rebalance_moves_values_from_the_full_worker(dclient):
    import numpy as np

    a, b = addresses(dclient)
    xs = [dclient.submit(np.full, 250_000, i, workers=[a], pure=False) for i in range(10)]
    dclient.gather(xs)
    dclient.rebalance(xs)
    where = dclient.who_has(xs)
    on_a = sum(1 for v in where.values() if a in v)
    on_b = sum(1 for v in where.values() if b in v)
    assert all(len(v) == 1 for v in where.values()), "moved, not copied"
    assert 4 <= on_a <= 6 and 4 <= on_b <= 6, (on_a, on_b)
    values = dclient.gather(xs)
    assert [int(v[0]) for v in values] == list(range(10))


# ---------------------------------------------------------------- logs
def test_worker_logs_and_forward_logging(dclient, caplog, poll):
    a, b = addresses(dclient)
    tag = uuid.uuid4().hex[:8]
    dclient.submit(log_lines, tag, workers=[a], pure=False).result(timeout=30)
    logs = dclient.get_worker_logs()
    assert sorted(logs) == [a, b]
    hits = [(level, msg) for level, msg in logs[a] if f"hello {tag} from a worker" in msg]
    assert hits and hits[0][0] == "WARNING" and "rdask_test.tasks" in hits[0][1]
    assert not any(tag in msg for _, msg in logs[b])
    assert len(dclient.get_worker_logs(n=1)[a]) == 1

    caplog.set_level(logging.DEBUG)
    dclient.forward_logging("rdask_test.tasks", level=logging.WARNING)
    try:
        tag2 = uuid.uuid4().hex[:8]
        dclient.submit(log_lines, tag2, workers=[b], pure=False).result(timeout=30)
        poll(lambda: any(f"child {tag2}" in r.getMessage() for r in caplog.records), 20,
             what="the forwarded record")
        mine = [r for r in caplog.records if tag2 in r.getMessage()]
        assert {(r.name, r.levelname) for r in mine} == {("rdask_test.tasks", "WARNING"),
                                                        ("rdask_test.tasks.child", "ERROR")}
        # the old record (logged before forwarding began) is not forwarded
        assert not any(f"hello {tag} from" in r.getMessage() for r in caplog.records)
    finally:
        dclient.unforward_logging("rdask_test.tasks")


# ---------------------------------------------------------------- dask's scheduler names
def test_dask_compute_with_scheduler_distributed(dclient, monkeypatch):
    pids = set(dclient.run(os.getpid).values())
    x = dask.delayed(os.getpid)(dask_key_name=f"pid-{uuid.uuid4().hex}")
    assert dask.compute(x, scheduler="distributed")[0] in pids
    y = dask.delayed(os.getpid)(dask_key_name=f"pid-{uuid.uuid4().hex}")
    assert y.compute(scheduler="dask.distributed") in pids
    z = dask.delayed(os.getpid)(dask_key_name=f"pid-{uuid.uuid4().hex}")
    with dask.config.set(scheduler="distributed"):
        assert z.compute() in pids
    monkeypatch.setattr(rdask.client, "_default_client", None)
    try:
        import distributed  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="no Client active"):
            dask.compute(x, scheduler="distributed")


# ---------------------------------------------------------------- upload_file
def use_module(name):
    import importlib

    return importlib.import_module(name).f()


def test_upload_file_reaches_current_and_later_workers(tmp_path, monkeypatch):
    modname = f"rdask_upload_{uuid.uuid4().hex[:8]}"
    try:
        _upload_file_checks(tmp_path, monkeypatch, modname)
    finally:
        sys.modules.pop(modname, None)


def _upload_file_checks(tmp_path, monkeypatch, modname):
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{modname}.py").write_text("def f():\n    return 42\n")
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        with pytest.raises(ModuleNotFoundError):
            c.submit(use_module, modname, pure=False).result(timeout=30)
        out = c.upload_file(str(src / f"{modname}.py"))
        assert list(out.values()) == [[modname]]
        # the module, imported in the client too, travels by reference
        monkeypatch.syspath_prepend(str(src))
        mymod = __import__(modname)
        assert c.submit(lambda: mymod.f(), pure=False).result(timeout=30) == 42

        before = set(addresses(c))
        cluster.scale(2)
        (new,) = set(addresses(c)) - before
        assert c.submit(lambda: mymod.f(), workers=[new], pure=False).result(timeout=30) == 42

        # uploading again replaces (and reloads) the module everywhere
        (src / f"{modname}.py").write_text("def f():\n    return 43\n")
        c.upload_file(str(src / f"{modname}.py"))
        assert set(c.run(use_module, modname).values()) == {43}

        # a zip of a package, uploaded by a client of the scheduler address
        # only (no cluster object: the files go by run() to later workers)
        pkg = f"rdask_zpkg_{uuid.uuid4().hex[:8]}"
        zpath = tmp_path / f"{pkg}.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            z.writestr(f"{pkg}/__init__.py", "def f():\n    return 'from zip'\n")
        with Client(cluster.scheduler_address, set_as_default=False) as remote:
            assert sorted(remote.upload_file(str(zpath))) == addresses(c)
            assert set(remote.run(use_module, pkg).values()) == {"from zip"}
            before = set(addresses(c))
            cluster.scale(3)
            (later,) = set(addresses(c)) - before
            assert remote.run(use_module, pkg, workers=[later]) == {later: "from zip"}
            # the .py file of the cluster's own client is there too
            assert remote.run(use_module, modname, workers=[later]) == {later: 43}


# ---------------------------------------------------------------- retire_workers
def test_retire_workers_keeps_values_and_is_not_restarted(poll):
    with quick_cluster(3) as cluster, Client(cluster, set_as_default=False) as c:
        a, b, d = addresses(c)
        name_of = {addr: w["name"] for addr, w in c.scheduler_info()["workers"].items()}
        on_a = c.submit(rand, workers=[a], pure=False)
        on_d = c.submit(rand, workers=[d], allow_other_workers=True, pure=False)
        va = on_a.result(timeout=30)
        on_d.result(timeout=30)
        proc_a = cluster.workers[name_of[a]].process

        info = c.retire_workers(workers=[a])
        assert list(info) == [a] and info[a]["name"] == name_of[a]
        assert a not in c.scheduler_info()["workers"]
        assert proc_a.poll() is not None  # the process ended ...
        assert name_of[a] not in cluster.workers
        time.sleep(1.0)
        assert sorted(c.scheduler_info()["workers"]) == [b, d]  # ... and was not started again
        # the value only it held was copied, not recomputed (random: a
        # recomputation would give another number)
        assert c.who_has([on_a])[on_a.key] and a not in c.who_has([on_a])[on_a.key]
        assert on_a.result(timeout=30) == va

        # a client without the cluster object: the worker is asked to leave
        with Client(cluster.scheduler_address, set_as_default=False) as remote:
            remote_info = remote.retire_workers(workers=[name_of[d]])
        assert list(remote_info) == [d]
        time.sleep(1.0)
        assert sorted(c.scheduler_info()["workers"]) == [b]
        # a value of another client is not copied: it is recomputed when needed
        assert isinstance(on_d.result(timeout=30), float)
        assert c.submit(inc, 1).result(timeout=30) == 2


# ---------------------------------------------------------------- restart
def test_restart_replaces_processes_and_cancels_futures():
    with quick_cluster(2) as cluster, Client(cluster, set_as_default=False) as c:
        old = set(c.run(os.getpid).values())
        done = c.submit(inc, 1)
        assert done.result(timeout=30) == 2
        slow = c.submit(time.sleep, 30, pure=False)
        t0 = time.monotonic()
        assert c.restart() is c
        assert time.monotonic() - t0 < 20
        assert done.status == "cancelled" and slow.status == "cancelled"
        with pytest.raises(CancelledError):
            done.result(timeout=5)
        assert c.who_has() == {}
        new = set(c.run(os.getpid).values())
        assert len(new) == 2 and not (new & old)
        assert {w.pid for w in cluster.workers.values()} == new
        assert c.submit(inc, 1).result(timeout=30) == 2

        # without the cluster object: workers exit and their nannies start them again
        with Client(cluster.scheduler_address, set_as_default=False) as remote:
            f = remote.submit(inc, 10)
            f.result(timeout=30)
            remote.restart(timeout=30)
            assert f.cancelled()
            again = set(remote.run(os.getpid).values())
        assert len(again) == 2 and not (again & new)
        assert len(cluster.workers) == 2


# ---------------------------------------------------------------- LocalCluster
def test_adapt_grows_under_load_and_shrinks_when_idle(poll):
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        adaptive = cluster.adapt(minimum=1, maximum=3, interval=0.2, wait_count=3)
        assert adaptive.running
        futures = c.map(sleep_then_now, [0.4] * 16, pure=False)
        poll(lambda: len(c.scheduler_info()["workers"]) == 3, 30, what="adapt to scale up to 3 workers")
        c.gather(futures)
        del futures
        poll(lambda: len(c.scheduler_info()["workers"]) == 1, 30, what="adapt to scale down to 1 worker")
        assert len(cluster.workers) == 1
        time.sleep(1.0)
        assert len(c.scheduler_info()["workers"]) == 1  # never below minimum
        assert any(rec["status"] == "up" for _, rec in adaptive.log)
        assert any("adaptive" in msg for _, msg in cluster.get_logs(workers=False)["Cluster"])
        adaptive.stop()
        assert not adaptive.running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_cluster_name_logs_interface_and_dashboard():
    with quick_cluster(1, name="my-cluster", interface="lo", dashboard_address=":0") as cluster:
        assert cluster.name == "my-cluster"
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        link = cluster.dashboard_link
        assert link and link.endswith("/status")
        with urllib.request.urlopen(link.replace("/status", "/health"), timeout=10) as r:
            assert r.status == 200
        logs = cluster.get_logs()
        (addr,) = [k for k in logs if k not in ("Cluster", "Scheduler")]
        assert addr.startswith("tcp://")
        assert any("started worker 0" in msg for _, msg in logs["Cluster"])
        assert logs["Scheduler"] and cluster.scheduler_address in logs["Scheduler"][0][1]
    with quick_cluster(0) as a, quick_cluster(0) as b:
        assert isinstance(a.name, str) and a.name != b.name
        assert a.dashboard_link is None
    port = free_port()
    with quick_cluster(0, dashboard_address=f"127.0.0.1:{port}") as cluster:
        assert cluster.dashboard_link == f"http://127.0.0.1:{port}/status"
    with pytest.raises(ValueError, match="no-such-if0"):
        LocalCluster(n_workers=0, interface="no-such-if0", dashboard_address=None)


# ---------------------------------------------------------------- asynchronous client
def test_methods_are_awaitable_on_an_asynchronous_client(dcluster):
    import asyncio

    async def main():
        async with Client(dcluster, asynchronous=True, set_as_default=False) as c:
            pids = await c.run(os.getpid)
            versions = await c.get_versions(check=True)
            hw = await c.has_what()
            logs = await c.get_worker_logs(n=5)
            return pids, versions, hw, logs

    pids, versions, hw, logs = asyncio.run(main())
    assert set(pids.values()) == {w.pid for w in dcluster.workers.values()}
    assert sorted(versions["workers"]) == sorted(pids) == sorted(hw) == sorted(logs)
