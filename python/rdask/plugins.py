"""Plugins as in distributed: `WorkerPlugin` (setup/teardown/transition on
every worker), `PipInstall`, `UploadFile`, and the base classes of the kinds
rdask cannot run (`SchedulerPlugin`, `NannyPlugin`), which
`Client.register_plugin` refuses with the reason.

How a worker plugin reaches the workers (`Client.register_plugin`):

- the workers connected now run `setup(worker)` at once, as a task pinned to
  each (`Client.run`);
- a `LocalCluster` keeps every plugin registered through it (pickled with
  cloudpickle) in a folder of its own, `$RDASK_PLUGIN_DIR` in its workers'
  environment; each worker process it starts (`scale`, a nanny restart,
  `Client.restart`) sets them up when it starts, before it joins the
  scheduler, so before it runs any task;
- other workers (a remote cluster) get the plugins of a client the next
  time that client calls `run` (or anything built on it), as for
  `upload_file`.

The worker-side half (the registry of one worker process) is at the bottom.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import uuid

logger = logging.getLogger("rdask.plugins")

# Environment variable naming the folder of a LocalCluster's plugins.
PLUGIN_DIR_ENV = "RDASK_PLUGIN_DIR"
PLUGIN_EXT = ".plugin"

SCHEDULER_REASON = ("scheduler plugins cannot run in rdask: its scheduler is written in Rust and runs no Python "
                    "code (use a WorkerPlugin, whose hooks run on every worker)")
NANNY_REASON = ("nanny plugins cannot run in rdask: its nannies run no plugin code and are not reachable from the "
                "client (use a WorkerPlugin: its setup runs again in every restarted worker process)")
# Hooks of distributed's SchedulerPlugin: an object with some of these and
# no `setup` is taken for a scheduler plugin.
SCHEDULER_HOOKS = ("start", "close", "before_close", "update_graph", "restart", "transition", "add_worker",
                   "remove_worker", "add_client", "remove_client", "log_event")


# ---------------------------------------------------------------- the classes users write
class WorkerPlugin:
    """Base class of worker plugins, as `distributed.WorkerPlugin`:

    - `setup(worker)` runs on every worker when the plugin is registered and
      on every worker that joins later (see the module's docstring);
    - `teardown(worker)` runs when the plugin is unregistered or replaced,
      and when the worker leaves cleanly (best effort: not when the process
      is killed);
    - `transition(key, start, finish, **kwargs)` is called on the worker
      thread that runs a task, with ("ready", "executing") before it runs and
      ("executing", "memory") or ("executing", "error") after it ran. The
      worker's other transitions (fetching dependencies, releasing values)
      happen in the Rust runtime and are not reported.

    `worker` is what `rdask.get_worker()` returns in a task (`name`,
    `scheduler_address`, `nthreads`, `local_directory`, `plugins`, ...); in
    a setup that runs when a worker process starts, `worker.address` is
    still None (the worker has not joined yet). `setup`/`teardown` may be
    coroutine functions. A `name` attribute names the plugin (default: the
    class name and a random suffix); `idempotent = True` makes registering
    it again under the same name a no-op.
    """

    def setup(self, worker):
        """Runs when the plugin is added to a worker."""

    def teardown(self, worker):
        """Runs when the plugin is removed, or the worker leaves cleanly."""

    def transition(self, key, start, finish, **kwargs):
        """A task of this worker changed state (see the class docstring)."""


class SchedulerPlugin:
    """The hooks of `distributed.diagnostics.plugin.SchedulerPlugin`, for code
    that subclasses it. rdask's scheduler is Rust and runs no Python:
    `Client.register_plugin` refuses these with NotImplementedError."""

    idempotent = False

    def start(self, scheduler):
        pass

    async def before_close(self):
        pass

    async def close(self):
        pass

    def update_graph(self, scheduler, **kwargs):
        pass

    def restart(self, scheduler):
        pass

    def transition(self, key, start, finish, *args, **kwargs):
        pass

    def add_worker(self, scheduler, worker):
        pass

    def remove_worker(self, scheduler, worker, **kwargs):
        pass

    def add_client(self, scheduler, client):
        pass

    def remove_client(self, scheduler, client):
        pass

    def log_event(self, topic, msg):
        pass


class NannyPlugin:
    """The hooks of distributed's NannyPlugin (`setup(nanny)`,
    `teardown(nanny)`, `restart`). rdask's nannies run no plugin code:
    `Client.register_plugin` refuses these with NotImplementedError."""

    restart = False
    idempotent = False

    def setup(self, nanny):
        pass

    def teardown(self, nanny):
        pass


class UploadFile(WorkerPlugin):
    """A worker plugin that makes a .py, .zip, .egg (.pyz, .whl) file
    importable on every worker, as `Client.upload_file` does, and on every
    worker that joins later: `client.register_plugin(UploadFile("mod.py"))`.
    The file is read when the plugin is made. With load=True each worker
    imports it (a module uploaded again is reloaded). Its name is
    "upload_file-<file name>": uploading the same file name again replaces
    the previous one, other files stay."""

    def __init__(self, filepath, load: bool = True):
        path = os.fspath(filepath)
        with open(path, "rb") as f:
            self.data = f.read()
        self.filename = os.path.basename(path)
        self.load = bool(load)
        self.name = f"upload_file-{self.filename}"

    def setup(self, worker):
        from .worker_extras import install_upload

        install_upload(self.filename, self.data, "reload" if self.load else "none")


class PipInstall(WorkerPlugin):
    """A worker plugin that runs `python -m pip install [pip_options]
    packages` with each worker's own interpreter, once per worker process
    (so also in every worker that joins or restarts later), as distributed's
    `PipInstall`: `client.register_plugin(PipInstall(["pkg==1.0"]))`.

    Workers of one machine sharing an environment install one at a time (a
    file lock). A failed install raises RuntimeError with pip's output
    (on the client, for the workers connected at registration; in the log
    of a worker that starts later). `restart_workers=True` restarts each
    worker after it installed the packages (so modules it imported before
    are imported afresh): through its nanny, as `Client.restart` does, and
    only once (the restarted process does not install again);
    `register_plugin` waits until the workers are back. A worker that sets
    the plugin up later (when it starts, or a remote worker that joined
    after the registration) is not restarted.

    The name is "pip-" and a hash of the arguments, and the plugin is
    idempotent: registering the same packages and options again does
    nothing."""

    idempotent = True

    def __init__(self, packages, pip_options=None, restart_workers: bool = False, restart: bool | None = None):
        if isinstance(packages, str):
            packages = [packages]
        self.packages = [str(p) for p in packages]
        if isinstance(pip_options, str):
            pip_options = pip_options.split()
        self.pip_options = [str(o) for o in pip_options or ()]
        # `restart=` is the name older distributed versions used
        self.restart_workers = bool(restart_workers if restart is None else restart)
        token = hashlib.sha1(repr((self.packages, self.pip_options, self.restart_workers)).encode()).hexdigest()
        self.name = f"pip-{token[:16]}"
        self._id = uuid.uuid4().hex

    def setup(self, worker):
        if self._id in _installed_here:
            return
        marker = self._marker(worker)
        if self.restart_workers and os.path.exists(marker):
            # this worker installed them and was restarted since
            _installed_here.add(self._id)
            return
        self._install()
        _installed_here.add(self._id)
        if self.restart_workers and not _starting:
            from . import worker_extras

            with open(marker, "w"):
                pass
            logger.info("worker %s: restarting after pip install %s", worker.name, " ".join(self.packages))
            worker_extras.leave_soon(restart=True, delay=0.5)

    def _install(self):
        cmd = [sys.executable, "-m", "pip", "install", *self.pip_options, *self.packages]
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
        logger.info("pip install: %s", " ".join(cmd[3:]))
        with _machine_lock(f"pip-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}"):
            p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if p.returncode != 0:
            out = (p.stderr or p.stdout or "").strip()
            logger.error("pip install failed with %r", out)
            raise RuntimeError(f"pip install {' '.join(self.packages)} failed (exit code {p.returncode}):\n{out}")
        importlib.invalidate_caches()

    def _marker(self, worker) -> str:
        folder = os.environ.get(PLUGIN_DIR_ENV)
        if not folder or not os.path.isdir(folder):
            folder = tempfile.gettempdir()
        who = hashlib.sha1(f"{worker.scheduler_address}|{worker.name}".encode()).hexdigest()[:12]
        return os.path.join(folder, f".rdask-pip-{self._id}-{who}.done")


# ids of the PipInstall plugins this process installed
_installed_here: set = set()


class _machine_lock:
    """An exclusive lock shared by the processes of this machine (flock on a
    file in the temporary folder); nothing where flock is missing."""

    def __init__(self, name: str):
        self.path = os.path.join(tempfile.gettempdir(), f"rdask-{name}.lock")
        self.f = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()  # releases the lock


# ---------------------------------------------------------------- client side
def _distributed_plugin_module():
    """distributed's plugin module if this process imported it (a plugin
    that subclasses one of its classes means it did)."""
    return sys.modules.get("distributed.diagnostics.plugin")


def _types(name: str, own) -> tuple:
    dist = _distributed_plugin_module()
    other = getattr(dist, name, None) if dist is not None else None
    return (own, other) if isinstance(other, type) else (own,)


def from_distributed(plugin):
    """distributed's own UploadFile and PipInstall call worker internals
    that rdask lacks: they become rdask's."""
    dist = _distributed_plugin_module()
    if dist is None or isinstance(plugin, (UploadFile, PipInstall)):
        return plugin
    upload = getattr(dist, "UploadFile", None)
    if isinstance(upload, type) and isinstance(plugin, upload):
        out = UploadFile.__new__(UploadFile)
        out.filename, out.data = plugin.filename, plugin.data
        out.load = bool(getattr(plugin, "load", True))
        out.name = f"upload_file-{out.filename}"
        return out
    pip = getattr(dist, "PipInstall", None)
    if isinstance(pip, type) and isinstance(plugin, pip):
        inst = getattr(plugin, "_installer", plugin)
        return PipInstall(inst.packages, pip_options=getattr(inst, "pip_options", None),
                          restart_workers=bool(getattr(plugin, "restart_workers", getattr(plugin, "restart", False))))
    return plugin


