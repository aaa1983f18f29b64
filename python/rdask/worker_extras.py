"""Worker-side helpers of `Client.run`, `upload_file`, `get_worker_logs`,
`forward_logging`, `get_versions` and `restart`: plain functions that run in
a worker process (as the function of a pinned task, or when the worker
starts). Kept apart from `rdask.worker` so the task executor stays small."""

from __future__ import annotations

import atexit
import collections
import importlib
import itertools
import logging
import os
import pkgutil
import platform
import shutil
import signal
import struct
import sys
import tempfile
import threading

# Environment variable naming a folder of uploaded files (`Client.upload_file`)
# that a worker puts on its `sys.path` when it starts. A LocalCluster gives
# every worker it starts (and restarts) the same folder.
UPLOAD_DIR_ENV = "RDASK_UPLOAD_DIR"
# Importable archives that go on sys.path themselves.
ARCHIVES = (".zip", ".egg", ".pyz", ".whl")

LOG_LENGTH = 10_000
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


# ---------------------------------------------------------------- logs
class LogBuffer(logging.Handler):
    """The last LOG_LENGTH records logged in this process (distributed's
    `distributed.admin.log-length`), each with a sequence number so a reader
    can ask for what came after the last one it saw."""

    def __init__(self, length: int = LOG_LENGTH):
        super().__init__(logging.NOTSET)
        self.records: collections.deque = collections.deque(maxlen=length)
        self._seq = itertools.count(1)
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord):
        try:
            formatted = self.format(record)
            message = record.getMessage()
        except Exception:
            return
        self.records.append((next(self._seq), record, message, formatted))

    @property
    def last_seq(self) -> int:
        return self.records[-1][0] if self.records else 0


_buffer: LogBuffer | None = None
_buffer_lock = threading.Lock()


def install_log_buffer() -> LogBuffer:
    """Puts the ring buffer on the root logger (once per process)."""
    global _buffer
    with _buffer_lock:
        if _buffer is None:
            _buffer = LogBuffer()
            logging.getLogger().addHandler(_buffer)
        return _buffer


def read_logs(n: int | None = None) -> list:
    """[(level, formatted message), ...], oldest first; the last `n`."""
    records = list(install_log_buffer().records)
    if n is not None:
        records = records[-n:] if n > 0 else []
    return [(rec.levelname, formatted) for _, rec, _, formatted in records]


def log_cursor() -> int:
    return install_log_buffer().last_seq


_RECORD_FIELDS = ("name", "levelno", "levelname", "pathname", "filename", "module", "lineno", "funcName",
                  "created", "msecs", "relativeCreated", "thread", "threadName", "process", "processName",
                  "exc_text", "stack_info")


def logs_since(seq: int, limit: int = 1000) -> tuple[int, list]:
    """(last sequence number, [record attributes as a dict, ...]) of the
    records after `seq`: what `forward_logging` re-logs on the client."""
    buf = install_log_buffer()
    out = []
    for s, rec, message, _ in list(buf.records):
        if s <= seq:
            continue
        d = {f: getattr(rec, f, None) for f in _RECORD_FIELDS}
        if rec.exc_info and not d["exc_text"]:
            d["exc_text"] = logging.Formatter().formatException(rec.exc_info)
        d["msg"], d["args"] = message, None
        d["worker"] = _worker_name()
        out.append(d)
        seq = s
        if len(out) >= limit:
            break
    return max(seq, 0), out


def _worker_name():
    from . import worker

    w = worker._worker
    return None if w is None else w.name


# ---------------------------------------------------------------- uploads
_own_upload_dir: str | None = None


def upload_dir() -> str:
    """The folder uploaded files go to: `$RDASK_UPLOAD_DIR` (shared by the
    workers of a LocalCluster) or one of this process's own, removed when it
    exits."""
    global _own_upload_dir
    shared = os.environ.get(UPLOAD_DIR_ENV)
    if shared:
        os.makedirs(shared, exist_ok=True)
        return shared
    if _own_upload_dir is None:
        from . import worker

        w = worker._worker
        base = w.local_directory if w is not None and w.local_directory else None
        if base:
            os.makedirs(base, exist_ok=True)
        _own_upload_dir = tempfile.mkdtemp(prefix="rdask-uploads-", dir=base)
        atexit.register(shutil.rmtree, _own_upload_dir, True)
    return _own_upload_dir


