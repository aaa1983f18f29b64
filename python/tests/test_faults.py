"""Failures: things that cannot be pickled, tasks that raise, workers and
clients that die, keys that do not exist, schedulers that cannot be reached."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import dask
import pytest

from rdask import AuthenticationError, Client, Future, KilledWorker, LocalCluster, wait


class CustomError(Exception):
    """Defined here: workers import this module to raise it."""


def inc(x):
    return x + 1


def add(x, y):
    return x + y


def identity(x):
    return x


def raise_custom(x):
    raise CustomError(f"custom failure {x}")


def raise_unpicklable_exception():
    raise ValueError("holds a lock", threading.Lock())


def return_small_lock():
    return threading.Lock()


def return_big_unpicklable():
    # over the 16 KiB that are pickled eagerly on the worker
    return [threading.Lock(), b"x" * 100_000]


def sleep_and_record(path, value, delay):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(delay)
    return value * 2


def getpid(_=None):
    return os.getpid()


def crash_the_worker():
    os._exit(1)


def call_sys_exit():
    sys.exit(3)


class LockHolder:
    def __init__(self):
        self.lock = threading.Lock()

    def __call__(self, x):
        return x


def total_stored(client) -> int:
    return sum(w["stored_values"] for w in client.scheduler_info()["workers"].values())


# ---------------------------------------------------------------- serialisation
@pytest.mark.parametrize("bad", [threading.Lock(), (i for i in range(3))], ids=["lock", "generator"])
def test_unpicklable_argument_fails_at_submit(client, bad):
    with pytest.raises(TypeError, match="serialize"):
        client.submit(identity, bad, key="never-sent-arg")
    with pytest.raises(TypeError, match="serialize"):
        client.submit(identity, x=[1, {"nested": bad}], key="never-sent-kwarg")
    with pytest.raises(TypeError, match="serialize|pickle"):
        client.map(identity, [1, 2, bad])
    # nothing of it reached the cluster, and the cluster is fine
    with pytest.raises(KeyError):
        Future("never-sent-arg", client).result(timeout=10)
    assert client.submit(inc, 1).result(timeout=30) == 2
    assert client.gather(client.map(inc, [1, 2, 3])) == [2, 3, 4]


def test_unpicklable_function_fails_at_submit(client):
    for func in (LockHolder(), functools.partial(identity, threading.Lock())):
        with pytest.raises(TypeError, match="serialize"):
            client.submit(func, 1)
    with pytest.raises(TypeError, match="serialize"):
        client.map(LockHolder(), [1, 2])
    assert client.submit(inc, 10).result(timeout=30) == 11


def test_unpicklable_small_result_gives_an_error(client):
    f = client.submit(return_small_lock, pure=False)
    with pytest.raises(TypeError, match="pickle"):
        f.result(timeout=30)
    assert client.submit(inc, 2).result(timeout=30) == 3


def test_unpicklable_big_result_gives_the_pickling_error(client, no_hang):
    f = client.submit(return_big_unpicklable, pure=False)
    with pytest.raises(TypeError, match="pickle"):
        no_hang(f.result, 30, timeout=20)
    # a task on another worker that needs the value fails with the same error
    holder = next(iter(client.who_has([f])[f.key]))
    other = [w for w in client.scheduler_info()["workers"] if w != holder]
    assert other, "the test cluster has two workers"
    dependent = client.submit(len, f, workers=other, pure=False)
    with pytest.raises(TypeError, match="pickle"):
        no_hang(dependent.result, 30, timeout=20)
    # one on the same worker reads the object itself and succeeds
    same = client.submit(len, f, workers=[holder], pure=False)
    assert no_hang(same.result, 30, timeout=20) == 2
    assert client.submit(inc, 5).result(timeout=30) == 6


# ---------------------------------------------------------------- task errors
def test_task_exception_reaches_the_client(client):
    f = client.submit(raise_custom, 42)
    with pytest.raises(CustomError, match="custom failure 42") as info:
        f.result(timeout=30)
    assert type(info.value) is CustomError
    assert f.status == "error"
    assert isinstance(f.exception(timeout=5), CustomError)
    with pytest.raises(CustomError, match="custom failure 42"):
        client.gather([f])

    # dependents fail with the same exception, also two levels down
    g = client.submit(inc, f)
    h = client.submit(add, g, client.submit(inc, 1))
    for dep in (g, h):
        with pytest.raises(CustomError, match="custom failure 42"):
            dep.result(timeout=30)

    # through a dask graph, too
    bad = dask.delayed(raise_custom)(7)
    with pytest.raises(CustomError, match="custom failure 7"):
        dask.compute(dask.delayed(add)(bad, 1), scheduler=client.get)

    # the cluster keeps computing
    assert client.gather(client.map(inc, range(5))) == [1, 2, 3, 4, 5]


def test_exception_that_cannot_be_pickled(client):
    f = client.submit(raise_unpicklable_exception, pure=False)
    with pytest.raises(Exception) as info:
        f.result(timeout=30)
    assert "ValueError" in str(info.value) and "holds a lock" in str(info.value)
    assert client.submit(inc, 3).result(timeout=30) == 4


def test_sys_exit_in_a_task_fails_only_that_task(client, worker_pids):
    f = client.submit(call_sys_exit, pure=False)
    with pytest.raises(Exception, match="SystemExit"):
        f.result(timeout=30)
    # the worker processes survived it
    pids = set(client.gather(client.map(getpid, range(10), pure=False)))
    assert pids <= worker_pids
    assert client.submit(inc, 4).result(timeout=30) == 5


# ---------------------------------------------------------------- dying workers
def test_killed_worker_task_is_rerun(tmp_path, poll):
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        log = tmp_path / "pids.log"
        f = client.submit(sleep_and_record, str(log), 21, 2.0, pure=False)
        first = int(poll(lambda: log.exists() and log.read_text().split(), 30, what="the task starting")[0])
        assert first in {w.pid for w in cluster.workers.values()}
        os.kill(first, signal.SIGKILL)
        assert f.result(timeout=60) == 42
        runs = [int(p) for p in log.read_text().split()]
        assert len(runs) == 2 and runs[0] == first and runs[1] != first
        # the nanny brings the killed worker back
        poll(lambda: len(client.scheduler_info()["workers"]) == 2
             and all(w.is_alive() and w.pid != first for w in cluster.workers.values())
             and first not in client.gather(client.map(getpid, range(8), pure=False)), 30,
             what="the killed worker's replacement")
        assert client.gather(client.map(inc, range(10))) == list(range(1, 11))


def test_value_lost_with_its_worker_is_recomputed(poll):
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        a = client.submit(inc, 1, workers=["0"], allow_other_workers=True)
        assert a.result(timeout=30) == 2
        holders = client.who_has([a])[a.key]
        assert len(holders) == 1
        victim = cluster.workers["0"].pid
        os.kill(victim, signal.SIGKILL)
        poll(lambda: all(addr not in client.scheduler_info()["workers"] for addr in holders), 30,
             what="the scheduler noticing the dead worker")
        b = client.submit(add, a, 10)
        assert b.result(timeout=60) == 12
        assert a.result(timeout=60) == 2


def test_task_that_kills_every_worker_gives_up(poll):
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        f = client.submit(crash_the_worker, pure=False)
        with pytest.raises(KilledWorker) as info:
            f.result(timeout=90)
        assert "crash_the_worker" in str(info.value)
        assert info.value.task == f.key
        assert info.value.allowed_failures == 3 and info.value.last_worker
        # the nannies bring the workers back and the cluster still computes
        poll(lambda: len(client.scheduler_info()["workers"]) == 2, 30, what="2 workers again")
        assert client.gather(client.map(inc, range(5))) == [1, 2, 3, 4, 5]


def test_client_that_exits_without_closing_releases_its_data(poll):
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as observer:
        script = textwrap.dedent(f"""
            import os, sys
            import dask.array as da
            from rdask import Client, wait
            c = Client({cluster.scheduler_address!r}, set_as_default=False, timeout=30)
            scattered = c.scatter(list(range(10)))
            mapped = c.map(lambda x: x + 1, range(10))
            x = c.persist(da.ones((100, 100), chunks=(50, 50)))
            wait(scattered + mapped, timeout=30)
            print("ready", flush=True)
            sys.stdin.readline()
            os._exit(0)   # no close(), no atexit
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.strip() == "ready", f"the client script failed: {line!r}"
            poll(lambda: total_stored(observer) >= 24, 30, what="the script's values in memory")
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        poll(lambda: total_stored(observer) == 0, 15, what="the dead client's values being released")
        assert observer.submit(inc, 1).result(timeout=30) == 2


