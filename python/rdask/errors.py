"""Exceptions rdask raises for things that happen on the cluster rather
than inside a task: they are classes of their own, so `except` works."""

from __future__ import annotations

import re

from ._rdask import AuthenticationError, CommClosedError, RdaskError

__all__ = ["AuthenticationError", "CommClosedError", "KilledWorker", "RdaskError", "scheduler_error"]


class KilledWorker(Exception):
    """The task was running on more workers that died than the scheduler
    allows (`allowed_failures`, 3 as in Dask): it probably kills them (a
    segfault, the OOM killer, `os._exit`). Tasks that were merely queued on a
    dying worker are never blamed, nor are workers that leave on purpose."""

    def __init__(self, task, last_worker=None, allowed_failures=None):
        self.task = task
        self.last_worker = last_worker
        self.allowed_failures = allowed_failures
        super().__init__(task, last_worker, allowed_failures)

    def __str__(self):
        deaths = "" if self.allowed_failures is None else f" {self.allowed_failures + 1}"
        last = f"; the last one was {self.last_worker}" if self.last_worker else ""
        return (f"task {self.task!r} was running on{deaths} workers that died{last}. "
                "It may be crashing its worker (a segfault, running out of memory, os._exit); "
                "the worker logs say more.")


# The scheduler's own failures carry no pickled exception; their message
# starts with the kind (docs/protocol.md, KeyErred).
_KILLED = re.compile(r"running on (\d+) workers that died \(the last was (.*) at (\S+)\)")


def scheduler_error(message: str, task) -> BaseException | None:
    """The exception for a failure the scheduler reported itself, or None
    when the message is not one of those."""
    if message.startswith("KilledWorker:"):
        m = _KILLED.search(message)
        if m is None:
            return KilledWorker(task)
        deaths, name, address = m.groups()
        return KilledWorker(task, f"{name} ({address})", int(deaths) - 1)
    return None