def is_scheduler_plugin(plugin) -> bool:
    """A scheduler plugin: a SchedulerPlugin (rdask's or distributed's), or
    an object with scheduler hooks and no `setup`."""
    if isinstance(plugin, type) or isinstance(plugin, _types("NannyPlugin", NannyPlugin)):
        return False
    if isinstance(plugin, _types("SchedulerPlugin", SchedulerPlugin)):
        return True
    return not callable(getattr(plugin, "setup", None)) and any(callable(getattr(plugin, h, None)) for h in SCHEDULER_HOOKS)


def check_worker_plugin(plugin) -> None:
    """Raises unless `plugin` is a worker plugin rdask can run."""
    if isinstance(plugin, type):
        raise TypeError("Please provide an instance of a plugin, not a type.")
    if isinstance(plugin, _types("NannyPlugin", NannyPlugin)):
        raise NotImplementedError(NANNY_REASON)
    if isinstance(plugin, _types("SchedulerPlugin", SchedulerPlugin)):
        raise NotImplementedError(SCHEDULER_REASON)
    if isinstance(plugin, _types("WorkerPlugin", WorkerPlugin)) or callable(getattr(plugin, "setup", None)):
        return
    if any(callable(getattr(plugin, h, None)) for h in SCHEDULER_HOOKS):
        raise NotImplementedError(SCHEDULER_REASON)
    raise TypeError(f"{type(plugin).__name__} is not a plugin: a worker plugin has a setup(worker) method "
                    "(subclass rdask.WorkerPlugin)")