def activate_uploads(directory: str | None = None) -> None:
    """Makes what was uploaded importable: the folder (for .py files) and
    each archive in it go on sys.path. Called when a worker starts."""
    directory = directory or os.environ.get(UPLOAD_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return
    _on_path(directory)
    for name in sorted(os.listdir(directory)):
        if name.endswith(ARCHIVES):
            _on_path(os.path.join(directory, name))
    importlib.invalidate_caches()


def _on_path(path: str):
    if path not in sys.path:
        sys.path.insert(0, path)


def write_atomic(path: str, data: bytes):
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def install_upload(filename: str, data: bytes | None, load: str = "reload") -> list:
    """Writes an uploaded file into this worker's upload folder and makes it
    importable. load: "reload" imports (again, if imported before) the
    modules in it, as distributed's `upload_file(load=True)`; "import"
    imports those not imported yet; "none" only puts it on the path.
    Returns the names of the modules it holds."""
    d = upload_dir()
    path = os.path.join(d, filename)
    if data is not None:
        write_atomic(path, data)
    name, ext = os.path.splitext(filename)
    if ext == ".py":
        _on_path(d)
        try:
            from importlib.util import cache_from_source

            os.remove(cache_from_source(path))  # no stale .pyc of an older upload
        except OSError:
            pass
        names = [name]
    elif ext in ARCHIVES:
        _on_path(path)
        names = [m.name for m in pkgutil.iter_modules([path])]
    else:
        names = []
    importlib.invalidate_caches()
    if load != "none":
        for mod in names:
            if load == "reload" and mod in sys.modules:
                importlib.reload(sys.modules[mod])
            else:
                importlib.import_module(mod)
    return names


# ---------------------------------------------------------------- versions
def host_info() -> dict:
    u = platform.uname()
    return {
        "python": "%d.%d.%d.%s.%s" % sys.version_info,
        "python-bits": struct.calcsize("P") * 8,
        "OS": u.system,
        "OS-release": u.release,
        "machine": u.machine,
        "processor": u.processor,
        "byteorder": sys.byteorder,
        "LC_ALL": os.environ.get("LC_ALL", "None"),
        "LANG": os.environ.get("LANG", "None"),
    }


PACKAGES = ("rdask", "dask", "cloudpickle", "numpy", "pandas", "toolz")


def package_version(name: str) -> str | None:
    """`module.__version__` (what distributed reads), else the installed
    distribution's version; None when it is not installed."""
    mod = sys.modules.get(name)
    if mod is None:
        try:
            mod = importlib.import_module(name)
        except Exception:
            mod = None
    v = getattr(mod, "__version__", None) if mod is not None else None
    if v is None and mod is not None:
        try:
            from importlib.metadata import version

            v = version(name)
        except Exception:
            v = None
    return None if v is None else str(v)


def versions(packages=None) -> dict:
    """{"host": {...}, "packages": {"python": ..., "rdask": ..., ...}} of this process."""
    pk = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in tuple(PACKAGES) + tuple(packages or ()):
        pk[name] = package_version(name)
    return {"host": host_info(), "packages": pk}


# ---------------------------------------------------------------- leaving
def leave_soon(restart: bool = False, delay: float = 0.1) -> int:
    """Makes this worker process leave cleanly (as on SIGTERM) shortly after
    this task returned. With restart=True it exits with EXIT_RESTART, which
    tells its nanny to start it again. Returns this process's id."""
    from . import worker

    if worker._worker is None or threading.main_thread() is threading.current_thread():
        raise RuntimeError("only a worker process started by rdask can leave this way")
    if restart:
        worker.request_restart()
    pid = os.getpid()
    threading.Timer(delay, os.kill, (pid, signal.SIGTERM)).start()
    return pid


def on_worker_start():
    """Called by `rdask.worker.run` before the worker joins: captures the
    process's Python log records, activates uploaded files and sets up the
    worker plugins of `$RDASK_PLUGIN_DIR` (rdask.plugins)."""
    install_log_buffer()
    try:
        activate_uploads()
    except Exception as e:  # never keeps a worker from starting
        logging.getLogger("rdask.worker").warning("could not activate uploaded files: %s", e)
    if os.environ.get("RDASK_PLUGIN_DIR"):
        try:
            from .plugins import activate_plugins

            activate_plugins()
        except Exception as e:
            logging.getLogger("rdask.worker").warning("could not set up worker plugins: %s", e)
