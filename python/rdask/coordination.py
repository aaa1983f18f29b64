"""Coordination primitives with distributed's names and behaviour: `Lock`,
`Semaphore`, `MultiLock`, `Variable`, `Event`, `Queue`, published datasets,
`futures_of`, and `print`/`warn` from tasks to the client.

Their state lives in the scheduler (Rust, `sched/src/core/coord.rs`), so
every client and task of the cluster sees the same lock or queue by name.
Leases and waits belong to the client connection that made them: a client
that goes away gives its locks back. A value that is a future keeps its key
alive while the variable or queue holds it. Timeouts are measured here;
the scheduler is told to stop waiting when one expires.
"""

from __future__ import annotations

import builtins
import io as _io
import itertools
import pickle
import threading
import uuid
import warnings as _warnings

import cloudpickle as _cloudpickle


_FUTURE = "__rdask_future__"
_lease_ids = itertools.count(1)


def _client(client=None):
    if client is not None:
        return client
    from .api import get_client

    return get_client()


def _call(client, op: str, **kw):
    kind, data, frames = client._rc.coord(op, **kw)
    if kind == "error":
        raise ValueError(data)
    return kind, data, frames


class _Pickler(_cloudpickle.CloudPickler):
    """cloudpickle, except that futures travel as their keys (persistent
    ids), wherever they sit in the value."""

    def __init__(self, f):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.keys: list = []

    def persistent_id(self, obj):
        from .future import Future

        if isinstance(obj, Future):
            self.keys.append(obj._state.skey)
            return (_FUTURE, obj.key)
        return None


def _dumps(value) -> tuple[bytes, list]:
    f = _io.BytesIO()
    p = _Pickler(f)
    p.dump(value)
    return f.getvalue(), p.keys


def _loads(client, data):
    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            tag, key = pid
            if tag != _FUTURE:
                raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
            fut = client._futures([key])[0]
            client._adopt(fut._state)
            return fut

    return Unpickler(_io.BytesIO(bytes(data))).load()


def _pack(client, value):
    """(key, bytes): the value, and the key of the future it is (kept alive)."""
    from .future import Future

    data, _ = _dumps(value)
    return (value._state.skey if isinstance(value, Future) else None), data


def _timeout_error(what: str, timeout):
    return TimeoutError(f"{what} timed out after {timeout} s")


class _Named:
    """A primitive named across the cluster: found again by name on another
    client or in a task (it pickles as its name)."""

    _prefix = "named"

    def __init__(self, name: str | None = None, client=None):
        self.name = name or f"{self._prefix}-{uuid.uuid4().hex}"
        self._explicit_client = client

    @property
    def client(self):
        return _client(self._explicit_client)

    def __getstate__(self):
        return self.name

    def __setstate__(self, name):
        self.__init__(name)

    def __repr__(self):
        return f"<{type(self).__name__}: {self.name}>"


class Semaphore:
    """A semaphore held by the scheduler: at most `max_leases` holders of
    `name` at once across the cluster."""

    def __init__(self, max_leases: int = 1, name: str | None = None, client=None, register: bool = True,
                 scheduler_rpc=None, loop=None):
        if max_leases < 1:
            raise ValueError("max_leases must be at least 1")
        self.max_leases = int(max_leases)
        self.name = name or f"semaphore-{uuid.uuid4().hex}"
        self._explicit_client = client
        self._leases: list[int] = []
        self._lock = threading.Lock()

    @property
    def client(self):
        return _client(self._explicit_client)

    def acquire(self, timeout=None) -> bool:
        lease = next(_lease_ids)
        kind, _, _ = _call(self.client, "acquire", names=[self.name], max_leases=self.max_leases,
                           lease=lease, timeout=timeout)
        if kind == "done":
            with self._lock:
                self._leases.append(lease)
            return True
        return False

    def release(self) -> bool:
        with self._lock:
            if not self._leases:
                raise RuntimeError("Released too often")
            lease = self._leases.pop(0)
        kind, data, _ = _call(self.client, "release", lease=lease)
        return bool(data)

    def get_value(self) -> int:
        """Leases held now (by anyone)."""
        return int(_call(self.client, "leases", name=self.name)[1])

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __getstate__(self):
        # In a task, the same semaphore by name, on the task's client.
        return (self.max_leases, self.name)

    def __setstate__(self, state):
        self.__init__(state[0], state[1])

    def __repr__(self):
        return f"<Semaphore: {self.name!r}, max_leases={self.max_leases}>"


