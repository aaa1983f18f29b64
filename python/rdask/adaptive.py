"""Adaptive scaling of a LocalCluster (`cluster.adapt(minimum=, maximum=)`),
as Dask's adaptive mode: more workers while tasks wait, fewer when workers
stay idle."""

from __future__ import annotations

import collections
import logging
import math
import threading
import time

from dask.utils import parse_timedelta

logger = logging.getLogger("rdask.adaptive")


class Adaptive:
    """Checks the scheduler every `interval` and

    - starts workers when tasks wait: as many as it takes to give every task
      the scheduler has queued or assigned a thread (``ceil(tasks /
      threads_per_worker)``), at most `maximum`;
    - stops a worker that was idle (no task) and held no value for
      `wait_count` checks in a row, never going below `minimum`. A worker
      that holds values is kept (they would be lost and recomputed): release
      futures you do not need for the cluster to shrink. Above `maximum`
      (after ``adapt(maximum=)`` was lowered) the least busy workers go at once.

    `stop()` ends it; the workers stay as they are. Dask's `target_duration`
    and `worker_key` are accepted; the policy above does not use them (rdask
    has no task duration estimates on the client side).
    """

    def __init__(self, cluster, minimum: int = 0, maximum: float = math.inf, interval="1s", wait_count: int = 3,
                 target_duration="5s", worker_key=None, **kwargs):
        if minimum < 0 or maximum < minimum:
            raise ValueError(f"adapt(minimum={minimum}, maximum={maximum}): need 0 <= minimum <= maximum")
        self.cluster = cluster
        self.minimum = int(minimum)
        self.maximum = maximum
        self.interval = parse_timedelta(interval, default="s")
        self.wait_count = max(1, int(wait_count))
        self.target_duration = parse_timedelta(target_duration, default="s")
        # (time, {"status": "up"/"down", ...}) of each decision, as Dask's `Adaptive.log`.
        self.log: collections.deque = collections.deque(maxlen=1000)
        self._idle: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rdask-adaptive", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ policy
    def recommendations(self, info: dict) -> dict:
        """What to do now: {"status": "up", "n": N}, {"status": "down",
        "workers": [addresses]} or {"status": "same"}."""
        workers = info["workers"]
        current = len(self.cluster.workers)
        tpw = max(1, int(getattr(self.cluster, "threads_per_worker", 1) or 1))
        demand = int(info.get("ready", 0)) + sum(int(w["processing"]) for w in workers)
        desired = min(self.maximum, max(self.minimum, math.ceil(demand / tpw)))
        desired = int(desired)
        # idle counters: idle and empty, check after check
        seen = set()
        for w in workers:
            a = w["address"]
            seen.add(a)
            if w["processing"] == 0 and w.get("stored_values", 0) == 0:
                self._idle[a] = self._idle.get(a, 0) + 1
            else:
                self._idle[a] = 0
        for a in list(self._idle):
            if a not in seen:
                del self._idle[a]
        if desired > current:
            return {"status": "up", "n": desired}
        if current > self.maximum:
            # over the maximum: the least busy first, now
            order = sorted(workers, key=lambda w: (w["processing"], w.get("stored_values", 0), -w["id"]))
            return {"status": "down", "workers": [w["address"] for w in order[: current - int(self.maximum)]]}
        if desired < current:
            floor = max(self.minimum, desired)
            ripe = [w["address"] for w in sorted(workers, key=lambda w: -w["id"])
                    if self._idle.get(w["address"], 0) >= self.wait_count]
            ripe = ripe[: max(0, current - floor)]
            if ripe:
                return {"status": "down", "workers": ripe}
        return {"status": "same"}

    def adapt(self):
        """One check and what it leads to."""
        info = self.cluster._client().cluster_info()
        rec = self.recommendations(info)
        if rec["status"] == "up":
            self.log.append((time.time(), rec))
            self.cluster._event("INFO", f"adaptive: scaling up to {rec['n']} workers "
                                        f"({info.get('ready', 0)} ready, "
                                        f"{sum(w['processing'] for w in info['workers'])} processing)")
            self.cluster.scale(rec["n"])
            self._idle.clear()
        elif rec["status"] == "down":
            self.log.append((time.time(), rec))
            self.cluster._event("INFO", f"adaptive: stopping idle workers {rec['workers']}")
            self.cluster.scale_down(rec["workers"])
            for a in rec["workers"]:
                self._idle.pop(a, None)

    def _loop(self):
        while not self._stop.wait(self.interval):
            if getattr(self.cluster, "_closed", False):
                return
            try:
                self.adapt()
            except Exception as e:
                if getattr(self.cluster, "_closed", False) or self._stop.is_set():
                    return
                logger.warning("adaptive scaling: %s", e)

    def stop(self):
        """Stops adapting (the workers stay as they are)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 30)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def __repr__(self):
        return f"<Adaptive minimum={self.minimum} maximum={self.maximum} interval={self.interval}s>"