# ---------------------------------------------------------------- missing keys, bad addresses
def test_gather_missing_or_released_key_raises(client, no_hang):
    f = Future("no-such-key-anywhere", client)
    with pytest.raises(KeyError, match="no-such-key-anywhere"):
        no_hang(f.result, 20, timeout=15)
    with pytest.raises(KeyError):
        no_hang(client.gather, 20, [Future("another-missing-key", client)])

    g = client.submit(inc, 123456, pure=False)
    assert g.result(timeout=30) == 123457
    key = g.key
    del g
    # the release reaches the scheduler within a few event-loop rounds
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.3)
        revived = Future(key, client)
        try:
            no_hang(revived.result, 20, timeout=15)
        except KeyError as e:
            assert key in str(e)
            break
        finally:
            revived.release()
    else:
        pytest.fail("the released key could still be gathered")


def test_wrong_or_missing_token_is_refused():
    with LocalCluster(n_workers=1, threads_per_worker=1, token="s3cret") as cluster:
        for token in (None, "wrong"):
            start = time.monotonic()
            with pytest.raises(AuthenticationError, match="token"):
                Client(cluster.scheduler_address, token=token, set_as_default=False, timeout=5)
            assert time.monotonic() - start < 5
        with Client(cluster.scheduler_address, token="s3cret", set_as_default=False, timeout=10) as c:
            assert c.submit(inc, 1).result(timeout=30) == 2


