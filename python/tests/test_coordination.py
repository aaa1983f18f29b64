"""Coordination primitives held by the scheduler, used as distributed's are:
from the client, from tasks, across clients, and released with a client."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

import rdask
from rdask import Client, Event, Lock, MultiLock, Queue, Semaphore, Variable, futures_of


def inc(x):
    return x + 1


def locked_increment(i):
    """Read-modify-write of a shared Variable under a Lock, from a task."""
    with Lock("counter-lock"):
        v = Variable("counter")
        n = v.get()
        time.sleep(0.01)
        v.set(n + 1)
    return i


def produce(n):
    q = Queue("work")
    for i in range(n):
        q.put(i * i)
    return n


def wait_for_event(name):
    return Event(name).wait(timeout=30)


def limited(i):
    sem = Semaphore(max_leases=2, name="two-at-a-time")
    with sem:
        held = sem.get_value()
        time.sleep(0.05)
    return held


def say(x):
    rdask.print("hello from a task", x)
    rdask.warn(f"careful with {x}")
    return x


def test_a_lock_serialises_tasks_across_workers(client):
    Variable("counter").set(0)
    rdask.wait(client.map(locked_increment, range(20), pure=False))
    assert Variable("counter").get() == 20


def test_lock_acquire_with_timeout_and_release(client):
    a, b = Lock("L1"), Lock("L1")
    assert a.acquire() and a.locked()
    t = time.monotonic()
    assert b.acquire(timeout=0.3) is False
    assert time.monotonic() - t >= 0.25
    assert b.acquire(blocking=False) is False
    a.release()
    assert b.acquire(timeout=1) is True
    b.release()
    with pytest.raises(ValueError):
        b.release()


def test_a_semaphore_admits_at_most_its_leases(client):
    assert max(client.gather(client.map(limited, range(10), pure=False))) <= 2
    assert Semaphore(2, "two-at-a-time").get_value() == 0


def test_multilock_takes_all_names_or_none(client):
    m = MultiLock(["ml-a", "ml-b"])
    assert m.acquire()
    assert not Lock("ml-b").acquire(timeout=0.2)
    assert not MultiLock(["ml-b", "ml-c"]).acquire(timeout=0.2)
    c = Lock("ml-c")
    assert c.acquire(timeout=1), "a failed multi-lock holds nothing"
    c.release()
    m.release()
    assert Lock("ml-b").acquire(timeout=1)


def test_variable_holds_a_future_beyond_its_client(client, cluster):
    f = client.submit(inc, 41, key="var-future")
    Variable("holder").set(f)
    del f
    with Client(cluster.scheduler_address, set_as_default=False) as other:
        g = Variable("holder", client=other).get(timeout=10)
        assert g.result() == 42
    with pytest.raises(TimeoutError):
        Variable("never-set").get(timeout=0.2)


def test_queue_between_tasks_and_client(client):
    assert client.submit(produce, 5, pure=False).result() == 5
    q = Queue("work")
    assert q.qsize() == 5
    assert [q.get(timeout=5) for _ in range(2)] == [0, 1]
    assert q.get(batch=True) == [4, 9, 16]
    with pytest.raises(TimeoutError):
        q.get(timeout=0.2)
    f = client.submit(inc, 1)
    q.put(f)
    assert q.get(timeout=5).result() == 2


def test_event_wakes_waiting_tasks(client):
    waiting = client.map(wait_for_event, ["go"] * 2, pure=False)
    time.sleep(0.3)
    assert not any(w.done() for w in waiting)
    Event("go").set()
    assert client.gather(waiting) == [True, True]
    assert Event("go").is_set()
    Event("go").clear()
    assert not Event("go").wait(timeout=0.1)


def test_published_datasets(client, cluster):
    xs = client.map(inc, range(3))
    client.publish_dataset(numbers=xs)
    assert "numbers" in client.list_datasets()
    with pytest.raises(ValueError, match="already exists"):
        client.publish_dataset(numbers=xs)
    del xs
    with Client(cluster.scheduler_address, set_as_default=False) as other:
        got = other.get_dataset("numbers")
        assert other.gather(got) == [1, 2, 3]
        assert "numbers" in other.datasets
    client.unpublish_dataset("numbers")
    assert "numbers" not in client.list_datasets()
    with pytest.raises(KeyError):
        client.get_dataset("numbers")


def test_futures_of_finds_futures_in_structures_and_collections(client):
    import dask

    a, b = client.submit(inc, 1), client.submit(inc, 2)
    assert set(f.key for f in futures_of({"x": [a, (b, 3)]})) == {a.key, b.key}
    d = dask.delayed(inc)(1).persist()
    assert len(futures_of(d)) == 1


def test_print_and_warn_in_a_task_reach_the_client(client, capsys):
    with pytest.warns(UserWarning, match="careful with 7"):
        assert client.submit(say, 7, pure=False).result() == 7
        deadline = time.time() + 10
        out = ""
        while "hello from a task 7" not in out and time.time() < deadline:
            time.sleep(0.1)
            out += capsys.readouterr().out
    assert "hello from a task 7" in out


def test_a_client_that_leaves_gives_its_locks_back(cluster):
    code = textwrap.dedent(f"""
        import os, rdask
        c = rdask.Client({cluster.scheduler_address!r})
        assert rdask.Lock("abandoned").acquire()
        print("HELD", flush=True)
        os._exit(0)  # no clean close: the connection just drops
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HELD" in r.stdout, r.stderr
    with Client(cluster.scheduler_address, set_as_default=False) as c:
        assert Lock("abandoned", client=c).acquire(timeout=10), "the lock came back when its holder left"
