"""`LocalCluster`: a scheduler in this process (a Rust thread) and worker
processes, each under a nanny."""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid

from . import _rdask
from .config import memory_thresholds, parse_memory_limit, thresholds_tuple, total_memory
from .nanny import Nanny

logger = logging.getLogger("rdask.cluster")


class LocalCluster:
    def __init__(self, n_workers: int | None = None, threads_per_worker: int | None = None,
                 processes: bool = True, memory_limit="auto", host: str = "127.0.0.1",
                 scheduler_port: int = 0, token: str | None = None, resources=None,
                 local_directory: str | None = None, silence_logs=True, timeout: float = 60.0,
                 dashboard_address=":8787", security=None, name: str | None = None, **kwargs):
        if kwargs:
            unknown = set(kwargs) - {"asynchronous", "loop", "protocol", "worker_class", "interface"}
            if unknown:
                raise TypeError(f"unexpected LocalCluster arguments: {sorted(unknown)}")
        # As distributed: a short random name unless one is given.
        self.name = str(name) if name is not None else uuid.uuid4().hex[:8]
        self._log: collections.deque = collections.deque(maxlen=10_000)
        interface = kwargs.get("interface")
        if interface:
            # As distributed: the cluster listens on that interface's address.
            address = _rdask.interface_address(str(interface))
            if address is None:
                raise ValueError(f"LocalCluster(interface={interface!r}): no IPv4 address on that network interface")
            host = address
        cpus = os.cpu_count() or 1
        if n_workers is None and threads_per_worker is None:
            n_workers, threads_per_worker = (cpus, 1) if (processes and cpus <= 4) else ((max(1, cpus // 2), 2) if processes else (1, cpus))
        elif n_workers is None:
            n_workers = max(1, cpus // threads_per_worker)
        elif threads_per_worker is None:
            threads_per_worker = max(1, cpus // max(1, n_workers))
        self.processes = processes
        self.threads_per_worker = int(threads_per_worker)
        self.memory_limit = parse_memory_limit(memory_limit, max(1, n_workers), total_memory())
        # Dask's distributed.worker.memory.{target,spill,pause,terminate},
        # read once here (dask.config.set before creating the cluster works).
        self.memory_thresholds = memory_thresholds()
        self.resources = resources
        self.local_directory = local_directory
        self.token = token
        self.host = host
        self.timeout = timeout
        self.quiet = bool(silence_logs)
        # Dask's default is :8787; a port in use falls back to a free one.
        # security=True: a throw-away CA and certificate, as distributed does.
        if security is True:
            from .security import Security

            security = Security.temporary()
        self.security = security if security and security.has_tls else None
        from .protocols import resolve

        try:
            self.protocol = resolve(kwargs.get("protocol"), self.security)
        except ValueError as e:
            raise ValueError(f"LocalCluster(protocol={kwargs.get('protocol')!r}): {e}") from None
        if self.security:
            self.security.apply("scheduler")
        from .scheduler_side import SchedulerSide

        # Where run_on_scheduler and scheduler plugins run (in this process).
        self._scheduler_side = SchedulerSide()
        self.scheduler = _rdask.Scheduler(host, scheduler_port, token, dashboard_address=dashboard_address,
                                          address=f"{self.protocol}://{host}:{scheduler_port}",
                                          python_side=self._scheduler_side)
        self.scheduler_address = self.scheduler.address
        self._scheduler_side.state.address = self._scheduler_side.state.id = self.scheduler_address
        self.workers: dict[str, Nanny | threading.Thread] = {}
        self._next = 0
        self._closed = False
        self._lock = threading.Lock()
        self._probe = None
        self._py_client = None
        self._adaptive = None
        # Files of Client.upload_file: every worker process this cluster
        # starts (or restarts) puts this folder on its sys.path.
        self._upload_dir = tempfile.mkdtemp(prefix="rdask-uploads-", dir=local_directory if local_directory
                                            and os.path.isdir(local_directory) else None)
        # Worker plugins (Client.register_plugin), pickled: every worker
        # process this cluster starts (or restarts) sets them up at start.
        self._plugin_dir = tempfile.mkdtemp(prefix="rdask-plugins-", dir=local_directory if local_directory
                                            and os.path.isdir(local_directory) else None)
        self._event("INFO", f"scheduler at {self.scheduler_address}"
                    + (f", dashboard at {self.dashboard_link}" if self.dashboard_link else ", no dashboard"))
        try:
            self.scale(n_workers)
        except BaseException:
            self.close()
            raise

    def _event(self, level: str, message: str):
        """A line of the cluster's own log (`get_logs()["Cluster"]`)."""
        self._log.append((level, f"{time.strftime('%Y-%m-%d %H:%M:%S')} - rdask.cluster - {level} - {message}"))
        logger.log(getattr(logging, level, logging.INFO), message)

    def _worker_env(self) -> dict:
        from .plugins import PLUGIN_DIR_ENV
        from .worker_extras import UPLOAD_DIR_ENV

        return {UPLOAD_DIR_ENV: self._upload_dir, PLUGIN_DIR_ENV: self._plugin_dir}

    # ------------------------------------------------------------ workers
    def _client(self):
        if self._probe is None:
            self._probe = _rdask.Client.connect(self.scheduler_address, self.token, 10.0)
        return self._probe

    def _start_worker(self):
        name = str(self._next)
        self._next += 1
        if self.processes:
            w = Nanny(self.scheduler_address, name, self.threads_per_worker, self.memory_limit,
                      self.resources, self.token, self.local_directory, self.host, quiet=False,
                      memory_thresholds=self.memory_thresholds, security=self.security,
                      protocol=self.protocol, env=self._worker_env()).start()
        else:
            from .worker import device_limit_from_env, execute
            from .serialize import dumps, dumps_staged, loads_sized

            w = threading.Thread(
                target=_rdask.run_worker,
                args=(self.scheduler_address, execute, dumps, loads_sized, name),
                kwargs=dict(nthreads=self.threads_per_worker, memory_limit=self.memory_limit,
                            resources=self.resources, listen=f"{self.protocol}://{self.host}:0", token=self.token,
                            memory_thresholds=thresholds_tuple(self.memory_thresholds),
                            local_directory=self.local_directory,
                            device_memory_limit=device_limit_from_env(), dumps_staged=dumps_staged),
                name=f"rdask-worker-{name}", daemon=True)
            w.start()
        self.workers[name] = w
        self._event("INFO", f"started worker {name}")

    def scale(self, n: int):
        """Starts or stops worker processes until there are `n`."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cluster is closed")
            while len(self.workers) < n:
                self._start_worker()
            if len(self.workers) > n:
                if not self.processes:
                    raise NotImplementedError("scaling down is only supported with processes=True")
                for name in sorted(self.workers, key=_name_order)[n:]:
                    self.workers.pop(name).stop()
                    self._event("INFO", f"stopped worker {name}")
        self.wait_for_workers(n)

    def scale_down(self, workers) -> list:
        """Stops these workers (names or addresses) for good: each leaves
        cleanly (its running tasks go elsewhere) and its nanny does not start
        it again. Returns the names stopped."""
        if isinstance(workers, str):
            workers = [workers]
        by_address = {w["address"]: str(w["name"]) for w in self._client().cluster_info()["workers"]}
        names = [by_address.get(str(w), str(w)) for w in workers]
        stopped = []
        with self._lock:
            for name in names:
                w = self.workers.get(name)
                if w is None:
                    continue
                if not isinstance(w, Nanny):
                    raise NotImplementedError("stopping a worker is only supported with processes=True")
                w._stopping.set()  # its nanny starts it no more, even while it leaves
                stopped.append(self.workers.pop(name))
        threads = [threading.Thread(target=w.stop, daemon=True) for w in stopped]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for w in stopped:
            self._event("INFO", f"stopped worker {w.name}")
        return [w.name for w in stopped]

    def _restart_workers(self, timeout: float = 5.0) -> bool:
        """Replaces every worker process by a new one (Client.restart); False
        if the workers are threads of this process (nothing restarted)."""
        with self._lock:
            nannies = list(self.workers.values())
        if not nannies or not all(isinstance(w, Nanny) for w in nannies):
            return False
        threads = [threading.Thread(target=w.restart, args=(timeout,), daemon=True) for w in nannies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._event("INFO", f"restarted {len(nannies)} worker(s)")
        return True

    def wait_for_workers(self, n: int, timeout: float | None = None):
        import time

        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            info = self._client().cluster_info()
            if len(info["workers"]) == n:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(info['workers'])} of {n} workers connected after {timeout} s")
            time.sleep(0.02)

    # ------------------------------------------------------------ user API
    def get_client(self):
        from .client import Client

        return Client(self)

    def _python_client(self):
        """A client of this cluster for the cluster's own requests (logs,
        adaptive scaling); not the default client."""
        with self._lock:
            if self._py_client is None or self._py_client.status != "running":
                from .client import Client

                self._py_client = Client(self, set_as_default=False, timeout=self.timeout)
            return self._py_client

    def get_logs(self, cluster: bool = True, scheduler: bool = True, workers=True) -> dict:
        """Logs as distributed's `Cluster.get_logs`: {"Cluster": [...],
        "Scheduler": [...], worker address: [...]}, each a list of
        (level, message). "Cluster" holds what this object did (workers
        started, stopped, adaptive decisions); "Scheduler" only its address
        and dashboard, as the Rust scheduler logs to stderr with `tracing`;
        a worker's list holds the Python `logging` records of its process
        (see `Client.get_worker_logs`). `workers` may name some workers."""
        out: dict = {}
        if cluster:
            out["Cluster"] = list(self._log)
        if scheduler:
            out["Scheduler"] = [("INFO", f"rdask scheduler (Rust) at {self.scheduler_address}; dashboard "
                                         f"{self.dashboard_link or 'off'}; its own log goes to this process's stderr")]
        if workers:
            out.update(self._python_client().get_worker_logs(workers=None if workers is True else workers))
        return out

    def adapt(self, minimum: int = 0, maximum: float = float("inf"), interval="1s", wait_count: int = 3,
              Adaptive=None, **kwargs):
        """Dask's adaptive mode: a background thread adds workers while tasks
        wait (up to `maximum`) and stops idle ones after `wait_count`
        checks in a row (never below `minimum`). Returns the Adaptive
        object (`.stop()`); calling adapt again replaces it."""
        from .adaptive import Adaptive as DefaultAdaptive

        if self._adaptive is not None:
            self._adaptive.stop()
        cls = Adaptive or DefaultAdaptive
        self._adaptive = cls(self, minimum=minimum, maximum=maximum, interval=interval, wait_count=wait_count,
                             **kwargs)
        return self._adaptive

    @property
    def dashboard_link(self) -> str | None:
        """`http://host:port/status`, or None when the dashboard is off."""
        return self.scheduler.dashboard_link

    def close(self, timeout=None):
        adaptive = getattr(self, "_adaptive", None)
        if adaptive is not None:
            adaptive.stop()
        py_client = getattr(self, "_py_client", None)
        if py_client is not None:
            self._py_client = None
            py_client.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self.workers.values())
            self.workers.clear()
        for w in workers:
            if isinstance(w, Nanny):
                w._stopping.set()
        for w in workers:
            if isinstance(w, Nanny):
                w.stop()
        if self._probe is not None:
            self._probe.close()
        self.scheduler.stop()
        for w in workers:
            if isinstance(w, threading.Thread):
                w.join(timeout=5)
        for folder in (getattr(self, "_upload_dir", None), getattr(self, "_plugin_dir", None)):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _summary(self):
        n = len(self.workers)
        mem = self.memory_limit * n
        return n, n * self.threads_per_worker, mem

    def __repr__(self):
        n, t, mem = self._summary()
        state = "closed" if self._closed else "running"
        return (f"LocalCluster({self.scheduler_address!r}, workers={n}, threads={t}, "
                f"memory={_fmt_bytes(mem)}, processes={self.processes}, status={state}, "
                f"dashboard={self.dashboard_link})")

    def _repr_html_(self):
        n, t, mem = self._summary()
        return cluster_widget("rdask LocalCluster", self.scheduler_address, self.dashboard_link, n, t, mem)


def _name_order(name: str):
    """Worker names in start order: numbers by value, others after."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _fmt_bytes(n: int) -> str:
    if not n:
        return "no limit"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cluster_widget(title: str, address: str, dashboard: str | None, workers: int, threads: int, memory: int,
                   rows: list | None = None) -> str:
    """The notebook view of a cluster or client: a summary and, if given,
    one row per worker (name, threads, memory limit, CPUs)."""
    from html import escape

    link = (f'<a href="{escape(dashboard)}" target="_blank">{escape(dashboard)}</a>' if dashboard
            else "off")
    body = "".join(f"<tr><td>{escape(str(r['name']))}</td><td>{r['nthreads']}</td>"
                   f"<td>{_fmt_bytes(r['memory_limit'])}</td><td>{escape(','.join(map(str, r.get('cpus') or [])) or '-')}</td></tr>"
                   for r in rows or [])
    workers_table = (f"<details><summary>Workers</summary><table><tr><th>name</th><th>threads</th><th>memory</th>"
                     f"<th>CPUs</th></tr>{body}</table></details>") if rows else ""
    return (f'<div class="rdask-widget" style="border:1px solid #ccc;border-radius:6px;padding:.6em 1em;'
            f'display:inline-block"><h3 style="margin:.1em 0 .4em">{escape(title)}</h3><table>'
            f"<tr><th style='text-align:left'>Scheduler</th><td>{escape(address)}</td></tr>"
            f"<tr><th style='text-align:left'>Dashboard</th><td>{link}</td></tr>"
            f"<tr><th style='text-align:left'>Workers</th><td>{workers}</td></tr>"
            f"<tr><th style='text-align:left'>Threads</th><td>{threads}</td></tr>"
            f"<tr><th style='text-align:left'>Memory</th><td>{_fmt_bytes(memory)}</td></tr></table>{workers_table}</div>")
