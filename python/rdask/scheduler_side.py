"""The scheduler's Python side. The scheduler is Rust, but `rdask-scheduler`
and `LocalCluster` run it inside a Python process; this object lives there
and serves what needs Python: `Client.run_on_scheduler` and scheduler
plugins (`SchedulerPlugin`: `start`, `close`, `add_worker`,
`remove_worker`, `add_client`, `remove_client`). The Rust reactor hands it
calls and membership events on a thread of its own (one at a time)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import pickle

import cloudpickle

from .serialize import dumps_error

logger = logging.getLogger("rdask.scheduler")


class WorkerRecord:
    """What a plugin's `scheduler.workers[address]` holds."""

    def __init__(self, address: str):
        self.address = address

    def __repr__(self):
        return f"<WorkerState {self.address!r}>"


class SchedulerState:
    """The `scheduler` object plugins and `run_on_scheduler(dask_scheduler=)`
    get: the scheduler's address and id, its workers and clients (as the
    Python side has seen them join), and the plugins."""

    def __init__(self):
        self.address = ""
        self.id = ""
        self.workers: dict[str, WorkerRecord] = {}
        self.clients: set[str] = set()
        self.plugins: dict = {}

    def __repr__(self):
        return f"<rdask Scheduler (Python side) {self.address!r}, {len(self.workers)} workers>"


def _call(fn, *args, **kwargs):
    out = fn(*args, **kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(_awaited(out))
    return out


async def _awaited(aw):
    return await aw


def _wants(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class SchedulerSide:
    def __init__(self):
        self.state = SchedulerState()

    def _hook(self, hook: str, **kwargs):
        for name, plugin in list(self.state.plugins.items()):
            fn = getattr(plugin, hook, None)
            if callable(fn):
                try:
                    _call(fn, **kwargs)
                except Exception:
                    logger.exception("scheduler plugin %r failed in %s", name, hook)

    def __call__(self, event: str, client: int, request_id: int, name: str, payload: bytes):
        s = self.state
        if event == "worker_added":
            s.workers[name] = WorkerRecord(name)
            self._hook("add_worker", scheduler=s, worker=name)
            return None
        if event == "worker_removed":
            s.workers.pop(name, None)
            self._hook("remove_worker", scheduler=s, worker=name)
            return None
        if event == "client_added":
            s.clients.add(f"client-{client}")
            self._hook("add_client", scheduler=s, client=f"client-{client}")
            return None
        if event == "client_removed":
            s.clients.discard(f"client-{client}")
            self._hook("remove_client", scheduler=s, client=f"client-{client}")
            return None
        try:
            if event == "run":
                fn, args, kwargs = cloudpickle.loads(payload)
                if _wants(fn, "dask_scheduler"):
                    kwargs = {**kwargs, "dask_scheduler": s}
                return True, "", cloudpickle.dumps(_call(fn, *args, **kwargs))
            if event == "register_plugin":
                plugin, idempotent = cloudpickle.loads(payload)
                if name in s.plugins and idempotent:
                    return True, "", None
                old = s.plugins.pop(name, None)
                if old is not None and callable(getattr(old, "close", None)):
                    _call(old.close)
                s.plugins[name] = plugin
                if callable(getattr(plugin, "start", None)):
                    _call(plugin.start, s)
                return True, "", None
            if event == "unregister_plugin":
                plugin = s.plugins.pop(name, None)
                if plugin is None:
                    return False, f"Could not find plugin {name!r} among the current scheduler plugins", None
                if callable(getattr(plugin, "close", None)):
                    _call(plugin.close)
                return True, "", None
            return False, f"unknown scheduler call {event!r}", None
        except Exception as e:
            return False, f"{type(e).__name__}: {e}", dumps_error(e)

    @property
    def wants_transitions(self) -> bool:
        """Whether a plugin has a `transition` hook (the scheduler then sends
        tasks that finish or fail)."""
        from .plugins import SchedulerPlugin

        def overridden(p):
            fn = getattr(type(p), "transition", None)
            return callable(fn) and fn is not SchedulerPlugin.transition

        return any(overridden(p) for p in self.state.plugins.values())

    def transitions(self, items):
        """Tasks that finished or failed: `transition(key, start, finish)`."""
        for name, plugin in list(self.state.plugins.items()):
            fn = getattr(plugin, "transition", None)
            if not callable(fn):
                continue
            try:
                for key, start, finish in items:
                    fn(key, start, finish)
            except Exception:
                logger.exception("scheduler plugin %r failed in transition", name)

    def close(self):
        """The scheduler stops: plugins close."""
        for name in list(self.state.plugins):
            plugin = self.state.plugins.pop(name)
            if callable(getattr(plugin, "close", None)):
                try:
                    _call(plugin.close)
                except Exception:
                    logger.exception("scheduler plugin %r failed to close", name)
