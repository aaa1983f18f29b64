"""`rdask.Client`: the `distributed.Client` API on the rdask runtime."""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import json
import logging
import os
import pickle
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import dask

from . import _rdask
from . import worker as worker_module
from .future import Future, FutureCancelledError, FutureState, raisable
from .graph import graph_to_tasks
from .errors import scheduler_error
from .keys import funcname, key_str
from .serialize import dumps_function, dumps_payload, loads_error, loads_value
from .packing import pack_futures, unpack_structure, flatten_futures
from .client_methods import DistributedMethods
from .coordination import CoordinationMethods, Forwarder

logger = logging.getLogger("rdask.client")

CALL, NODE, DATA = 1, 2, 3

_default_client: Client | None = None
_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def default_client() -> Client | None:
    c = _default_client
    return c if c is not None and c.status == "running" else None


class Client(DistributedMethods, CoordinationMethods):
    """Connects to an rdask scheduler, or starts a `LocalCluster` when given
    no address. Mirrors `distributed.Client`: change the import, keep the code.

    ``Client()`` – a new local cluster; ``Client(cluster)``;
    ``Client("tcp://host:8786")``; ``Client(scheduler_file="...")``.
    """

    def __init__(
        self,
        address=None,
        *,
        scheduler_file: str | None = None,
        timeout: float = 10.0,
        set_as_default: bool = True,
        token: str | None = None,
        name: str | None = None,
        asynchronous: bool = False,
        direct_to_workers: bool | None = None,
        security=None,
        **cluster_kwargs,
    ):
        self.cluster = None
        self._owns_cluster = False
        if scheduler_file is not None and address is None:
            address = _read_scheduler_file(scheduler_file, timeout)
        if address is None and not cluster_kwargs:
            # As in distributed: set by rdask.mpi.initialize(), or by the user.
            address = dask.config.get("scheduler-address", None)
        if address is None:
            from .cluster import LocalCluster

            self.cluster = LocalCluster(token=token, security=security, **cluster_kwargs)
            security = self.cluster.security
            self._owns_cluster = True
            address = self.cluster.scheduler_address
        elif not isinstance(address, str):
            self.cluster = address  # a cluster object
            address = address.scheduler_address
        elif cluster_kwargs:
            raise TypeError(f"unexpected arguments for a remote scheduler: {sorted(cluster_kwargs)}")
        if security is None and getattr(self.cluster, "security", None) is not None:
            security = self.cluster.security
        if security is not None and security is not True and security.has_tls:
            security.apply("client")
        if "://" not in address:
            address = ("tls://" if security is not None and security is not True and security.has_tls else "tcp://") + address
        token = token if token is not None else getattr(self.cluster, "token", None) or os.environ.get("RDASK_TOKEN")
        self.scheduler_address = address
        self.id = name or f"Client-{os.getpid()}-{id(self):x}"
        try:
            self._rc = _rdask.Client.connect(address, token, float(timeout))
        except BaseException:
            if self._owns_cluster:
                self.cluster.close()
            raise
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # notified when keys finish
        self._states: dict[str, FutureState] = {}
        self._releasing: dict[str, FutureState] = {}
        self._forever: set[Future] = set()  # fire_and_forget
        self._closing = False
        # dask looks at it when a client is passed as `scheduler=`; this
        # client is synchronous.
        # Asynchronous mode: result(), gather(), scheduler_info(),
        # wait_for_workers() and close() return awaitables, and futures are
        # awaitable; values arrive through callbacks from the Rust runtime
        # (no thread per wait). Futures are awaitable in either mode.
        self.asynchronous = bool(asynchronous)
        self.status = "running"
        self._config = None
        self._previous_default = None
        self._events = threading.Thread(target=self._event_loop, name="rdask-client-events", daemon=True)
        self._events.start()
        # What tasks print or warn (rdask.print/warn) shows here; a worker's
        # own client (inside tasks) does not take those messages.
        self._forwarder = None
        if worker_module._worker is None:
            self._forwarder = Forwarder(self)
            self._forwarder.start()
        _clients.add(self)
        if set_as_default:
            self._set_default()

    # ------------------------------------------------------------ defaults
    def _set_default(self):
        global _default_client
        self._previous_default = _default_client
        _default_client = self
        self._config = dask.config.set(
            {
                "scheduler": self.get,
                "dataframe.shuffle.method": "tasks",
                "array.rechunk.method": "tasks",
            }
        )

    def as_current(self):
        """`with client.as_current():` – dask.compute runs on this client."""
        return dask.config.set(scheduler=self.get)

    @classmethod
    def current(cls) -> Client:
        c = default_client()
        if c is None:
            raise ValueError("No clients found; start one with rdask.Client()")
        return c

    # ------------------------------------------------------------ key bookkeeping
    def _hold(self, key) -> FutureState:
        with self._lock:
            return self._hold_locked(key, key_str(key))

    def _hold_locked(self, key, skey: str) -> FutureState:
        st = self._states.get(skey)
        if st is None:
            st = self._releasing.pop(skey, None)
            if st is None:
                st = FutureState(key, skey)
            self._states[skey] = st
        st.refs += 1
        return st

    def _adopt(self, st: FutureState):
        """A future made by hand for a key this client never submitted: it is
        finished if the cluster holds the value, else it fails with KeyError."""
        with self._lock:
            if st.refs != 1 or st.status != "pending" or st.finished:
                return
        where = self._rc.who_has([st.skey])
        with self._lock:
            if st.finished:
                return
            if st.skey in where:
                st.status = "finished"
            else:
                st.status = "error"
                st.exception = KeyError(f"{st.key!r} is not in memory on the cluster (unknown, released or not finished)")
            st.finished = True
            self._cond.notify_all()

    def _futures(self, keys: list) -> list[Future]:
        """Futures for many keys under one lock acquisition."""
        hold = self._hold_locked
        make = Future._from_state
        with _no_gc(len(keys)), self._lock:
            states = [hold(k, key_str(k)) for k in keys]
            return [make(k, self, st) for k, st in zip(keys, states)]

    def _drop(self, st: FutureState):
        with self._lock:
            st.refs -= 1
            if st.refs <= 0 and self._states.get(st.skey) is st:
                del self._states[st.skey]
                self._releasing[st.skey] = st

    def _forget_failed_releases(self, keys) -> None:
        """Keys about to be submitted again whose last futures were dropped
        after they erred or were cancelled: their release goes out now,
        before the submission, so the scheduler runs them afresh instead of
        answering with the old outcome (and the client makes new states
        instead of reviving the failed ones). Call with the lock held."""
        rel = self._releasing
        if not rel:
            return
        stale = [k for k in keys if (st := rel.get(k)) is not None and st.status in ("error", "cancelled")]
        for k in stale:
            del rel[k]
        if stale:
            self._rc.release(stale)

    def _flush_releases(self):
        # The release is queued while the lock is held: a submission of the
        # same key (which needs the lock to make its future) then goes out
        # after it. Sent after the lock, it could overtake the submission,
        # and the scheduler would drop the key the new future waits for.
        with self._lock:
            if not self._releasing:
                return
            keys = list(self._releasing)
            self._releasing.clear()
            try:
                self._rc.release(keys)
            except Exception:
                pass

    # ------------------------------------------------------------ events
    def _event_loop(self):
        rc = self._rc
        while True:
            try:
                events = rc.next_events(0.05)
            except Exception as e:  # scheduler gone or client closed
                self._on_disconnect(e)
                return
            if events:
                self._apply_events(events)
            self._flush_releases()

    def _apply_events(self, events):
        done = []
        with self._lock:
            for skey, state, detail in events:
                st = self._states.get(skey) or self._releasing.get(skey)
                if st is None:
                    continue
                if state == "finished":
                    st.status = "finished"
                elif state == "erred":
                    failed_key, message, payload = detail
                    exc = None if payload else scheduler_error(message, st.key if failed_key == skey else failed_key)
                    exc, tb = (exc, "") if exc is not None else loads_error(payload, message)
                    st.status, st.exception, st.traceback = "error", exc, tb
                elif state == "cancelled":
                    st.status = "cancelled"
                elif state == "rejected":
                    st.status, st.exception, st.traceback = "error", _rdask.RdaskError(detail), None
                elif state == "lost":
                    st.status = "pending"
                    st.finished = False
                    continue
                st.finished = True
                if st.callbacks:
                    done.append(st.callbacks)
                    st.callbacks = []
            self._cond.notify_all()
        for callbacks in done:
            for fn, fut in callbacks:
                self._run_callback(fn, fut)

    def _wait_done(self, states: list, timeout: float | None) -> bool:
        """Waits until every state is finished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if worker_module.in_task() and not all(st.finished for st in states):
            # A task waiting on the cluster leaves its thread pool, so what
            # it waits for can run on this worker too (Dask's secede).
            worker_module.secede()
        i = 0
        with self._cond:
            while i < len(states):
                if states[i].finished:
                    i += 1
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run_callback(self, fn, fut):
        try:
            fn(fut)
        except Exception:
            logger.exception("error in done callback of %s", fut.key)

    def _on_disconnect(self, exc):
        callbacks = []
        with self._lock:
            for st in list(self._states.values()):
                if not st.done():
                    st.status = "error"
                    st.exception = _rdask.CommClosedError(
                        "lost the connection to the scheduler before this key finished"
                    )
                    st.finished = True
                    callbacks.extend(st.callbacks)
                    st.callbacks = []
            self._cond.notify_all()
            if not self._closing:
                self.status = "closed"
        for fn, fut in callbacks:
            self._run_callback(fn, fut)

    # ------------------------------------------------------------ submitting
    def _check(self):
        if self.status != "running":
            raise _rdask.CommClosedError(f"client is {self.status}")

    def _send(self, tasks: list, keys: list, restrictions: list | None = None) -> list[Future]:
        """Holds `keys` (creating their futures) and submits `tasks`."""
        if tasks:
            with self._lock:
                self._forget_failed_releases([t[0] for t in tasks])
        futures = self._futures(keys)
        if tasks:
            self._reset_failed(tasks)
            self._rc.submit(tasks, restrictions)
        return futures

    def _reset_failed(self, tasks: list):
        """Cancelled keys run again when resubmitted. A key that erred and is
        still held keeps its error, as in distributed: the same call gives
        the same erred future (release it, or use another key, to run it
        again)."""
        self._reset_cancelled(t[0] for t in tasks)

    def _reset_cancelled(self, keys):
        """Cancelled states of these keys go back to pending."""
        with self._lock:
            states = self._states
            for k in keys:
                st = states.get(k)
                if st is not None and st.status == "cancelled":
                    st.status, st.exception, st.traceback = "pending", None, None
                    st.finished = False

    def submit(
        self,
        func,
        *args,
        key=None,
        workers=None,
        resources=None,
        retries: int | None = None,
        priority: int = 0,
        fifo_timeout=None,
        allow_other_workers: bool = False,
        actor: bool = False,
        actors: bool = False,
        pure: bool = True,
        **kwargs,
    ) -> Future:
        """Runs `func(*args, **kwargs)` on the cluster; futures in the
        arguments are replaced by their values on the worker."""
        self._check()
        if not callable(func):
            raise TypeError("first argument to submit must be callable")
        if actor or actors:
            raise NotImplementedError("actors are not supported by rdask")
        restrictions = _restrictions(workers, resources, allow_other_workers)
        fb = dumps_function(func)
        fast = None
        if not kwargs and all(type(a) in _SIMPLE for a in args):
            # the same payload and key as client.map makes for this call
            fast = _rdask.scalar_call(fb, funcname(func), args)
        if fast is not None:
            payload, digest_key = fast
            deps = []
            if key is None:
                key = digest_key if pure else _call_key(funcname(func), payload, deps, False)
        else:
            (args2, kwargs2), deps = pack_futures((args, kwargs), self)
            payload = dumps_payload((CALL, fb, args2, kwargs2))
            if key is None:
                key = _call_key(funcname(func), payload, deps, pure)
        task = (key_str(key), deps, payload, int(priority), None, True, int(retries or 0), 0 if restrictions else None)
        return self._send(self._new_only([task], pure), [key], restrictions)[0]

    def map(
        self,
        func,
        *iterables,
        key=None,
        workers=None,
        resources=None,
        retries: int | None = None,
        priority: int = 0,
        allow_other_workers: bool = False,
        pure: bool = True,
        batch_size: int | None = None,
        **kwargs,
    ) -> list[Future]:
        """`submit` for each element of the iterables (zipped). Tasks go to
        the scheduler in batches while later ones are still being prepared."""
        self._check()
        if not callable(func):
            raise TypeError("first argument to map must be callable")
        restrictions = _restrictions(workers, resources, allow_other_workers)
        restriction = 0 if restrictions else None
        iterables = [it if isinstance(it, (list, tuple, range)) else list(it) for it in iterables]
        fb = dumps_function(func)
        name = key if isinstance(key, str) else funcname(func)
        explicit = list(key) if isinstance(key, (list, tuple)) else None
        retries = int(retries or 0)
        priority = int(priority)
        batch = int(batch_size or 8192)
        if pure and explicit is None and not kwargs and iterables:
            futures = self._map_scalars(fb, name, iterables, priority, retries, restrictions)
            if futures is not None:
                return futures
        futures: list[Future] = []
        seen: set = set()
        tasks: list = []
        keys: list = []
        dumps = pickle.dumps
        try:
            self._map_batches(fb, name, explicit, iterables, kwargs, pure, priority, retries, restrictions,
                              restriction, batch, futures, seen, tasks, keys, dumps)
        except BaseException:
            # An argument that cannot be pickled: nothing of this map stays behind.
            # (Keys other futures also hold are left alone.)
            ours = [f for f in futures if f._state.refs == 1]
            if ours:
                self.cancel(ours)
            for f in futures:
                f.release()
            raise
        return futures

    def _map_scalars(self, fb, name, iterables, priority, retries, restrictions):
        """The fast path of a pure map over plain scalars: payloads, keys and
        the submission are made in Rust. None (nothing sent) when some
        argument is not a plain scalar."""
        single = len(iterables) == 1
        calls = iterables[0] if single else list(zip(*iterables))
        with self._lock:  # no news of these keys is applied before their futures exist
            done = self._rc.map_scalars(fb, name, calls, single, self._states, self._releasing, priority, retries,
                                        restrictions[0] if restrictions else None)
            if done is None:
                return None
            keys, again = done
            futures = self._futures(keys)
            self._reset_cancelled(again)
        return futures

    def _map_batches(self, fb, name, explicit, iterables, kwargs, pure, priority, retries, restrictions,
                     restriction, batch, futures, seen, tasks, keys, dumps):
        for i, args in enumerate(zip(*iterables)):
            if kwargs or any(type(a) not in _SIMPLE for a in args):
                (a2, kw2), deps = pack_futures((args, kwargs), self)
                payload = dumps_payload((CALL, fb, a2, kw2))
            else:  # plain scalars: always picklable, no futures inside
                deps = []
                payload = dumps((CALL, fb, args, kwargs), protocol=5)
            if explicit is not None:
                k = explicit[i]
            else:
                k = _call_key(name, payload, deps, pure)
            keys.append(k)
            if k not in seen:
                seen.add(k)
                tasks.append((key_str(k), deps, payload, priority, None, True, retries, restriction))
            if len(tasks) >= batch:
                futures.extend(self._send(self._new_only(tasks, pure), keys, restrictions))
                tasks, keys = [], []
        futures.extend(self._send(self._new_only(tasks, pure), keys, restrictions))

    def _new_only(self, tasks: list, pure: bool) -> list:
        """Drops pure tasks whose key this client already holds (their
        result, or error, is shared, as in dask); cancelled ones go again."""
        if not pure:
            return tasks
        with self._lock:
            states = self._states
            return [t for t in tasks if (st := states.get(t[0])) is None or st.status == "cancelled"]

    def scatter(self, data, workers=None, broadcast: bool = False, direct=None, hash: bool = True, timeout=None):
        """Puts local data on the cluster; returns futures of the same shape.
        `workers=` places it on those workers (names, addresses or hosts);
        `broadcast=True` then copies it onto every worker (of `workers`)."""
        self._check()
        from dask.base import tokenize
        import uuid

        restrictions = _restrictions(workers, None, False)
        restriction = 0 if restrictions else None

        def one(value, key=None):
            if key is None:
                tok = tokenize(value) if hash else uuid.uuid4().hex
                key = f"{type(value).__name__}-{tok}"
            return key, (key_str(key), [], dumps_payload((DATA, value)), 0, None, True, 0, restriction)

        def send(items):
            futs = self._send([t for _, t in items], [k for k, _ in items], restrictions)
            if broadcast and futs:
                self.replicate(futs, workers=workers)
            return futs

        if isinstance(data, dict):
            return dict(zip(data.keys(), send([one(v, k) for k, v in data.items()])))
        if isinstance(data, (list, tuple, set, frozenset)):
            futs = send([one(v) for v in data])
            return type(data)(futs) if not isinstance(data, (set, frozenset)) else futs
        if isinstance(data, Iterator):
            return [self.scatter(x, workers=workers, broadcast=broadcast, hash=hash) for x in data]
        return send([one(data)])[0]

    # ------------------------------------------------------------ dask graphs
    def _graph_to_futures(self, dsk, keys, priority: int = 0, retries: int = 0) -> dict:
        """Materialises a dask graph on this client and submits it; returns
        {key: Future} for `keys` (flat)."""
        self._check()
        flat = list(_flatten(keys))
        with self._lock:
            self._forget_failed_releases([key_str(k) for k in flat])
            held = set(self._states)
        n, batches = graph_to_tasks(dsk, flat, held, priority, retries)
        futures = self._futures(flat)
        graph = self._rc.new_graph()
        try:
            # Submitted part by part: workers start on the first part while
            # the later ones are being pickled here.
            for tasks in batches:
                self._reset_failed(tasks)
                self._rc.submit(tasks, None, graph, True, n)
        finally:
            self._rc.submit([], None, graph, False, n)  # closes the graph
        return dict(zip(flat, futures))

    def get(self, dsk, keys, *, sync: bool = True, priority: int = 0, retries: int = 0, **kwargs):
        """A dask scheduler: `dask.compute(x, scheduler=client.get)`.
        Reentrant: dask may compute inside graph optimisation."""
        futures = self._graph_to_futures(dsk, keys, priority, retries)
        packed = _repack(keys, futures)
        if not sync:
            return packed
        return self.gather(packed)

    @property
    def _persist_schedule(self):
        """A dask scheduler that returns futures instead of values. A plain
        function, not a bound method: dask hands persist() back to the
        `__self__` of a bound scheduler, which would be this client again."""

        def schedule(dsk, keys, **kwargs):
            futures = self._graph_to_futures(dsk, keys)
            return [futures[k] for k in keys]

        return schedule

    def compute(self, collections, sync: bool = False, optimize_graph: bool = True, priority: int = 0, retries=None, **kwargs):
        """Starts computing collections; returns a Future per collection
        (the values themselves with sync=True)."""
        single = not isinstance(collections, (list, tuple, set))
        colls = [collections] if single else list(collections)
        out = []
        for c in colls:
            if dask.is_dask_collection(c):
                (f,) = dask.compute(c, scheduler=self._persist_schedule, optimize_graph=optimize_graph)
                out.append(f)
            else:
                out.append(c)
        if sync:
            out = self.gather(out)
        return out[0] if single else out

    def persist(self, collections, optimize_graph: bool = True, **kwargs):
        """Starts computing collections and returns them backed by futures,
        so later computations reuse the results held in the cluster."""
        single = not isinstance(collections, (list, tuple, set))
        colls = [collections] if single else list(collections)
        res = dask.persist(*colls, scheduler=self._persist_schedule, optimize_graph=optimize_graph)
        return res[0] if single else list(res)

    # ------------------------------------------------------------ results
    def gather(self, futures, errors: str = "raise", direct=None, asynchronous=None):
        """Values of futures, in the same structure (lists, tuples, dicts)."""
        if self.asynchronous if asynchronous is None else asynchronous:
            return self._gather_async(futures, errors)
        if isinstance(futures, Iterator):
            return (self.gather(f, errors=errors) for f in futures)
        flat = flatten_futures(futures)
        if not flat:
            return futures
        self._wait_done([f._state for f in flat], None)
        good = _finished_ok(flat, errors)
        values = dict(zip((f._state.skey for f in good), self._gather_values(good)))
        return unpack_structure(futures, values, skip=(errors == "skip"))

    # ------------------------------------------------------------ asyncio
    async def _wait_async(self, futures: list):
        """Until every future is done, without blocking the event loop: each
        pending one resolves an asyncio future from its done-callback."""
        import asyncio

        loop = asyncio.get_running_loop()
        waits = []
        for f in futures:
            if f.done():
                continue
            done = loop.create_future()

            def resolve(_, done=done):
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

            f.add_done_callback(resolve)
            waits.append(done)
        if waits:
            await asyncio.gather(*waits)

    async def _gather_values_async(self, futures: list) -> list:
        import asyncio

        if not futures:
            return []
        keys = [f._state.skey for f in futures]
        unique = list(dict.fromkeys(keys))
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()

        def callback(ok, payload):
            def settle():
                if not arrived.done():
                    (arrived.set_result if ok else arrived.set_exception)(payload)

            loop.call_soon_threadsafe(settle)

        self._rc.gather_async(unique, callback)
        return _values_of(keys, unique, await arrived)

    async def _gather_async(self, futures, errors: str = "raise"):
        flat = flatten_futures(futures)
        if not flat:
            return futures
        await self._wait_async(flat)
        good = _finished_ok(flat, errors)
        values = dict(zip((f._state.skey for f in good), await self._gather_values_async(good)))
        return unpack_structure(futures, values, skip=(errors == "skip"))

    def __await__(self):
        """`client = await Client(asynchronous=True)`: connected already."""

        async def ready():
            return self

        return ready().__await__()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self._close_now()

    def _gather_values(self, futures: list) -> list:
        if not futures:
            return []
        keys = [f._state.skey for f in futures]
        unique = list(dict.fromkeys(keys))
        try:
            frames = self._rc.gather(unique)
        except KeyError as e:
            raise KeyError(f"key {e.args[0]!r} is not held by the cluster (released, cancelled or never submitted)") from None
        except _rdask.UnserializableValue as e:
            # The original exception (e.g. pickle's TypeError), as if the
            # task itself had raised it.
            key, message, payload = e.args
            exc, tb = loads_error(payload, message)
            raise _with_remote_note(exc, tb) from None
        return _values_of(keys, unique, frames)

    def cancel(self, futures, asynchronous=None, force: bool = False, reason=None, msg=None):
        flat = flatten_futures(futures)
        if flat:
            self._rc.cancel([f._state.skey for f in flat])

    def release(self, futures):
        for f in flatten_futures(futures):
            f.release()

    def who_has(self, futures=None) -> dict:
        """{key: [worker addresses]} for the given futures (default: all this
        client holds) whose values are in memory."""
        if futures is None:
            with self._lock:
                keys = list(self._states)
        else:
            keys = [f._state.skey for f in flatten_futures(futures)]
        return dict(self._rc.who_has(keys)) if keys else {}

    def scheduler_info(self, **kwargs) -> dict:
        if self.asynchronous:
            return _completed(self._scheduler_info())
        return self._scheduler_info()

    def _scheduler_info(self) -> dict:
        info = self._rc.cluster_info()
        info["address"] = self.scheduler_address
        for w in info["workers"]:
            # distributed's layout of the same figures, for code that reads them.
            w["metrics"] = {
                "memory": w["memory"],
                "managed_bytes": w["managed_bytes"],
                "spilled_bytes": {"memory": w["managed_bytes"], "disk": w["spilled_bytes"]},
                "executing": w["processing"],
            }
        info["workers"] = {w["address"]: w for w in info["workers"]}
        info["type"] = "Scheduler"
        info["id"] = info["scheduler_id"]
        info["n_workers"] = len(info["workers"])
        info["total_threads"] = sum(w["nthreads"] for w in info["workers"].values())
        info["total_memory"] = sum(w["memory_limit"] for w in info["workers"].values())
        return info

    def nthreads(self) -> dict:
        return {a: w["nthreads"] for a, w in self._scheduler_info()["workers"].items()}

    ncores = nthreads

    def wait_for_workers(self, n_workers: int = 0, timeout: float | None = None):
        if self.asynchronous:
            return self._wait_for_workers_async(n_workers, timeout)
        self._rc.wait_for_workers(int(n_workers), float(timeout if timeout is not None else 3600.0))

    async def _wait_for_workers_async(self, n_workers: int, timeout):
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._rc.cluster_info()["workers"]) < n_workers:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self._rc.cluster_info()['workers'])} of {n_workers} workers after {timeout} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------ lifecycle
    def close(self, timeout=None):
        """Closes the connection; the scheduler releases this client's keys.
        A cluster this client started is closed with it. (Asynchronous
        client: awaitable.)"""
        self._close_now()
        if self.asynchronous:
            return _completed(None)

    def _close_now(self):
        global _default_client
        if self.status == "closed" and self._closing:
            return
        self._closing = True
        self.status = "closed"
        if getattr(self, "_forwarder", None) is not None:
            self._forwarder.stopped.set()
        if self._config is not None:
            try:
                self._config.__exit__(None, None, None)
            except Exception:
                pass
            self._config = None
        if _default_client is self:
            prev = self._previous_default
            _default_client = prev if prev is not None and prev.status == "running" else None
        try:
            self._rc.close()
        except Exception:
            pass
        if self._events.is_alive() and threading.current_thread() is not self._events:
            self._events.join(timeout=5)
        if self._owns_cluster and self.cluster is not None:
            self.cluster.close()

    def shutdown(self):
        """Closes this client and the cluster it is connected to."""
        cluster = self.cluster
        self._close_now()
        if cluster is not None:
            cluster.close()
        elif self._rc is not None:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close_now()

    def __del__(self):
        try:
            if self.status == "running":
                self._close_now()
        except Exception:
            pass

    def get_task_stream(self, start=None, stop=None, count=None, plot=False, filename="task-stream.html",
                        bokeh_resources=None):
        """Task runs on worker threads (the scheduler keeps the last
        100,000 while its dashboard is on, or from the first such request
        on), as distributed returns them: dicts with key, worker, thread,
        status and startstops. `start`/`stop` are Unix times in seconds."""
        if plot:
            raise NotImplementedError("rdask draws no Bokeh plots; use rdask.performance_report for an HTML report")
        from .diagnostics import _events

        return _events(self, start, stop, count)

    def profile(self, *args, **kwargs):
        raise NotImplementedError("rdask has no statistical profiler yet; the task stream "
                                  "(client.get_task_stream, rdask.performance_report) shows where time goes")

    def _info(self) -> dict | None:
        try:
            return self._rc.cluster_info() if self.status == "running" else None
        except Exception:
            return None

    @property
    def dashboard_link(self) -> str | None:
        """`http://host:port/status` of the scheduler's dashboard, or None
        when it is off (always defined, as in distributed)."""
        if self.cluster is not None and getattr(self.cluster, "dashboard_link", None):
            return self.cluster.dashboard_link
        info = self._info()
        return f"{info['dashboard']}/status" if info and info.get("dashboard") else None

    def __repr__(self):
        info = self._info()
        if info is None:
            return f"<Client: {self.scheduler_address!r} ({self.status})>"
        threads = sum(w["nthreads"] for w in info["workers"])
        memory = sum(w["memory_limit"] for w in info["workers"])
        from .cluster import _fmt_bytes

        link = f"{info['dashboard']}/status" if info.get("dashboard") else None
        return (f"<Client: {self.scheduler_address!r} processes={len(info['workers'])} threads={threads} "
                f"memory={_fmt_bytes(memory)} dashboard={link}>")

    def _repr_html_(self):
        from .cluster import cluster_widget

        info = self._info()
        if info is None:
            return f"<div><b>rdask Client</b> {self.scheduler_address} ({self.status})</div>"
        ws = info["workers"]
        return cluster_widget("rdask Client", self.scheduler_address, self.dashboard_link, len(ws),
                              sum(w["nthreads"] for w in ws), sum(w["memory_limit"] for w in ws), ws)


_SIMPLE = frozenset((int, float, str, bytes, bool, type(None)))


@contextlib.contextmanager
def _no_gc(n: int):
    """Pauses the cyclic garbage collector while `n` objects are made in
    bulk (futures, gathered values): none of them can be garbage yet, and
    with 100k of them the collections it would run cost more than making
    them. Small batches are left alone."""
    if n < 10_000 or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _call_key(name: str, payload: bytes, deps: list, pure: bool) -> str:
    """`name-token`: for pure calls a digest of the pickled call (function,
    arguments, dependency keys), so equal calls share a key; else random."""
    if not pure:
        return f"{name}-{uuid.uuid4().hex}"
    h = hashlib.md5(payload, usedforsecurity=False)
    for d in deps:
        h.update(d.encode())
    return f"{name}-{h.hexdigest()}"


def _restrictions(workers, resources, loose: bool) -> list | None:
    """`workers=` (a name, address or host, or a list of them) and
    `resources=` ({"GPU": 1}) as the scheduler's restriction list."""
    if workers is None and not resources:
        return None
    if isinstance(workers, str):
        workers = [workers]
    workers = [str(w) for w in (workers or [])]
    resources = {str(k): float(v) for k, v in (resources or {}).items()}
    return [(workers, resources, bool(loose))]