def test_connecting_to_nothing_fails_fast():
    start = time.monotonic()
    with pytest.raises((TimeoutError, OSError)) as info:
        Client("tcp://127.0.0.1:1", timeout=1, set_as_default=False)
    assert time.monotonic() - start < 5
    assert "127.0.0.1:1" in str(info.value)


# ---------------------------------------------------------------- blame only the tasks that ran
def pid_then_sleep(path, i, delay):
    with open(path, "a") as f:
        f.write(f"{i} {os.getpid()}\n")
    time.sleep(delay)
    return i


def test_killing_a_worker_blames_only_the_task_it_was_running(tmp_path, poll):
    """One worker (under a nanny), 12 half-second tasks queued on it; its
    process is killed (SIGKILL) three times while a task runs. Every task
    still finishes: the queued ones were never suspected, and no task ran on
    more than three dead workers."""
    log = tmp_path / "runs.log"
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        futures = client.map(pid_then_sleep, [str(log)] * 12, range(12), [0.5] * 12, pure=False)
        killed = set()
        for round in range(3):
            def running_pid():
                lines = log.read_text().split("\n") if log.exists() else []
                pids = [int(line.split()[1]) for line in lines if line.strip()]
                fresh = [p for p in pids if p not in killed]
                return fresh[-1] if fresh else None
            pid = poll(running_pid, 60, what=f"a task running (round {round})")
            time.sleep(0.1)  # well inside the task, after its start was reported
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        assert client.gather(futures) == list(range(12))


def test_a_task_that_kills_workers_does_not_take_innocent_tasks_with_it(poll):
    """os._exit in one task, with 400 small tasks queued behind it on the
    same workers: only the killer fails, with KilledWorker."""
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        killer = client.submit(crash_the_worker, pure=False, priority=10)
        innocents = client.map(inc, range(400), pure=False)
        with pytest.raises(KilledWorker):
            killer.result(timeout=120)
        assert client.gather(innocents) == list(range(1, 401))


def test_workers_that_leave_on_sigterm_blame_nobody(tmp_path, poll):
    """SIGTERM is a worker leaving on purpose: a long task on four workers
    that each get SIGTERM while running it still finishes on the fifth."""
    log = tmp_path / "runs.log"
    with LocalCluster(n_workers=5, threads_per_worker=1) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        client.wait_for_workers(5, timeout=60)
        f = client.submit(pid_then_sleep, str(log), 7, 1.5, pure=False)
        stopped = set()
        for round in range(4):
            def runner():
                pids = [int(line.split()[1]) for line in log.read_text().split("\n") if line.strip()] if log.exists() else []
                fresh = [p for p in pids if p not in stopped]
                return fresh[-1] if fresh else None
            pid = poll(runner, 60, what=f"the task running (round {round})")
            os.kill(pid, signal.SIGTERM)
            stopped.add(pid)
            poll(lambda: not psutil_alive(pid), 30, what="the worker leaving")
        assert f.result(timeout=60) == 7


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
