"""The Python side of a worker process: the executor the Rust runtime calls
on its threads, and `python -m rdask.worker` (one worker process)."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import signal
import sys
import threading

from . import _rdask
from . import config
from .config import thresholds_tuple
from .packing import unpack_deps
from .serialize import device_nbytes, dumps, dumps_error, dumps_staged, loads_function, loads_sized, nbytes

CALL, NODE, DATA = 1, 2, 3
EAGER_BYTES = 16 << 10

logger = logging.getLogger("rdask.worker")


class WorkerInfo:
    """What `get_worker()` returns inside a task."""

    def __init__(self, name: str, scheduler_address: str, nthreads: int, local_directory: str | None, token):
        self.name = name
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.local_directory = local_directory
        self.token = token
        self._local = threading.local()
        self._client = None
        self._client_lock = threading.Lock()
        # Set by `run` when the launcher placed this worker.
        self.cpus: list = []
        self.numa_node = None
        self.gpu = None
        # Its listening address, once a `Client.run` told it.
        self.address: str | None = None
        # Worker plugins by name (rdask.plugins; Client.register_plugin).
        self.plugins: dict = {}

    @property
    def current_key(self):
        return getattr(self._local, "key", None)

    def __repr__(self):
        return f"<rdask Worker {self.name!r} of {self.scheduler_address}>"


_worker: WorkerInfo | None = None


def get_worker() -> WorkerInfo:
    if _worker is None:
        raise ValueError("get_worker() called outside an rdask worker")
    return _worker


def in_task() -> bool:
    """True on a worker thread while it runs a task."""
    return _worker is not None and _worker.current_key is not None


def secede():
    """Takes this task's thread out of the worker's thread pool, as Dask's
    `secede`: a new thread takes its place, so a task that waits for other
    tasks cannot starve them, even on a single-thread worker. rdask calls it
    by itself when a task blocks on futures; calling it twice is harmless.
    Outside a task it does nothing."""
    if in_task():
        _rdask.secede()


def rejoin():
    """Accepted for Dask code. In rdask a seceded thread stays out of the
    pool until its task ends (the pool then shrinks back to its size)."""


def shared_client():
    """A client connected to this worker's scheduler (one per process)."""
    w = get_worker()
    with w._client_lock:
        if w._client is None or w._client.status != "running":
            from .client import Client

            w._client = Client(w.scheduler_address, token=w.token, set_as_default=False)
        return w._client


# Set by rdask.plugins while a worker plugin has a `transition` hook:
# called with (key, start, finish) before and after each task.
_on_transition = None


def execute(key: str, payload, inputs: list):
    """Runs one task. Returns (True, value, nbytes) or (False, message, error payload)."""
    w = _worker
    if w is not None:
        w._local.key = key
    hook = _on_transition
    if hook is not None:
        hook(key, "ready", "executing")
    try:
        msg = pickle.loads(payload)
        kind = msg[0]
        if kind == CALL:
            _, fb, args, kwargs = msg
            func = loads_function(fb)
            if inputs:
                args, kwargs = unpack_deps((args, kwargs), inputs)
            result = func(*args, **kwargs)
        elif kind == NODE:
            _, node, deps = msg
            result = node(dict(zip(deps, inputs)))
        elif kind == DATA:
            result = msg[1]
        else:
            raise ValueError(f"unknown task kind {kind!r}")
        size = nbytes(result)
        # Small results are pickled now, while this thread holds the GIL
        # anyway: serving them to a peer or client later then needs no GIL.
        out = (True, result, size, dumps(result) if size <= EAGER_BYTES else None, device_nbytes(result))
    except Exception as e:
        out = (False, f"{type(e).__name__}: {e}", dumps_error(e))
    finally:
        if w is not None:
            w._local.key = None
    if hook is not None:
        hook(key, "executing", "memory" if out[0] else "error")
    return out


def device_limit_from_env() -> int | None:
    """`RDASK_DEVICE_MEMORY_LIMIT` (bytes), set by `rdask-cuda-worker` for
    each GPU worker; None when unset (not a GPU worker)."""
    text = os.environ.get("RDASK_DEVICE_MEMORY_LIMIT", "").strip()
    if not text:
        return None
    try:
        return max(0, int(float(text)))
    except ValueError:
        raise ValueError(f"RDASK_DEVICE_MEMORY_LIMIT={text!r} is not a number of bytes") from None


# Exit code of a worker process that could not reach or join its scheduler
# within its death timeout (or was refused): its nanny does not start it
# again. (EX_TEMPFAIL of sysexits.h.)
EXIT_CANNOT_JOIN = 75
# Exit code of a worker that left because `Client.restart` asked it to: its
# nanny starts it again at once (not counted as a crash).
EXIT_RESTART = 76
_restart_requested = False


def request_restart():
    """The next clean exit of this worker process (SIGTERM) exits with
    EXIT_RESTART, so its nanny starts it again."""
    global _restart_requested
    _restart_requested = True


