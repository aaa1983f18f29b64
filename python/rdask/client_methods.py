"""More of the `distributed.Client` surface: run, upload_file, get_versions,
has_what, processing, retire_workers, restart, get_worker_logs,
forward_logging. `Client` inherits them from `DistributedMethods`.

rdask's scheduler is Rust and its protocol has no "run this on a worker
now" message, so `run` is built from tasks pinned to each worker (a
restriction to that worker's address, no other worker allowed, a high
priority). Everything here that runs code on workers goes through `run`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
import uuid
import warnings

from . import _rdask
from . import worker_extras
from .keys import funcname
from .packing import flatten_futures

logger = logging.getLogger("rdask.client")

# Priority of the pinned tasks of `run`: ahead of queued user tasks.
RUN_PRIORITY = 1 << 30
# How often `forward_logging` fetches new records from the workers.
FORWARD_LOGGING_INTERVAL = 0.5


# ---------------------------------------------------------------- worker side
def _has_arg(func, name: str) -> bool:
    """As distributed's `has_arg`: `func` (or the function in a partial)
    names the argument `name` (not just **kwargs)."""
    while True:
        try:
            spec = inspect.getfullargspec(func)
            if name in set(spec.args) | set(spec.kwonlyargs):
                return True
        except TypeError:
            return False
        func = getattr(func, "func", None)
        if func is None:
            return False


def _run_task(function, args, kwargs, address):
    """The task `Client.run` pins to one worker."""
    from . import worker

    w = worker._worker
    if w is not None and w.address is None:
        w.address = address
    if "dask_worker" not in kwargs and _has_arg(function, "dask_worker"):
        kwargs = {**kwargs, "dask_worker": worker.get_worker()}
    return function(*args, **kwargs)


def _keep_copy(*values):
    """Depends on values so that the worker it runs on fetches (and keeps)
    a copy of each; returns nothing."""
    return None


def _logs_for(cursors: dict, limit: int = 1000):
    """Records after this worker's cursor (forward_logging); nothing on a
    worker that is a thread of the client's own process, whose records go
    to the client's loggers directly."""
    from . import worker

    w = worker._worker
    if w is None:
        return 0, []
    return worker_extras.logs_since(cursors.get(w.address, 0), limit)


def _log_cursor_if_process():
    from . import worker

    return worker_extras.log_cursor() if worker._worker is not None else 0


# ---------------------------------------------------------------- versions check
# Errors when they differ (pickled code and the task protocol depend on
# them); the other packages only warn.
REQUIRED_PACKAGES = ("python", "rdask", "dask", "cloudpickle")


