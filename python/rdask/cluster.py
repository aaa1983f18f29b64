"""`LocalCluster`: a scheduler in this process (a Rust thread) and worker
processes, each under a nanny."""

from __future__ import annotations

import os
import threading

from . import _rdask
from .config import memory_thresholds, parse_memory_limit, thresholds_tuple, total_memory
from .nanny import Nanny


class LocalCluster:
    def __init__(self, n_workers: int | None = None, threads_per_worker: int | None = None,
                 processes: bool = True, memory_limit="auto", host: str = "127.0.0.1",
                 scheduler_port: int = 0, token: str | None = None, resources=None,
                 local_directory: str | None = None, silence_logs=True, timeout: float = 60.0,
                 dashboard_address=":8787", security=None, **kwargs):
        if kwargs:
            unknown = set(kwargs) - {"asynchronous", "loop", "protocol", "worker_class", "interface"}
            if unknown:
                raise TypeError(f"unexpected LocalCluster arguments: {sorted(unknown)}")
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
        self.protocol = "tls" if self.security else "tcp"
        if kwargs.get("protocol") not in (None, "tcp", "tcp://", "tls", "tls://"):
            raise ValueError(f"LocalCluster(protocol={kwargs['protocol']!r}) is not supported: tcp or tls")
        if kwargs.get("protocol", "").startswith("tls") and not self.security:
            raise ValueError("LocalCluster(protocol='tls') needs security=rdask.Security(...) or security=True")
        if self.security:
            self.security.apply("scheduler")
        self.scheduler = _rdask.Scheduler(host, scheduler_port, token, dashboard_address=dashboard_address,
                                          address=f"{self.protocol}://{host}:{scheduler_port}")
        self.scheduler_address = self.scheduler.address
        self.workers: dict[str, Nanny | threading.Thread] = {}
        self._next = 0
        self._closed = False
        self._lock = threading.Lock()
        self._probe = None
        self.scale(n_workers)

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
                      protocol=self.protocol).start()
        else:
            from .worker import execute
            from .serialize import dumps, loads

            w = threading.Thread(
                target=_rdask.run_worker,
                args=(self.scheduler_address, execute, dumps, loads, name),
                kwargs=dict(nthreads=self.threads_per_worker, memory_limit=self.memory_limit,
                            resources=self.resources, listen=f"{self.protocol}://{self.host}:0", token=self.token,
                            memory_thresholds=thresholds_tuple(self.memory_thresholds),
                            local_directory=self.local_directory),
                name=f"rdask-worker-{name}", daemon=True)
            w.start()
        self.workers[name] = w

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
                for name in sorted(self.workers, key=int)[n:]:
                    self.workers.pop(name).stop()
        self.wait_for_workers(n)

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

    @property
    def dashboard_link(self) -> str | None:
        """`http://host:port/status`, or None when the dashboard is off."""
        return self.scheduler.dashboard_link

    def close(self, timeout=None):
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
