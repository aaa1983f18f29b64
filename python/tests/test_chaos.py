"""Chaos: a large graph runs while worker processes are killed (SIGKILL)
again and again; their nannies bring them back. The answer must be right
and nothing may hang. `pytest -m chaos` runs the long form (set
RDASK_CHAOS_SECONDS); CI runs the short form as part of the suite."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from rdask import Client, LocalCluster

pytestmark = pytest.mark.chaos


def inc(x):
    return x + 1


def add_all(*xs):
    return sum(xs)


def test_a_large_graph_survives_workers_killed_again_and_again():
    """100k tasks (a map and a two-level sum over it) on 3 workers while one
    random worker process is SIGKILLed every RDASK_CHAOS_INTERVAL seconds,
    graph after graph, for RDASK_CHAOS_SECONDS (5 s and 0.4 s in CI). A
    nanny restarts its worker at most 10 times a minute, so long runs kill
    every 2.5 s by default (fewer than 10 deaths a minute per worker)."""
    seconds = float(os.environ.get("RDASK_CHAOS_SECONDS", "5"))
    interval = float(os.environ.get("RDASK_CHAOS_INTERVAL", "0.4" if seconds <= 10 else "2.5"))
    n = 100_000
    offset = random.Random(7).randrange(3)
    with LocalCluster(n_workers=3, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False, timeout=60) as client:
        stop = threading.Event()
        kills = []

        def killer():
            deadline = time.monotonic() + seconds
            while not stop.is_set() and time.monotonic() < deadline:
                stop.wait(interval)
                # Round-robin over the workers (from a random start), so no
                # nanny reaches its restart limit by bad luck.
                names = sorted(cluster.workers)
                victim = cluster.workers[names[(offset + len(kills)) % len(names)]]
                if victim.is_alive() and not stop.is_set():
                    try:
                        os.kill(victim.pid, signal.SIGKILL)
                        kills.append(victim.pid)
                    except ProcessLookupError:
                        pass

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        graphs = 0
        started = time.monotonic()
        try:
            while graphs == 0 or time.monotonic() - started < seconds:
                mapped = client.map(inc, range(n), pure=False)
                chunks = [client.submit(add_all, *mapped[i:i + 1000], pure=False) for i in range(0, n, 1000)]
                total = client.submit(add_all, *chunks, pure=False)
                assert total.result(timeout=600) == n * (n + 1) // 2, f"wrong answer in graph {graphs}"
                graphs += 1
                del mapped, chunks, total
        finally:
            stop.set()
            t.join()
        print(f"{graphs} graphs of {n + n // 1000 + 1} tasks, {len(kills)} workers killed", flush=True)
        assert len(kills) >= 3, f"only {len(kills)} kills happened"
        # The cluster is whole again and still computes.
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.submit(inc, 41).result(timeout=60) == 42
