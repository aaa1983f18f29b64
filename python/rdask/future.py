"""Futures: a handle on a key held by a client. Every Future of a key shares
one `FutureState`; when the last Future of a key is garbage collected the
client releases the key on the scheduler."""

from __future__ import annotations

import copy
from concurrent.futures import CancelledError

from dask._task_spec import TaskRef


class FutureCancelledError(CancelledError):
    def __init__(self, key, reason: str = "cancelled"):
        self.key = key
        super().__init__(f"{key!r} {reason}")


def raisable(exc: BaseException) -> BaseException:
    """A copy of a stored exception to raise. Raising the stored object
    itself would hang the raising frames (and the Future in them) on its
    traceback, and the state keeps the exception: an erred future could then
    never be released."""
    try:
        new = copy.copy(exc)
    except Exception:  # an exception that cannot be rebuilt from its args
        return exc.with_traceback(None)
    if type(new) is not type(exc):
        return exc.with_traceback(None)
    return new.with_traceback(None)


class FutureState:
    # No threading.Event per key: creating one costs microseconds, which
    # client.map pays 100k times. Waiters use the client's condition.
    __slots__ = ("key", "skey", "status", "finished", "exception", "traceback", "callbacks", "refs", "type")

    def __init__(self, key, skey: str):
        self.key = key
        self.skey = skey
        self.status = "pending"
        self.finished = False
        self.exception: BaseException | None = None
        self.traceback: str | None = None
        self.callbacks: list = []
        self.refs = 0
        self.type = None

    def done(self) -> bool:
        return self.finished


class Future(TaskRef):
    """A remote computation (mirrors `distributed.Future`)."""

    __dask_future__ = True
    __slots__ = ("client", "_held", "_state", "__weakref__")

    def __init__(self, key, client=None):
        """A future for an existing key (e.g. one another client computed).
        A key the cluster does not hold in memory gives a future whose
        result() raises KeyError at once, instead of waiting forever."""
        if client is None:
            from .client import Client

            client = Client.current()
        self.key = key
        self.client = client
        self._held = True
        self._state = client._hold(key)
        client._adopt(self._state)

    @classmethod
    def _from_state(cls, key, client, state: FutureState) -> "Future":
        """A future for a state the client already counted (bulk path)."""
        f = cls.__new__(cls)
        f.key = key
        f.client = client
        f._held = True
        f._state = state
        return f

    # -- status ---------------------------------------------------------
    @property
    def status(self) -> str:
        return self._state.status

    def done(self) -> bool:
        return self._state.done()

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    # -- results --------------------------------------------------------
    def result(self, timeout: float | None = None):
        """Waits and returns the value; raises the task's exception if it failed."""
        if getattr(self.client, "asynchronous", False):
            return self._result_async(timeout)
        self._wait(timeout)
        st = self._state
        if st.status == "error":
            from .client import _with_remote_note

            # The remote traceback as a note, as gather() shows it.
            raise raisable(_with_remote_note(st.exception, st.traceback)) if st.exception else RuntimeError(f"{self.key!r} failed")
        if st.status == "cancelled":
            raise FutureCancelledError(self.key, st.traceback or "cancelled")
        return self.client._gather_values([self])[0]

    async def _result_async(self, timeout=None):
        import asyncio

        await asyncio.wait_for(self.client._wait_async([self]), timeout)
        st = self._state
        if st.status == "error":
            from .client import _with_remote_note

            raise raisable(_with_remote_note(st.exception, st.traceback)) if st.exception else RuntimeError(f"{self.key!r} failed")
        if st.status == "cancelled":
            raise FutureCancelledError(self.key, st.traceback or "cancelled")
        return (await self.client._gather_values_async([self]))[0]

    def __await__(self):
        """`await future`: its result, without blocking the event loop."""
        return self._result_async().__await__()

    def exception(self, timeout: float | None = None):
        self._wait(timeout)
        return self._state.exception if self._state.status == "error" else None

    def traceback(self, timeout: float | None = None):
        """The remote traceback as text (None if the task did not fail)."""
        self._wait(timeout)
        return self._state.traceback if self._state.status == "error" else None

    def _wait(self, timeout):
        if not self.client._wait_done([self._state], timeout):
            raise TimeoutError(f"{self.key!r} not done after {timeout} s{_cluster_state(self.client)}")

    # -- control --------------------------------------------------------
    def cancel(self, **kwargs):
        self.client.cancel([self])

    def release(self):
        if self._held:
            self._held = False
            self.client._drop(self._state)

    def add_done_callback(self, fn):
        """Calls `fn(future)` once the future is done (at once if it is)."""
        st = self._state
        with self.client._lock:
            if not st.done():
                st.callbacks.append((fn, self))
                return
        self.client._run_callback(fn, self)

    @property
    def type(self):
        return self._state.type

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass

    def __reduce__(self):
        # Inside a task a future is a reference to its key.
        return TaskRef, (self.key,)

    def __repr__(self):
        return f"<Future: {self._state.status}, key: {self.key}>"

    def _repr_html_(self):
        return f"<b>Future: {self.key}</b> <span>status: {self._state.status}</span>"

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, Future) and other.key == self.key and other.client is self.client



def _cluster_state(client) -> str:
    """What the scheduler says about its workers, for a timeout's message
    (a paused or busy cluster explains most waits)."""
    try:
        info = client._rc.cluster_info()
    except Exception:
        return ""
    workers = ", ".join(f"{w['name']}: {w['status']}, {w['processing']} tasks, {w['memory'] >> 20} MiB"
                        for w in info["workers"])
    return f" (scheduler: {info['tasks']} tasks, {info['ready']} ready; workers: {workers or 'none'})"