def _values_of(keys: list, unique: list, frames: list) -> list:
    """The values of `keys` from the frames fetched for `unique` (each key once)."""
    with _no_gc(len(unique)):
        values = {k: loads_value(fr) for k, fr in zip(unique, frames)}
        return [values[k] for k in keys]


def _finished_ok(flat: list, errors: str) -> list:
    """The done futures that have values; with errors="raise" the first
    failed or cancelled one raises (the remote traceback as a note)."""
    good = []
    for f in flat:
        st = f._state
        if st.status == "error":
            if errors == "raise":
                raise raisable(_with_remote_note(st.exception, st.traceback))
        elif st.status == "cancelled":
            if errors == "raise":
                raise FutureCancelledError(f.key)
        else:
            good.append(f)
    return good


async def _completed(value):
    return value


def _with_remote_note(exc: BaseException, tb: str | None) -> BaseException:
    if tb and not any("Remote traceback" in n for n in getattr(exc, "__notes__", [])):
        try:
            exc.add_note("Remote traceback (from the worker):\n" + tb.rstrip())
        except Exception:
            pass
    return exc


def _flatten(keys):
    if isinstance(keys, list):
        for k in keys:
            yield from _flatten(k)
    else:
        yield keys


def _repack(keys, futures: dict):
    if isinstance(keys, list):
        return [_repack(k, futures) for k in keys]
    return futures[keys]


def _read_scheduler_file(path: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                return json.load(f)["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no scheduler address in {path} after {timeout} s") from None
            time.sleep(0.1)


@atexit.register
def _close_all():
    for c in list(_clients):
        try:
            c._close_now()
        except Exception:
            pass
