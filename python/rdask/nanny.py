"""A nanny per worker process: starts `python -m rdask.worker`, and starts it
again if it dies while it should be running (a crash, the OOM killer). It
gives up when the worker could not reach or join its scheduler within the
death timeout (the scheduler is gone), and when the worker dies too often."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from .worker import EXIT_CANNOT_JOIN, EXIT_RESTART

logger = logging.getLogger("rdask.nanny")


class Nanny:
    def __init__(self, scheduler: str, name: str, nthreads: int = 1, memory_limit: int = 0,
                 resources: dict | None = None, token: str | None = None,
                 local_directory: str | None = None, listen_host: str = "127.0.0.1",
                 max_restarts_per_minute: int = 10, quiet: bool = False, death_timeout: float = 30.0,
                 cpus: list | None = None, numa_node: int | None = None, gpu: str | None = None,
                 env: dict | None = None, lifetime: float | None = None, lifetime_restart: bool = False,
                 worker_port: int = 0, memory_thresholds: dict | None = None, security=None,
                 protocol: str | None = None):
        from .config import MEMORY_THRESHOLDS, memory_thresholds as default_thresholds

        self.name = name
        self.cmd = [sys.executable, "-m", "rdask.worker_process", scheduler, "--name", name,
                    "--nthreads", str(nthreads), "--memory-limit", str(int(memory_limit)),
                    "--listen-host", listen_host, "--connect-timeout", str(death_timeout),
                    "--listen-port", str(worker_port)]
        # The worker listens for peers as the scheduler is reached (tcp or
        # tls), with the same TLS identity.
        if protocol:
            self.cmd += ["--protocol", protocol]
        if security is not None:
            self.cmd += security.flags("worker")
        # The worker binds itself at start-up (before its threads exist).
        if cpus:
            self.cmd += ["--cpus", ",".join(map(str, cpus))]
        if numa_node is not None:
            self.cmd += ["--numa-node", str(numa_node)]
        if gpu:
            self.cmd += ["--gpu", gpu]
        if resources:
            self.cmd += ["--resources", " ".join(f"{k}={v}" for k, v in resources.items())]
        if local_directory:
            self.cmd += ["--local-directory", local_directory]
        # Resolved here, once: the worker gets them as flags, and the nanny
        # enforces `terminate` itself (a worker stuck in a task that holds
        # the interpreter cannot be trusted to notice).
        self.thresholds = dict(memory_thresholds or default_thresholds())
        for t in MEMORY_THRESHOLDS:
            v = self.thresholds.get(t)
            self.cmd += [f"--memory-{t}-fraction", "false" if v is None else repr(v)]
        terminate = self.thresholds.get("terminate")
        self.terminate_bytes = int(terminate * memory_limit) if terminate and memory_limit else None
        self.memory_limit = int(memory_limit)
        # Restarts for memory, as Dask reports them.
        self.memory_kills = 0
        # One thread per numeric library in each worker, as dask's nanny
        # does: workers already run tasks in parallel, and idle BLAS threads
        # spin on the cores the other workers need.
        self.env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            self.env.setdefault(var, "1")
        if token:
            self.env["RDASK_TOKEN"] = token
        self.env.update(env or {})
        self.quiet = quiet
        self.max_restarts = max_restarts_per_minute
        self.restarts: list[float] = []
        self.process: subprocess.Popen | None = None
        # Set when the nanny stopped because the worker could not join.
        self.gave_up = False
        # --lifetime: the worker leaves (SIGTERM) after this many seconds,
        # and is started again with --lifetime-restart (Dask's semantics).
        self.lifetime = lifetime
        self.lifetime_restart = lifetime_restart
        self._born = time.monotonic()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Held while the process is replaced (restart) or a dead one handled.
        self._spawn_lock = threading.Lock()

    def start(self):
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name=f"rdask-nanny-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _spawn(self):
        self._born = time.monotonic()
        out = subprocess.DEVNULL if self.quiet else None
        self.process = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=out if self.quiet else None)

    def _watch(self):
        while not self._stopping.is_set():
            p = self.process
            if (self.lifetime is not None and p is not None and p.poll() is None
                    and time.monotonic() - self._born >= self.lifetime):
                print(f"rdask nanny: worker {self.name} reached its lifetime of {self.lifetime:g} s; "
                      + ("restarting it" if self.lifetime_restart else "stopping it"), file=sys.stderr)
                _end(p, 30)
                if not self.lifetime_restart:
                    return
                self._spawn()
                continue
            if self.terminate_bytes and p is not None and p.poll() is None:
                rss = _rss(p.pid)
                if rss > self.terminate_bytes:
                    self.memory_kills += 1
                    msg = (f"worker {self.name} exceeded 95% memory budget" if self.thresholds.get("terminate") == 0.95
                           else f"worker {self.name} exceeded its terminate threshold")
                    logger.warning("%s: process memory %.0f MiB > %.0f MiB of its %.0f MiB limit; restarting it",
                                   msg, rss / 2**20, self.terminate_bytes / 2**20, self.memory_limit / 2**20)
                    print(f"rdask nanny: {msg} (process memory {rss / 2**20:.0f} MiB, limit "
                          f"{self.memory_limit / 2**20:.0f} MiB); restarting it", file=sys.stderr)
                    # Killed, not asked: the worker is out of memory and may
                    # not get to run a handler. The scheduler counts the task
                    # it ran as suspect (KilledWorker after repeated kills).
                    p.kill()
                    p.wait()
            if p is not None and p.poll() is not None and not self._stopping.is_set():
                with self._spawn_lock:
                    if p is not self.process:  # replaced by restart() meanwhile
                        continue
                    if not self._handle_exit(p):
                        return
            self._stopping.wait(0.1)

    def _handle_exit(self, p) -> bool:
        """A worker process ended: starts it again or not; False when the
        nanny should stop watching."""
        code = p.returncode
        if code == EXIT_RESTART:
            logger.info("worker %s asked to be restarted", self.name)
            self._spawn()
            return True
        if code == 0:
            logger.info("worker %s exited cleanly (scheduler gone)", self.name)
            return False
        if code == EXIT_CANNOT_JOIN:
            # Starting it again would wait the same death timeout for
            # the same absent scheduler, forever.
            logger.error("worker %s could not reach its scheduler; not restarting it", self.name)
            print(f"rdask nanny: worker {self.name} could not reach its scheduler; giving up", file=sys.stderr)
            self.gave_up = True
            return False
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > self.max_restarts:
            logger.error("worker %s died %d times within a minute; giving up", self.name, len(self.restarts))
            print(f"rdask nanny: worker {self.name} died {len(self.restarts)} times within a minute; "
                  "not restarting it again", file=sys.stderr)
            return False
        logger.warning("worker %s died (exit code %s); restarting it", self.name, code)
        print(f"rdask nanny: worker {self.name} died (exit code {code}); restarting", file=sys.stderr)
        self._spawn()
        return True

    def restart(self, timeout: float = 5.0) -> None:
        """Replaces the worker process by a new one (`Client.restart`): the
        old one is asked to leave (SIGTERM), killed after `timeout` s."""
        with self._spawn_lock:
            if self._stopping.is_set():
                return
            p = self.process
            if p is not None and p.poll() is None:
                _end(p, timeout)
            self._spawn()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._watch, name=f"rdask-nanny-{self.name}", daemon=True)
            self._thread.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 5.0):
        self._stopping.set()
        p = self.process
        if p is not None and p.poll() is None:
            _end(p, timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)


def _end(p: subprocess.Popen, timeout: float) -> None:
    """Asks the worker to leave (SIGTERM: it tells the scheduler), and kills
    it if it is still there after `timeout` seconds."""
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE")