class Lock(Semaphore):
    """A lock held by the scheduler (a semaphore of one lease)."""

    def __init__(self, name: str | None = None, client=None, scheduler_rpc=None, loop=None):
        super().__init__(1, name or f"lock-{uuid.uuid4().hex}", client)

    def acquire(self, blocking: bool = True, timeout=None) -> bool:
        if not blocking:
            timeout = 0
        return super().acquire(timeout=timeout)

    def release(self):
        with self._lock:
            if not self._leases:
                raise ValueError("Lock is not yet acquired")
        super().release()

    def locked(self) -> bool:
        return self.get_value() > 0

    def __getstate__(self):
        return self.name

    def __setstate__(self, name):
        self.__init__(name)

    def __repr__(self):
        return f"<Lock: {self.name}>"


class MultiLock:
    """Several locks taken together or not at all (`num_locks` of them)."""

    def __init__(self, names=(), client=None):
        self.names = list(names)
        self._explicit_client = client
        self._lease = None

    def acquire(self, blocking: bool = True, timeout=None, num_locks: int | None = None) -> bool:
        lease = next(_lease_ids)
        kind, _, _ = _call(_client(self._explicit_client), "acquire", names=self.names, max_leases=1,
                           count=num_locks or 0, lease=lease, timeout=0 if not blocking else timeout)
        if kind == "done":
            self._lease = lease
            return True
        return False

    def release(self):
        if self._lease is None:
            raise ValueError("MultiLock is not acquired")
        lease, self._lease = self._lease, None
        _call(_client(self._explicit_client), "release", lease=lease)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class Variable(_Named):
    """A named value held by the scheduler; `get` waits until it is set."""

    _prefix = "variable"

    def set(self, value, timeout=None):
        client = self.client
        key, data = _pack(client, value)
        _call(client, "variable_set", name=self.name, key=key, value=data)

    def get(self, timeout=None):
        client = self.client
        kind, _, frames = _call(client, "variable_get", name=self.name, timeout=timeout)
        if kind == "cancelled":
            raise _timeout_error(f"Variable {self.name!r}.get", timeout)
        return _loads(client, frames[0])

    def delete(self):
        _call(self.client, "variable_delete", name=self.name)



class Event(_Named):
    """A named flag held by the scheduler; `wait` blocks until it is set."""

    _prefix = "event"

    def set(self):
        _call(self.client, "event_set", name=self.name)

    def clear(self):
        _call(self.client, "event_clear", name=self.name)

    def is_set(self) -> bool:
        return bool(_call(self.client, "event_is_set", name=self.name)[1])

    def wait(self, timeout=None) -> bool:
        kind, _, _ = _call(self.client, "event_wait", name=self.name, timeout=timeout)
        return kind == "done"



class Queue(_Named):
    """A named FIFO held by the scheduler, shared by clients and tasks."""

    _prefix = "queue"

    def __init__(self, name: str | None = None, client=None, maxsize: int = 0):
        if maxsize:
            raise NotImplementedError("Queue(maxsize=...) is not supported: rdask queues are unbounded")
        super().__init__(name, client)

    def put(self, value, timeout=None):
        client = self.client
        key, data = _pack(client, value)
        _call(client, "queue_put", name=self.name, key=key, value=data)

    def get(self, timeout=None, batch=False):
        """One item (waiting up to `timeout`); `batch=True`: every item there
        now (no wait); `batch=N`: up to N items there now."""
        client = self.client
        if batch is True:
            n = 2**31
        elif batch is False:
            n = 0
        else:
            n = int(batch)
        kind, _, frames = _call(client, "queue_get", name=self.name, batch=n, timeout=timeout)
        if kind == "cancelled":
            raise _timeout_error(f"Queue {self.name!r}.get", timeout)
        items = [_loads(client, f) for f in frames]
        return items if batch is not False else items[0]

    def qsize(self) -> int:
        return int(_call(self.client, "queue_size", name=self.name)[1])



# ---------------------------------------------------------------- datasets