class Leave(BaseException):
    """Raised by the SIGTERM handler of a worker process: the worker tells
    the scheduler it is leaving (its tasks are not suspected of killing it)
    and the process exits 0."""


def _raise_leave(signum, frame):
    raise Leave()


def run(
    scheduler: str,
    name: str,
    nthreads: int = 1,
    memory_limit: int = 0,
    resources: dict | None = None,
    token: str | None = None,
    local_directory: str | None = None,
    listen_host: str = "127.0.0.1",
    connect_timeout: float = 30.0,
    cpus: list | None = None,
    numa_node: int | None = None,
    gpu: str | None = None,
    listen: str | None = None,
    memory_thresholds: dict | None = None,
    device_memory_limit: int | None = None,
):
    """Runs this process as a worker until the scheduler goes away. On
    SIGTERM (in the main thread) it leaves cleanly and raises `Leave`.

    `device_memory_limit` (bytes; `RDASK_DEVICE_MEMORY_LIMIT`, which
    `rdask-cuda-worker` sets, when not given) makes this a GPU worker: values
    holding device memory count against it, and above it the least recently
    used move to host memory (0: counted, never moved)."""
    global _worker
    _rdask.init_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_leave)
    if local_directory:
        os.makedirs(local_directory, exist_ok=True)
    if cpus or numa_node is not None:
        # Before the runtime starts its threads, so they inherit it.
        cpus, numa_node, warnings = _rdask.bind_process(list(cpus or []), numa_node)
        for w in warnings:
            logger.warning("worker %s: %s", name, w)
            print(f"rdask worker {name}: warning: {w}", file=sys.stderr)
    _worker = WorkerInfo(name, scheduler, nthreads, local_directory, token)
    _worker.cpus, _worker.numa_node, _worker.gpu = list(cpus or []), numa_node, gpu
    from .worker_extras import on_worker_start

    on_worker_start()
    if device_memory_limit is None:
        device_memory_limit = device_limit_from_env()
    try:
        _rdask.run_worker(
            scheduler,
            execute,
            dumps,
            loads_sized,
            name,
            nthreads=nthreads,
            memory_limit=memory_limit,
            resources=resources,
            listen=listen or f"{scheduler.split('://', 1)[0] if '://' in scheduler else 'tcp'}://{listen_host}:0",
            token=token,
            connect_timeout=connect_timeout,
            cpus=list(cpus or []),
            numa_node=numa_node,
            gpu=gpu,
            memory_thresholds=thresholds_tuple(memory_thresholds or config.memory_thresholds()),
            local_directory=local_directory,
            device_memory_limit=device_memory_limit,
            dumps_staged=dumps_staged,
        )
    finally:
        # The worker left (or could not join): its plugins' teardown, best
        # effort (a killed process runs none).
        from .plugins import teardown_all

        teardown_all()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rdask.worker", description="one rdask worker process")
    p.add_argument("scheduler")
    p.add_argument("--name", required=True)
    p.add_argument("--nthreads", type=int, default=1)
    p.add_argument("--memory-limit", type=int, default=0)
    p.add_argument("--resources", default="")
    p.add_argument("--token", default=os.environ.get("RDASK_TOKEN"))
    p.add_argument("--local-directory", default=None)
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--listen-port", type=int, default=0)
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--cpus", default=None, help="bind to these CPUs (a list like 0-3,8)")
    p.add_argument("--numa-node", type=int, default=None, help="take memory from this NUMA node first")
    p.add_argument("--gpu", default=None, help="the GPU this worker drives (reported to the scheduler)")
    config.add_memory_flags(p)
    p.add_argument("--protocol", default=None, help="tcp, tls or ucx (default: the scheduler address's)")
    from .security import add_tls_flags, apply_args

    add_tls_flags(p)
    a = p.parse_args(argv)
    try:
        apply_args(a)
    except ValueError as e:
        print(f"rdask worker {a.name}: {e}", file=sys.stderr)
        return EXIT_CANNOT_JOIN
    protocol = a.protocol or (a.scheduler.split("://", 1)[0] if "://" in a.scheduler else "tcp")
    from .config import parse_resources
    from .topology import parse_cpu_list

    try:
        run(
            a.scheduler,
            a.name,
            a.nthreads,
            a.memory_limit,
            parse_resources(a.resources),
            a.token,
            a.local_directory,
            a.listen_host,
            a.connect_timeout,
            cpus=parse_cpu_list(a.cpus) if a.cpus else None,
            numa_node=a.numa_node,
            gpu=a.gpu,
            listen=f"{protocol}://{a.listen_host}:{a.listen_port}",
            memory_thresholds=config.thresholds_from_args(a),
        )
    except (KeyboardInterrupt, Leave):
        return EXIT_RESTART if _restart_requested else 0
    except _rdask.CannotJoinError as e:
        print(f"rdask worker {a.name}: {e}", file=sys.stderr)
        return EXIT_CANNOT_JOIN
    except (_rdask.RdaskError, ValueError) as e:
        print(f"rdask worker {a.name}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