def plugin_name(plugin) -> str:
    """As distributed: the plugin's `name` attribute, else the class name
    and a random suffix."""
    name = getattr(plugin, "name", None)
    if name:
        return str(name)
    return f"{type(plugin).__name__}-{uuid.uuid4()}"


def make_record(name: str, plugin, idempotent: bool) -> dict:
    """What travels to workers (and into a LocalCluster's plugin folder):
    the plugin pickled with cloudpickle and the id of this registration."""
    import cloudpickle

    return {"name": name, "id": uuid.uuid4().hex, "seq": time.time_ns(), "idempotent": bool(idempotent),
            "data": cloudpickle.dumps(plugin)}


def _file_of(folder: str, name: str) -> str:
    return os.path.join(folder, hashlib.sha1(name.encode()).hexdigest() + PLUGIN_EXT)


def write_plugin_file(folder: str, record: dict) -> None:
    from .worker_extras import write_atomic

    write_atomic(_file_of(folder, record["name"]), pickle.dumps(record))


def has_plugin_file(folder: str, name: str) -> bool:
    return os.path.exists(_file_of(folder, name))


def remove_plugin_file(folder: str, name: str) -> bool:
    try:
        os.remove(_file_of(folder, name))
        return True
    except FileNotFoundError:
        return False


def read_plugin_files(folder: str) -> list:
    """The records in a plugin folder, in registration order."""
    out = []
    for fname in os.listdir(folder):
        if not fname.endswith(PLUGIN_EXT):
            continue
        try:
            with open(os.path.join(folder, fname), "rb") as f:
                out.append(pickle.load(f))
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            logger.warning("could not read plugin file %s: %s", fname, e)
    return sorted(out, key=lambda r: r["seq"])


