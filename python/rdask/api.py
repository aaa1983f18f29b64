"""Module-level helpers of `distributed`: wait, as_completed,
fire_and_forget, get_client."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import namedtuple

from .future import Future
from .packing import flatten_futures

DoneAndNotDoneFutures = namedtuple("DoneAndNotDoneFutures", ["done", "not_done"])


def wait(fs, timeout: float | None = None, return_when: str = "ALL_COMPLETED"):
    """Waits for futures; returns (done, not_done) sets. Raises TimeoutError
    if `timeout` passes first (as distributed.wait does)."""
    if isinstance(fs, Future):
        fs = [fs]
    futures = flatten_futures(fs)
    deadline = None if timeout is None else time.monotonic() + timeout
    if return_when == "FIRST_COMPLETED":
        ac = as_completed(futures)
        try:
            next(ac.iter_timeout(timeout))
        except StopIteration:
            pass
    else:
        for f in futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not f.client._wait_done([f._state], left):
                raise TimeoutError(f"futures not done after {timeout} s")
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, set(futures) - done)


class as_completed:
    """Iterates over futures in the order they finish; more can be added
    while iterating (`add`, `update`). `with_results=True` yields
    (future, result)."""

    def __init__(self, futures=None, with_results: bool = False, raise_errors: bool = True):
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.with_results = with_results
        self.raise_errors = raise_errors
        if futures:
            self.update(futures)

    def add(self, future: Future):
        with self._lock:
            self._pending += 1
        future.add_done_callback(self._queue.put)

    def update(self, futures):
        for f in flatten_futures(list(futures)):
            self.add(f)

    def count(self) -> int:
        return self._pending

    def is_empty(self) -> bool:
        return self._pending == 0

    def has_ready(self) -> bool:
        return not self._queue.empty()

    def _take(self, timeout=None):
        f = self._queue.get(timeout=timeout)
        with self._lock:
            self._pending -= 1
        if self.with_results:
            try:
                return f, f.result()
            except Exception as e:
                if self.raise_errors:
                    raise
                return f, e
        return f

    def __iter__(self):
        return self

    def __next__(self):
        if self._pending == 0:
            raise StopIteration
        return self._take()

    def iter_timeout(self, timeout):
        while self._pending:
            try:
                yield self._take(timeout)
            except queue.Empty:
                raise TimeoutError(f"no future finished within {timeout} s") from None

    def next_batch(self, block: bool = True) -> list:
        out = [self._take()] if block and self._pending else []
        while not self._queue.empty():
            out.append(self._take())
        return out

    def batches(self):
        while self._pending:
            yield self.next_batch()


def fire_and_forget(obj):
    """Keeps the tasks behind these futures running even when no future of
    them is left, as long as this client is connected."""
    for f in flatten_futures(obj):
        client = f.client
        with client._lock:
            client._forever.add(f)

        def drop(fut, client=client):
            with client._lock:
                client._forever.discard(fut)

        f.add_done_callback(drop)


def get_client(address=None, timeout=None):
    """Inside a task: a client of this worker's scheduler. Elsewhere: the
    default client."""
    from . import worker
    from .client import Client, default_client

    if worker._worker is not None:
        return worker.shared_client()
    c = default_client()
    if c is not None and (address is None or c.scheduler_address == address):
        return c
    if address is not None:
        return Client(address, timeout=timeout or 10.0)
    raise ValueError("No clients found; start one with rdask.Client()")


@contextlib.contextmanager
def worker_client(timeout=None, separate_thread: bool = True):
    """Inside a task: `with worker_client() as client:` as in Dask. The task
    secedes from the worker's thread pool while it waits on the cluster; the
    client is the worker's shared one and stays open afterwards."""
    from . import worker

    if worker._worker is None:
        raise ValueError("worker_client() called outside an rdask worker task")
    if separate_thread:
        worker.secede()
    try:
        yield worker.shared_client()
    finally:
        worker.rejoin()