def publish_dataset(client, *args, name=None, override: bool = False, **kwargs):
    """`client.publish_dataset(df=x)` or `(x, name="df")`: the futures (or
    collection of futures) stay alive under the name until unpublished."""
    data = dict(kwargs)
    if args:
        if name is None or len(args) != 1:
            raise ValueError("publish_dataset(value, name=...) or publish_dataset(name=value)")
        data[name] = args[0]
    for n, value in data.items():
        payload, keys = _dumps(value)
        _call(client, "dataset_publish", name=n, keys=sorted(set(keys)), value=payload, replace=override)


def get_dataset(client, name, default=None):
    kind, data, frames = client._rc.coord("dataset_get", name=name)
    if kind == "error":
        if default is not None:
            return default
        raise KeyError(f"Dataset '{name}' not found")
    return _loads(client, frames[0])


def unpublish_dataset(client, name):
    if not _call(client, "dataset_delete", name=name)[1]:
        raise KeyError(f"Dataset '{name}' not found")


def list_datasets(client):
    return tuple(_call(client, "dataset_list")[1])


class Datasets:
    """`client.datasets`: a mapping view of the published datasets."""

    def __init__(self, client):
        self._client = client

    def __getitem__(self, name):
        return get_dataset(self._client, name)

    def __setitem__(self, name, value):
        publish_dataset(self._client, **{name: value})

    def __delitem__(self, name):
        unpublish_dataset(self._client, name)

    def __contains__(self, name):
        return name in list_datasets(self._client)

    def __iter__(self):
        return iter(list_datasets(self._client))

    def __len__(self):
        return len(list_datasets(self._client))


# ---------------------------------------------------------------- futures_of

def futures_of(o) -> list:
    """The futures in a (nested) structure or a dask collection, as
    `distributed.futures_of`."""
    from .future import Future

    out, seen, stack = [], set(), [o]
    while stack:
        x = stack.pop()
        if isinstance(x, Future):
            if x.key not in seen:
                seen.add(x.key)
                out.append(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dask_graph__"):
            graph = x.__dask_graph__()
            if graph is not None:
                stack.extend(graph.values())
    out.reverse()
    return out


# ---------------------------------------------------------------- print / warn

FORWARD_QUEUE = "__rdask_forward__"


def print(*args, sep=" ", end="\n", file=None, flush=False):  # noqa: A001 - distributed's name
    """Prints here and, in a task, on the client too (distributed.print)."""
    builtins.print(*args, sep=sep, end=end, file=file, flush=flush)
    _forward("print", {"args": tuple(map(str, args)), "sep": sep, "end": end, "stderr": file is not None})


def warn(message, category=UserWarning, stacklevel=1, source=None):
    """Warns here and, in a task, on the client too (distributed.warn)."""
    _warnings.warn(message, category, stacklevel + 1, source)
    _forward("warn", {"message": str(message), "category": category})


def _forward(kind: str, payload: dict):
    from .worker import in_task, shared_client

    if not in_task():
        return
    try:
        Queue(FORWARD_QUEUE, client=shared_client()).put((kind, payload))
    except Exception:  # forwarding is best effort; the local output happened
        pass


class Forwarder(threading.Thread):
    """A client's thread that shows what tasks print or warn."""

    def __init__(self, client):
        super().__init__(name="rdask-forward", daemon=True)
        self.client = client
        self.stopped = threading.Event()

    def run(self):
        import sys

        while not self.stopped.is_set() and self.client.status == "running":
            try:
                kind, keys, frames = self.client._rc.coord("queue_get", name=FORWARD_QUEUE, timeout=0.5)
            except Exception:
                return
            if kind != "values":
                continue
            what, payload = pickle.loads(bytes(frames[0]))
            if what == "print":
                builtins.print(*payload["args"], sep=payload["sep"], end=payload["end"],
                               file=sys.stderr if payload["stderr"] else sys.stdout, flush=True)
            elif what == "warn":
                _warnings.warn(payload["message"], payload["category"])


class CoordinationMethods:
    """The Client's dataset methods (mixed into `rdask.Client`)."""

    def publish_dataset(self, *args, name=None, override: bool = False, **kwargs):
        publish_dataset(self, *args, name=name, override=override, **kwargs)

    def get_dataset(self, name, default=None, **kwargs):
        return get_dataset(self, name, default)

    def unpublish_dataset(self, name, **kwargs):
        unpublish_dataset(self, name)

    def list_datasets(self, **kwargs):
        return list_datasets(self)

    @property
    def datasets(self):
        return Datasets(self)