# ---------------------------------------------------------------- worker side
_lock = threading.RLock()
_ids: dict = {}  # plugin name -> id of the registration set up here
# True while a worker sets up plugins at start, or those a client gives a
# worker that joined late (`sync_plugins`): PipInstall restarts no worker then.
_starting = False


def _this_worker():
    from . import worker

    w = worker._worker
    if w is None:
        raise RuntimeError("worker plugins need worker processes: this worker is a thread of another process "
                           "(LocalCluster(processes=False)), which has no worker object")
    return w


def _call(method, w):
    result = method(worker=w)
    if inspect.isawaitable(result):
        async def wait():
            return await result

        result = asyncio.run(wait())
    return result


def _teardown(name: str, plugin, w) -> None:
    teardown = getattr(plugin, "teardown", None)
    if callable(teardown):
        _call(teardown, w)


def _update_hook(w) -> None:
    """Points the task executor at the plugins that have a transition hook."""
    from . import worker

    global _transition_hooks
    hooks = []
    for p in w.plugins.values():
        t = getattr(p, "transition", None)
        if callable(t) and getattr(type(p), "transition", None) is not WorkerPlugin.transition:
            hooks.append(t)
    _transition_hooks = tuple(hooks)
    worker._on_transition = _transition if hooks else None


_transition_hooks: tuple = ()


def _transition(key, start, finish):
    for hook in _transition_hooks:
        try:
            hook(key, start, finish)
        except Exception:
            logger.exception("worker plugin transition %s -> %s of %s failed", start, finish, key)


def add_plugin(record: dict) -> dict:
    """Adds a plugin to this worker (the task `register_plugin` pins to each
    worker) and runs its setup; replaces (teardown first) one of the same
    name, unless the record is idempotent. The same registration twice (from
    the plugin folder at start, then from the client) is set up once."""
    from . import worker

    w = _this_worker()
    name = record["name"]
    with _lock:
        if _ids.get(name) == record["id"] or (record["idempotent"] and name in w.plugins):
            return {"status": "OK", "restarting": worker._restart_requested}
        plugin = pickle.loads(record["data"])
        old = w.plugins.pop(name, None)
        _ids.pop(name, None)
        if old is not None:
            try:
                _teardown(name, old, w)
            except Exception:
                logger.exception("worker plugin %s failed to tear down (replaced)", name)
        # as distributed: kept even when its setup fails
        w.plugins[name] = plugin
        _ids[name] = record["id"]
        _update_hook(w)
        setup = getattr(plugin, "setup", None)
        if callable(setup):
            _call(setup, w)
    return {"status": "OK", "restarting": worker._restart_requested}


def sync_plugins(records: list) -> dict:
    """Adds the plugins of a client this worker may not have (a worker that
    joined after they were registered); the first setup error is raised
    after all were tried."""
    global _starting
    first = None
    with _lock:
        # set up as at start: no PipInstall restarts a worker that joins late
        _starting = True
        try:
            for r in records:
                try:
                    add_plugin(r)
                except Exception as e:
                    logger.exception("worker plugin %s failed to set up", r["name"])
                    first = first or e
        finally:
            _starting = False
    if first is not None:
        raise first
    from . import worker

    return {"status": "OK", "restarting": worker._restart_requested}


def remove_plugin(name: str) -> dict:
    """Removes a plugin from this worker and runs its teardown."""
    w = _this_worker()
    with _lock:
        plugin = w.plugins.pop(name, None)
        _ids.pop(name, None)
        _update_hook(w)
        if plugin is None:
            return {"status": "OK", "removed": False}
        _teardown(name, plugin, w)
    return {"status": "OK", "removed": True}


def activate_plugins(folder: str | None = None) -> None:
    """Sets up the plugins of `$RDASK_PLUGIN_DIR` (a LocalCluster's), in
    registration order; called when a worker process starts, before it
    joins. A failing setup is logged and does not keep the worker from
    starting."""
    global _starting
    folder = folder or os.environ.get(PLUGIN_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return
    _starting = True
    try:
        for record in read_plugin_files(folder):
            try:
                add_plugin(record)
            except Exception:
                logger.exception("worker plugin %s failed to set up", record.get("name"))
    finally:
        _starting = False


def teardown_all() -> None:
    """Tears every plugin of this worker down, last registered first (the
    worker is leaving)."""
    from . import worker

    w = worker._worker
    if w is None or not w.plugins:
        return
    with _lock:
        for name in reversed(list(w.plugins)):
            plugin = w.plugins.pop(name)
            _ids.pop(name, None)
            try:
                _teardown(name, plugin, w)
            except BaseException:
                logger.exception("worker plugin %s failed to tear down", name)
        _update_hook(w)