def _version_table(rows: list) -> str:
    header = ("Package", "Client", "Scheduler", "Workers")
    table = [header] + rows
    widths = [max(len(str(r[i])) for r in table) for i in range(4)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    for i, r in enumerate(table):
        out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            out.append(line.replace("-", "="))
    out.append(line)
    return "\n".join(out)


def version_mismatches(versions: dict) -> tuple[str, str]:
    """(error, warning) texts for get_versions(check=True), "" when none."""
    client = versions["client"]["packages"]
    scheduler = versions["scheduler"].get("packages", {})
    workers = {a: v["packages"] for a, v in versions["workers"].items()}
    names = list(dict.fromkeys([*client, *scheduler, *(k for w in workers.values() for k in w)]))
    errors, notes = [], []
    for pkg in names:
        def norm(v, pkg=pkg):
            if v is not None and pkg == "python":
                return ".".join(str(v).split(".")[:2])
            return v

        parties = [client.get(pkg, "MISSING")]
        if pkg in scheduler:
            parties.append(scheduler[pkg])
        parties += [w.get(pkg, "MISSING") for w in workers.values()]
        exact = {str(v) for v in parties}
        if len(exact) <= 1:
            continue
        wv = sorted({str(w.get(pkg)) for w in workers.values()})
        row = (pkg, str(client.get(pkg)), str(scheduler.get(pkg, "")),
               wv[0] if len(wv) == 1 else "{" + ", ".join(wv) + "}")
        if pkg in REQUIRED_PACKAGES and len({str(norm(v)) for v in parties}) > 1:
            errors.append(row)
        else:
            notes.append(row)
    error = ("Mismatched versions found\n\n" + _version_table(errors)) if errors else ""
    warning = ("Mismatched versions found\n\n" + _version_table(notes)) if notes else ""
    return error, warning


# ---------------------------------------------------------------- dask's "distributed" scheduler name
def _distributed_get(dsk, keys, **kwargs):
    """`dask.compute(..., scheduler="distributed")`: the default rdask
    client, else (if installed) distributed's own."""
    from .client import default_client

    c = default_client()
    if c is not None:
        return c.get(dsk, keys, **kwargs)
    try:
        from distributed import get_client
    except ImportError:
        raise RuntimeError("Requested distributed scheduler but no Client active.") from None
    return get_client().get(dsk, keys, **kwargs)


def _register_scheduler_names():
    """dask looks the strings "distributed" and "dask.distributed" up with
    `distributed.get_client()`, which knows nothing of rdask (and fails when
    distributed is not installed). Named schedulers are looked up first, so
    registering both names there makes them resolve to the default rdask
    client (and still to distributed's when no rdask client is active)."""
    try:
        from dask import base
    except Exception:
        return
    names = getattr(base, "named_schedulers", None)
    if isinstance(names, dict):
        for name in ("distributed", "dask.distributed"):
            names.setdefault(name, _distributed_get)


_register_scheduler_names()


def _awaitable_when_asynchronous(method):
    """On an asynchronous client (`Client(asynchronous=True)`) the method
    returns an awaitable: it runs in a thread (asyncio.to_thread), so the
    event loop is not blocked while it waits for workers."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if getattr(self, "asynchronous", False):
            import asyncio

            return asyncio.to_thread(method, self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------- the mixin
class DistributedMethods:
    """`distributed.Client` methods built on submit/who_has/cluster_info;
    mixed into `rdask.Client`."""

    # -------------------------------------------------------- helpers
    def _dm_workers(self) -> dict:
        """{address: worker summary} of the workers connected now."""
        return {w["address"]: w for w in self._rc.cluster_info()["workers"]}

    @staticmethod
    def _dm_resolve(workers, info: dict) -> list:
        """Addresses of `workers` (addresses or names); all when None."""
        if workers is None:
            return list(info)
        if isinstance(workers, (str, int)):
            workers = [workers]
        by_name = {str(w["name"]): a for a, w in info.items()}
        out, missing = [], []
        for w in workers:
            w = str(w)
            a = w if w in info else by_name.get(w)
            if a is None and "://" not in w:
                a = next((x for x in info if x.split("://", 1)[-1] == w), None)
            if a is None:
                missing.append(w)
            elif a not in out:
                out.append(a)
        if missing:
            raise ValueError(f"no such workers: {missing} (connected: {sorted(info)})")
        return out

    def _dm_state(self, name: str, factory):
        with self._lock:
            v = self.__dict__.get(name)
            if v is None:
                v = self.__dict__[name] = factory()
            return v

    def _dm_submit_run(self, function, args, kwargs, targets) -> dict:
        name = funcname(function)
        futures = {a: self.submit(_run_task, function, tuple(args), dict(kwargs), a,
                                  key=f"run-{name}-{uuid.uuid4().hex}", workers=[a], allow_other_workers=False,
                                  pure=False, priority=RUN_PRIORITY)
                   for a in targets}
        self._dm_pin(futures)
        return futures

    def _dm_pin(self, futures: dict):
        """Remembers where pinned tasks run (for processing())."""
        pinned = self._dm_state("_dm_pinned", dict)
        with self._lock:
            if len(pinned) > 10_000:
                for skey in [k for k in pinned if (st := self._states.get(k)) is None or st.finished]:
                    del pinned[skey]
            for a, f in futures.items():
                pinned[f._state.skey] = a

    def _dm_collect(self, futures: dict, on_error: str, timeout: float | None = None) -> dict:
        """Waits for the pinned tasks of `run`; a worker that leaves before
        running its task gives a CommClosedError for that worker."""
        from .client import _with_remote_note
        from .future import FutureCancelledError, raisable

        deadline = None if timeout is None else time.monotonic() + timeout
        pending = dict(futures)
        failed: dict = {}
        while pending:
            self._wait_done([f._state for f in pending.values()], 0.5)
            for a in [a for a, f in pending.items() if f.done()]:
                del pending[a]
            if not pending:
                break
            if self.status != "running":
                for a in list(pending):
                    failed[a] = _rdask.CommClosedError("the client closed before the worker ran the function")
                    del pending[a]
                break
            alive = self._dm_workers()
            timed_out = deadline is not None and time.monotonic() > deadline
            for a in [a for a in pending if a not in alive or timed_out]:
                f = pending.pop(a)
                failed[a] = (TimeoutError(f"worker {a} did not run {f.key!r} within {timeout} s") if timed_out
                             else _rdask.CommClosedError(f"worker {a} left before it ran {f.key!r}"))
                self.cancel([f])
        results, errors = {}, {}
        good = []
        for a, f in futures.items():
            st = f._state
            if a in failed:
                errors[a] = failed[a]
            elif st.status == "finished":
                good.append(a)
            elif st.status == "cancelled":
                errors[a] = FutureCancelledError(f.key, st.traceback or "cancelled")
            else:
                errors[a] = _with_remote_note(raisable(st.exception), st.traceback) if st.exception is not None \
                    else RuntimeError(f"{f.key!r} failed on {a}")
        if errors and on_error == "raise":
            raise next(iter(errors.values()))
        values = self.gather([futures[a] for a in good], asynchronous=False) if good else []
        results = dict(zip(good, values))
        out = {}
        for a in futures:
            if a in results:
                out[a] = results[a]
            elif on_error == "return":
                out[a] = errors[a]
        return out

    def _dm_run(self, function, args=(), kwargs=None, targets=None, on_error="raise", timeout=None) -> dict:
        if targets is None:
            targets = list(self._dm_workers())
        if not targets:
            return {}
        return self._dm_collect(self._dm_submit_run(function, args, kwargs or {}, targets), on_error, timeout)

    # -------------------------------------------------------- run
    @_awaitable_when_asynchronous
    def run(self, function, *args, workers=None, wait: bool = True, nanny: bool = False, on_error: str = "raise",
            **kwargs):
        """Runs `function(*args, **kwargs)` on every worker (or those in
        `workers`: addresses or names) and returns {worker address: result}.
        A `function` that takes a `dask_worker` argument gets the worker
        (`rdask.get_worker()`). `on_error="raise"` raises the first error,
        `"return"` puts the exception in the dict, `"ignore"` leaves that
        worker out. `wait=False` returns None at once. (Asynchronous client:
        an awaitable, as for the other methods of this class.)

        rdask runs it as a task pinned to each worker (ahead of queued
        tasks): it waits for a free thread of that worker, so a worker whose
        threads are all busy runs it when one finishes, and a paused worker
        when it resumes. A worker that leaves first gives CommClosedError."""
        return self._dm_run_user(function, args, kwargs, workers, wait, nanny, on_error)

    def _dm_run_user(self, function, args, kwargs, workers=None, wait=True, nanny=False, on_error="raise"):
        if nanny:
            raise NotImplementedError("Client.run(nanny=True): rdask's nannies are not reachable from the "
                                      "client (they have no RPC server); run on the workers instead")
        if on_error not in ("raise", "return", "ignore"):
            raise ValueError(f"on_error must be 'raise', 'return' or 'ignore', not {on_error!r}")
        self._check()
        info = self._dm_workers()
        targets = self._dm_resolve(workers, info)
        self._dm_push_uploads(targets)
        self._dm_push_plugins(targets)
        futures = self._dm_submit_run(function, args, kwargs, targets)
        if not wait:
            from .api import fire_and_forget

            fire_and_forget(list(futures.values()))
            return None
        return self._dm_collect(futures, on_error)

    def run_on_scheduler(self, function, *args, **kwargs):
        """Runs `function(*args, **kwargs)` in the scheduler's process and
        returns its result (a `dask_scheduler` argument gets the scheduler's
        Python-side state: address, workers, clients, plugins). Works with
        the Python `rdask-scheduler` and a LocalCluster; the Rust
        `rdask-scheduler` binary has no Python and says so."""
        import cloudpickle

        return self._dm_scheduler_call("run", "", cloudpickle.dumps((function, args, kwargs)))

    def _dm_scheduler_call(self, kind: str, name: str, payload: bytes):
        import cloudpickle

        from .serialize import loads_error

        ok, message, frame = self._rc.scheduler_call(kind, name, payload)
        if ok:
            return cloudpickle.loads(bytes(frame)) if frame is not None else None
        if frame is not None:
            exc, tb = loads_error(frame, message)
            from .client import _with_remote_note

            raise _with_remote_note(exc, tb)
        if "no Python side" in message:
            raise NotImplementedError(message)
        raise ValueError(message)

    def unregister_scheduler_plugin(self, name):
        """Removes a scheduler plugin (its `close` runs)."""
        self._dm_scheduler_call("unregister_plugin", str(name), b"")

    # -------------------------------------------------------- upload_file
    @_awaitable_when_asynchronous
    def upload_file(self, filename, load: bool = True) -> dict:
        """Sends a .py, .zip, .egg (or .pyz/.whl) file to every worker and
        makes it importable there (and imports it, with load=True, as
        distributed does; a module uploaded again is reloaded).

        Workers that join later get it too: those a LocalCluster starts or
        restarts read the cluster's upload folder when they start; other
        workers (a remote cluster) get every file this client uploaded the
        next time this client calls `run` (or `upload_file`, `get_versions`,
        `get_worker_logs`), not when it merely submits tasks.
        Returns {worker address: [module names]}."""
        path = os.fspath(filename)
        name = os.path.basename(path)
        with open(path, "rb") as f:
            data = f.read()
        shared = getattr(self.cluster, "_upload_dir", None)
        if shared and os.path.isdir(shared):
            worker_extras.write_atomic(os.path.join(shared, name), data)
        info = self._dm_workers()
        targets = list(info)
        self._dm_push_uploads(targets)
        out = self._dm_run(worker_extras.install_upload, (name, data, "reload" if load else "none"),
                           targets=targets)
        uploads = self._dm_state("_dm_uploads", dict)
        seen = self._dm_state("_dm_upload_seen", set)
        with self._lock:
            uploads[name] = data
            seen.update(targets)
        return out

    def _dm_push_uploads(self, targets):
        """Gives workers this client has not seen since its last upload the
        files it uploaded."""
        uploads = self.__dict__.get("_dm_uploads")
        if not uploads:
            return
        seen = self._dm_state("_dm_upload_seen", set)
        with self._lock:
            new = [a for a in targets if a not in seen]
            files = list(uploads.items())
        if not new:
            return
        for name, data in files:
            self._dm_run(worker_extras.install_upload, (name, data, "none"), targets=new)
        with self._lock:
            seen.update(new)

    # -------------------------------------------------------- plugins
    @_awaitable_when_asynchronous
    def register_plugin(self, plugin, name: str | None = None, idempotent: bool | None = None) -> dict:
        """Registers a worker plugin (`rdask.WorkerPlugin`, a duck-typed
        object with `setup(worker)`, or a subclass instance of distributed's
        WorkerPlugin) and runs its `setup(worker)` on every worker now;
        returns {worker address: {"status": "OK"}} and raises the first
        setup error. Registering under a name in use replaces that plugin
        (its teardown runs first), unless `idempotent` (default: the
        plugin's `idempotent` attribute, else False): then nothing happens
        and {} comes back. `name` defaults to the plugin's `name` attribute,
        else its class name and a random suffix.

        Workers that join later set it up too: those a LocalCluster starts
        or restarts (scale, a nanny restart, `restart`) when they start,
        before they run any task; other workers (a remote cluster) the next
        time this client calls `run` (or `upload_file`, `get_versions`,
        `get_worker_logs`), as for `upload_file`.

        Scheduler and nanny plugins raise NotImplementedError: the scheduler
        is Rust and runs no Python, and nannies run no plugin code."""
        from . import plugins

        self._check()
        plugin = plugins.from_distributed(plugin)
        if plugins.is_scheduler_plugin(plugin):
            import cloudpickle

            name = str(name) if name is not None else plugins.plugin_name(plugin)
            if idempotent is None:
                idempotent = bool(getattr(plugin, "idempotent", False))
            self._dm_scheduler_call("register_plugin", name, cloudpickle.dumps((plugin, bool(idempotent))))
            return {}
        plugins.check_worker_plugin(plugin)
        if getattr(self.cluster, "processes", True) is False:
            raise NotImplementedError("worker plugins need worker processes: the workers of "
                                      "LocalCluster(processes=False) are threads of this process, with no worker "
                                      "object to set up")
        name = str(name) if name is not None else plugins.plugin_name(plugin)
        if idempotent is None:
            idempotent = bool(getattr(plugin, "idempotent", False))
        registry = self._dm_state("_dm_plugins", dict)
        folder = self._dm_plugin_dir()
        if idempotent and (name in registry or (folder and plugins.has_plugin_file(folder, name))):
            return {}
        record = plugins.make_record(name, plugin, idempotent)
        before = self._dm_workers()
        targets = list(before)
        # workers this client has not seen get what it registered before
        self._dm_push_uploads(targets)
        self._dm_push_plugins(targets)
        if folder:
            plugins.write_plugin_file(folder, record)
        with self._lock:
            registry.pop(name, None)
            registry[name] = record
        out = self._dm_run(plugins.add_plugin, (record,), targets=targets, on_error="return")
        seen = self._dm_state("_dm_plugin_seen", set)
        with self._lock:
            seen.update(targets)
        return self._dm_plugin_results(out, len(before))

    def _dm_plugin_results(self, out: dict, n_before: int, timeout: float = 60.0) -> dict:
        """{address: {"status": "OK"}} from the results of add_plugin; raises
        the first error; waits for the workers a plugin restarted."""
        errors, restarting, ok = [], [], {}
        for a, r in out.items():
            if isinstance(r, _rdask.CommClosedError):
                continue  # it left (or restarted) before answering
            if isinstance(r, BaseException):
                errors.append(r)
                continue
            ok[a] = {"status": "OK"}
            if isinstance(r, dict) and r.get("restarting"):
                restarting.append(a)
        if restarting:
            deadline = time.monotonic() + timeout
            while True:
                now = set(self._dm_workers())
                if not (now & set(restarting)) and len(now) >= n_before:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(now)} of {n_before} workers back {timeout} s after a plugin "
                                       "restarted them")
                time.sleep(0.05)
        if errors:
            raise errors[0]
        return ok

    def register_worker_plugin(self, plugin=None, name: str | None = None, nanny: bool | None = None):
        """The older name of `register_plugin` (distributed's). `nanny=True`
        raises NotImplementedError (rdask's nannies run no plugin code)."""
        from . import plugins

        if nanny:
            raise NotImplementedError(plugins.NANNY_REASON)
        return self.register_plugin(plugin, name=name, idempotent=False)

    @_awaitable_when_asynchronous
    def unregister_worker_plugin(self, name: str, nanny: bool | None = None) -> dict:
        """Removes a worker plugin: each worker runs its `teardown(worker)`,
        and workers that join later no longer set it up. Raises ValueError
        when no plugin of that name is registered, and the first teardown
        error."""
        from . import plugins

        if nanny:
            raise NotImplementedError(plugins.NANNY_REASON)
        self._check()
        name = str(name)
        registry = self._dm_state("_dm_plugins", dict)
        with self._lock:
            known = registry.pop(name, None) is not None
        folder = self._dm_plugin_dir()
        if folder and plugins.remove_plugin_file(folder, name):
            known = True
        out = self._dm_run(plugins.remove_plugin, (name,), on_error="return")
        errors, ok = [], {}
        for a, r in out.items():
            if isinstance(r, _rdask.CommClosedError):
                continue
            if isinstance(r, BaseException):
                errors.append(r)
                known = True
                continue
            ok[a] = {"status": "OK"}
            known = known or bool(r.get("removed"))
        if not known:
            raise ValueError(f"The worker plugin {name} does not exist")
        if errors:
            raise errors[0]
        return ok

    def _dm_plugin_dir(self) -> str | None:
        folder = getattr(self.cluster, "_plugin_dir", None)
        return folder if folder and os.path.isdir(folder) else None

    def _dm_push_plugins(self, targets):
        """Gives workers this client has not seen since it registered its
        plugins those plugins (the workers of a remote cluster that joined
        later; a LocalCluster's have them from its folder and skip them)."""
        from . import plugins

        registry = self.__dict__.get("_dm_plugins")
        if not registry:
            return
        seen = self._dm_state("_dm_plugin_seen", set)
        with self._lock:
            new = [a for a in targets if a not in seen]
            records = list(registry.values())
        if not new:
            return
        out = self._dm_run(plugins.sync_plugins, (records,), targets=new, on_error="return")
        for a, r in out.items():
            if isinstance(r, BaseException) and not isinstance(r, _rdask.CommClosedError):
                logger.warning("worker plugins failed to set up on %s: %s", a, r)
        with self._lock:
            seen.update(new)

    # -------------------------------------------------------- versions
    @_awaitable_when_asynchronous
    def get_versions(self, check: bool = False, packages=None) -> dict:
        """{"scheduler": {...}, "workers": {address: {...}}, "client": {...}},
        each {"host": {...}, "packages": {"python": ..., "rdask": ..., "dask":
        ..., "cloudpickle": ..., "numpy": ..., ...}} as distributed returns.
        The scheduler is Rust: in a LocalCluster of this process its
        packages are this process's python and rdask; a remote scheduler's
        packages are unknown (empty; it speaks this client's protocol
        version, or the client could not have connected). check=True raises
        ValueError naming the packages whose versions differ (python by
        major.minor, rdask, dask, cloudpickle) and warns for the others."""
        client = worker_extras.versions(packages)
        workers = self._dm_run_user(worker_extras.versions, (packages,), {})
        if getattr(self.cluster, "scheduler", None) is not None:
            scheduler = {"host": client["host"],
                         "packages": {"python": client["packages"]["python"], "rdask": client["packages"]["rdask"]}}
        else:
            scheduler = {"host": {}, "packages": {}}
        scheduler["protocol"] = _rdask.PROTOCOL_VERSION
        result = {"scheduler": scheduler, "workers": workers, "client": client}
        if check:
            error, warning = version_mismatches(result)
            if warning:
                warnings.warn(warning)
            if error:
                raise ValueError(error)
        return result

    # -------------------------------------------------------- where keys are
    @_awaitable_when_asynchronous
    def has_what(self, workers=None) -> dict:
        """{worker address: (keys...)} of the keys this client holds that are
        in memory there (every worker listed, the empty ones too). Keys of
        other clients are not listed: rdask's scheduler answers who_has only
        for keys asked for by name."""
        info = self._dm_workers()
        targets = self._dm_resolve(workers, info)
        with self._lock:
            by_skey = {k: st.key for k, st in self._states.items()}
        where = dict(self._rc.who_has(list(by_skey))) if by_skey else {}
        out: dict = {a: [] for a in targets}
        for skey, holders in where.items():
            for a in holders:
                if a in out:
                    out[a].append(by_skey.get(skey, skey))
        return {a: tuple(ks) for a, ks in out.items()}

    @_awaitable_when_asynchronous
    def processing(self, workers=None) -> dict:
        """{worker address: (keys...)} of the tasks each worker is running
        or has queued (all clients' tasks, as the scheduler sees them)."""
        info = self._dm_workers()
        targets = self._dm_resolve(workers, info)
        where = self._rc.processing()
        return {a: tuple(where.get(a, ())) for a in targets}

    # -------------------------------------------------------- replicas
    def _dm_copy_to(self, placements: dict, timeout: float) -> None:
        """{destination address: [futures]}: each destination fetches and
        keeps a copy (a pinned task that depends on them)."""
        copies = []
        for dest, futs in placements.items():
            if futs:
                copies.append(self.submit(_keep_copy, *futs, key=f"replica-{uuid.uuid4().hex}", workers=[dest],
                                          allow_other_workers=False, pure=False, priority=RUN_PRIORITY))
        if copies and not self._wait_done([f._state for f in copies], timeout):
            raise TimeoutError(f"copying values to other workers took over {timeout} s")
        for c in copies:
            if c._state.status == "error":
                raise c._state.exception
        del copies

    @_awaitable_when_asynchronous
    def replicate(self, futures, n: int | None = None, workers=None, branching_factor: int = 2, timeout: float = 120.0):
        """Copies each future's value onto `n` workers (default: every
        worker, or every one of `workers`); returns when they hold it."""
        flat = flatten_futures(futures)
        if not flat:
            return
        self._wait_done([f._state for f in flat], timeout)
        info = self._dm_workers()
        pool = self._dm_resolve(workers, info) if workers is not None else sorted(info)
        want = len(pool) if n is None else min(int(n), len(pool))
        where = dict(self._rc.who_has([f._state.skey for f in flat]))
        placements: dict = {}
        load = {a: 0 for a in pool}
        for f in flat:
            holders = set(where.get(f._state.skey, ()))
            missing = want - len(holders & set(pool))
            for dest in sorted((a for a in pool if a not in holders), key=lambda a: load[a])[:max(0, missing)]:
                placements.setdefault(dest, []).append(f)
                load[dest] += 1
        self._dm_copy_to(placements, timeout)

    @_awaitable_when_asynchronous
    def rebalance(self, futures=None, workers=None, timeout: float = 120.0, **kwargs):
        """Moves values so that each worker holds about the same number of
        bytes of them: the values of `futures` (default: every value this
        client holds) on `workers` (default: all). A value moves by a copy
        to the receiving worker, then the sender's copy is dropped (never a
        last copy)."""
        if futures is None:
            with self._lock:
                states = [st for st in self._states.values() if st.status == "finished"]
            flat = self._futures([st.key for st in states])
        else:
            flat = flatten_futures(futures)
        if not flat:
            return
        info = self._dm_workers()
        pool = self._dm_resolve(workers, info) if workers is not None else sorted(info)
        if len(pool) < 2:
            return
        by_key = {f._state.skey: f for f in flat}
        where = dict(self._rc.who_has(list(by_key)))
        reported = self._rc.who_has_sizes(list(where))
        sizes = {k: max(1, int(reported.get(k, 1))) for k in where}
        held = {a: [] for a in pool}
        for k, holders in where.items():
            for a in holders:
                if a in held:
                    held[a].append(k)
        load = {a: sum(sizes[k] for k in ks) for a, ks in held.items()}
        mean = sum(load.values()) / len(pool)
        moves: dict = {}
        drops = []
        for src in sorted(pool, key=lambda a: -load[a]):
            for k in sorted(held[src], key=lambda k: -sizes[k]):
                if load[src] - sizes[k] < mean - 1e-9:
                    continue
                dest = min(pool, key=lambda a: load[a])
                if dest == src or load[dest] + sizes[k] > mean + 1e-9 and load[dest] > 0:
                    continue
                if dest in where[k]:
                    continue
                moves.setdefault(dest, []).append(by_key[k])
                drops.append((k, src))
                load[src] -= sizes[k]
                load[dest] += sizes[k]
                where[k] = list(where[k]) + [dest]
        self._dm_copy_to(moves, timeout)
        if drops:
            self._rc.drop_replicas(drops)

    @_awaitable_when_asynchronous
    def processing_counts(self, workers=None) -> dict:
        """{worker address: number of tasks it is running or has queued}."""
        info = self._dm_workers()
        return {a: int(info[a]["processing"]) for a in self._dm_resolve(workers, info)}

    # -------------------------------------------------------- retire
    @_awaitable_when_asynchronous
    def retire_workers(self, workers=None, close_workers: bool = True, remove: bool = True, timeout: float = 60.0,
                       **kwargs) -> dict:
        """Stops workers for good (addresses or names; default: the idle
        ones, keeping at least one worker) and returns {address: info}.

        Before they go, each value this client holds that lives only on
        them is copied to a remaining worker (a pinned task that depends on
        it, so the remaining worker fetches and keeps a replica); values of
        other clients are recomputed if needed. Each worker then leaves
        cleanly: its queued tasks go to other workers, and a LocalCluster's
        nanny does not start it again. `close_workers=False` is treated as
        True: an rdask worker leaves the scheduler by ending its process."""
        info = self._dm_workers()
        if workers is None:
            idle = [a for a, w in info.items() if w["processing"] == 0]
            targets = idle[: max(0, min(len(idle), len(info) - 1))]
        else:
            targets = self._dm_resolve(workers, info)
        if not targets:
            return {}
        remaining = [a for a in info if a not in targets]
        self._dm_move_data(targets, remaining, timeout)
        cluster_workers = getattr(self.cluster, "workers", None)
        by_cluster = []
        if isinstance(cluster_workers, dict) and hasattr(self.cluster, "scale_down"):
            by_cluster = [a for a in targets if str(info[a]["name"]) in cluster_workers]
        if by_cluster:
            self.cluster.scale_down(by_cluster)
        others = [a for a in targets if a not in by_cluster]
        if others:
            self._dm_run(worker_extras.leave_soon, targets=others, on_error="raise")
        deadline = time.monotonic() + timeout
        while set(targets) & set(self._dm_workers()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {sorted(set(targets) & set(self._dm_workers()))} "
                                   f"still connected {timeout} s after being retired")
            time.sleep(0.05)
        return {a: {"type": "Worker", "id": info[a]["name"], "name": info[a]["name"], "address": a,
                    "host": info[a].get("host"), "nthreads": info[a]["nthreads"],
                    "memory_limit": info[a]["memory_limit"]} for a in targets}

    def _dm_move_data(self, leaving: list, remaining: list, timeout: float):
        with self._lock:
            states = {k: st for k, st in self._states.items() if st.status == "finished"}
        if not states:
            return
        leaving_set = set(leaving)
        where = dict(self._rc.who_has(list(states)))
        only = [k for k, holders in where.items() if holders and set(holders) <= leaving_set]
        if not only:
            return
        if not remaining:
            logger.warning("retire_workers: no worker remains; %d values held only by the retired workers "
                           "will be recomputed when needed", len(only))
            return
        by_dest: dict = {}
        for i, k in enumerate(only):
            by_dest.setdefault(remaining[i % len(remaining)], []).append(states[k].key)
        copies = []
        for dest, keys in by_dest.items():
            deps = self._futures(keys)
            copies.append(self.submit(_keep_copy, *deps, key=f"retire-copy-{uuid.uuid4().hex}", workers=[dest],
                                      allow_other_workers=False, pure=False, priority=RUN_PRIORITY))
            self._dm_pin({dest: copies[-1]})
            del deps
        if not self._wait_done([f._state for f in copies], timeout):
            logger.warning("retire_workers: copying values off the retiring workers took over %s s", timeout)
        left = [k for k, holders in dict(self._rc.who_has(only)).items() if set(holders) <= leaving_set]
        if left:
            logger.warning("retire_workers: %d values could not be copied and will be recomputed if needed",
                           len(left))
        del copies

    # -------------------------------------------------------- restart
    @_awaitable_when_asynchronous
    def restart(self, timeout: float | None = None, wait_for_workers: bool = True):
        """Restarts every worker process and forgets this client's work, as
        distributed does: all of this client's futures become cancelled
        (`result()` raises CancelledError) and their keys are released.
        A LocalCluster's nannies replace their processes at once; workers of
        a remote cluster are asked (with `run`) to leave and exit so that
        their nanny starts them again (`rdask-worker` with nannies; a busy
        worker does so when a thread frees up). Waits until as many workers
        as before are back (TimeoutError after `timeout`, default 60 s)."""
        self._check()
        timeout = 60.0 if timeout is None else float(timeout)
        info = self._dm_workers()
        old = set(info)
        self._dm_cancel_all("was cancelled: Client.restart() restarted the workers")
        cluster = self.cluster
        rest = list(old)
        if cluster is not None and hasattr(cluster, "_restart_workers"):
            if getattr(cluster, "processes", True) is False:
                warnings.warn("Client.restart(): the workers of LocalCluster(processes=False) are threads of this "
                              "process and cannot be restarted; only the client's state was cleared")
                return self
            if cluster._restart_workers():
                # workers started elsewhere (rdask-worker) for this scheduler
                rest = [a for a in old if a in info and str(info[a]["name"]) not in cluster.workers]
        if rest:
            self._dm_run(worker_extras.leave_soon, kwargs={"restart": True}, targets=rest, on_error="return",
                         timeout=timeout)
        if wait_for_workers:
            deadline = time.monotonic() + timeout
            while True:
                now = set(self._dm_workers())
                if len(now - old) >= len(old) and not (now & old):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(now - old)} of {len(old)} workers back {timeout} s after restart")
                time.sleep(0.05)
        return self

    def _dm_cancel_all(self, reason: str):
        with self._lock:
            states = list(self._states.values())
            keys = list(self._states)
            released = list(self._releasing)
            self._states.clear()
            self._releasing.clear()
            self._forever.clear()
            callbacks = []
            for st in states:
                st.status, st.exception, st.traceback = "cancelled", None, reason
                st.finished = True
                callbacks.extend(st.callbacks)
                st.callbacks = []
            self._cond.notify_all()
        try:
            if keys:
                self._rc.cancel(keys)
            if keys or released:
                self._rc.release(keys + released)
        except Exception as e:  # the scheduler is gone: nothing to release
            logger.debug("restart: releasing keys failed: %s", e)
        for fn, fut in callbacks:
            self._run_callback(fn, fut)

    # -------------------------------------------------------- logs
    @_awaitable_when_asynchronous
    def get_worker_logs(self, n: int | None = None, nanny: bool = False, workers=None) -> dict:
        """{worker address: [(level, message), ...]}, oldest first (the last
        `n`): the Python `logging` records of each worker process, kept in a
        ring buffer of 10,000 (the Rust runtime logs to the worker's stderr
        with `tracing`; those lines are not in it)."""
        if nanny:
            raise NotImplementedError("get_worker_logs(nanny=True): rdask's nannies are not reachable from the "
                                      "client; their log goes to the stderr of the process that runs them")
        return self._dm_run_user(worker_extras.read_logs, (n,), {}, workers)

    @_awaitable_when_asynchronous
    def forward_logging(self, logger_name: str | None = None, level=logging.NOTSET):
        """Records logged on workers (by `logger_name` and its children, all
        loggers when None, at `level` or above) are handled again by the
        logger of the same name in this process, as in distributed.

        Delivery: this client fetches new records every 0.5 s with a small
        pinned task per worker (`run`), so they arrive up to about half a
        second late (later while a worker's threads are all busy), and a
        worker that dies loses the records not fetched yet. Workers that are
        threads of this process (processes=False) log here directly."""
        if isinstance(level, str):
            level = logging.getLevelName(level.upper())
        forwards = self._dm_state("_dm_forwards", dict)
        cursors = self._dm_state("_dm_log_cursors", dict)
        # only records from now on
        cursors.update(self._dm_run(_log_cursor_if_process, on_error="ignore"))
        with self._lock:
            forwards[logger_name] = int(level)
            t = self.__dict__.get("_dm_forward_thread")
            if t is None or not t.is_alive():
                t = threading.Thread(target=self._dm_forward_loop, name="rdask-forward-logging", daemon=True)
                self.__dict__["_dm_forward_thread"] = t
                t.start()

    def unforward_logging(self, logger_name: str | None = None):
        """Stops forwarding the records of `logger_name`."""
        forwards = self._dm_state("_dm_forwards", dict)
        with self._lock:
            forwards.pop(logger_name, None)

    def _dm_forward_loop(self):
        forwards = self._dm_state("_dm_forwards", dict)
        cursors = self._dm_state("_dm_log_cursors", dict)
        while self.status == "running":
            with self._lock:
                if not forwards:
                    self.__dict__["_dm_forward_thread"] = None
                    return
                rules = dict(forwards)
            try:
                got = self._dm_run(_logs_for, (dict(cursors),), on_error="ignore")
            except Exception as e:
                if self.status != "running":
                    return
                logger.debug("forward_logging: %s", e)
                got = {}
            for addr, (seq, records) in got.items():
                if seq:
                    cursors[addr] = seq
                for d in records:
                    self._dm_emit(d, rules)
            time.sleep(FORWARD_LOGGING_INTERVAL)

    @staticmethod
    def _dm_emit(d: dict, rules: dict):
        name = d.get("name") or "root"
        for prefix, level in rules.items():
            if (prefix is None or name == prefix or name.startswith(prefix + ".")) and d.get("levelno", 0) >= level:
                record = logging.makeLogRecord(d)
                logging.getLogger(None if name == "root" else name).handle(record)
                return
