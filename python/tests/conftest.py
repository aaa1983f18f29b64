"""Shared fixtures of the rdask end-to-end tests.

One LocalCluster (2 worker processes x 1 thread) serves most tests of the
session; tests that kill workers or need a fresh cluster start their own.
At the end of the session no child process of pytest may be left running.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

import psutil
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Worker processes must import the test modules to run the functions defined
# in them (cloudpickle pickles importable functions by reference), just as a
# user's workers must import the user's package. pytest puts this folder on
# sys.path of this process only; the nannies copy os.environ into each worker.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p)

# Last resort against a hang: no single test may take longer than this; the
# process then dies with every thread's traceback on stderr.
TEST_WATCHDOG_S = 150


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(TEST_WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_processes():
    """Runs first and is torn down last: after every cluster and command the
    tests started is closed, pytest must have no child processes left."""
    yield
    me = psutil.Process()

    def alive():
        out = []
        for c in me.children(recursive=True):
            try:
                if c.status() != psutil.STATUS_ZOMBIE:
                    out.append(c)
            except psutil.Error:
                pass
        return out

    deadline = time.monotonic() + 15
    children = alive()
    while children and time.monotonic() < deadline:
        time.sleep(0.2)
        children = alive()
    if children:
        desc = [(c.pid, " ".join(c.cmdline()[:6])) for c in children]
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass
        pytest.fail(f"processes left running after the tests: {desc}")


@pytest.fixture(scope="session")
def cluster():
    from rdask import LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1GiB")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def client(cluster):
    """The shared client, set as the default (dask.compute runs on it)."""
    from rdask import Client

    c = Client(cluster, timeout=30)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def worker_pids(client, cluster):
    return {w.pid for w in cluster.workers.values()}


def _call_with_timeout(fn, limit: float, *args, **kwargs):
    """Calls fn(*args, **kwargs) in a thread; fails the test (instead of
    hanging the suite) when it has not returned within `limit` seconds."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {limit} s (hang)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def no_hang():
    return _call_with_timeout


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Polls `predicate` until it is truthy; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def poll():
    return wait_until


def pytest_report_header(config):
    return f"rdask tests: python {sys.version.split()[0]}, {os.cpu_count()} cpus"
