"""Dask graphs to rdask tasks, materialised on the client.

The graph (a Mapping, HighLevelGraph or expression) is converted to dask's
task spec (`convert_legacy_graph`); each node is pickled with the keys of
its dependencies and called on the worker with their values. Dask's
`order` gives the priorities.
"""

from __future__ import annotations

from collections.abc import Mapping

from dask._task_spec import Alias, DataNode, convert_legacy_graph
from dask.order import order as dask_order

from .keys import key_str
from .serialize import PayloadPickler

NODE, DATA = 2, 3
# dask.order costs about 40 µs per task; past this size the scheduler's own
# b-level order (critical path first, then submission order) is used instead.
ORDER_LIMIT = 20_000


def graph_to_tasks(dsk, wanted: list, held: set, priority: int = 0, retries: int = 0, batch: int = 8192):
    """(number of tasks, iterator over lists of task tuples for
    `_rdask.Client.submit`). The lists come in dependency order (each depends
    only on itself and earlier ones) and are pickled lazily, so the caller
    can submit the first while later ones are still being prepared. `held`
    are keys this client already holds (persisted futures): nodes that only
    point at them are not sent again."""
    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    dsk = convert_legacy_graph(dict(dsk))
    # A persisted collection maps each key to its own future: an alias of
    # itself. Those keys already live in the cluster.
    existing = {k for k, node in dsk.items() if isinstance(node, Alias) and node.target == k}
    for k in existing:
        del dsk[k]
    missing = [k for k in wanted if k not in dsk and key_str(k) not in held]
    if missing:
        raise KeyError(f"keys not in the graph and not held by this client: {missing[:5]}")
    try:
        prio = dask_order(dsk) if 1 < len(dsk) <= ORDER_LIMIT else {}
    except Exception:  # ordering is an optimisation only
        prio = {}
    order = list(dsk) if len(dsk) <= batch else _topological(dsk)
    wanted_s = {key_str(k) for k in wanted}

    def batches():
        dumps_payload = PayloadPickler()
        tasks = []
        for k in order:
            node = dsk[k]
            deps = list(node.dependencies)
            skey = key_str(k)
            if isinstance(node, DataNode):
                payload = dumps_payload((DATA, node.value))
            else:
                payload = dumps_payload((NODE, node, deps))
            tasks.append((skey, [key_str(d) for d in deps], payload, priority, prio.get(k), skey in wanted_s, retries))
            if len(tasks) >= batch:
                yield tasks
                tasks = []
        if tasks:
            yield tasks

    return len(dsk), batches()


def _topological(dsk: dict) -> list:
    """Keys of `dsk`, dependencies first (Kahn); dependencies outside the
    graph (held keys) count as done. Keys on a cycle go last, as they are:
    the scheduler rejects the cycle with its name."""
    indegree = {}
    dependents: dict = {}
    ready = []
    for k, node in dsk.items():
        n = 0
        for d in node.dependencies:
            if d in dsk:
                n += 1
                dependents.setdefault(d, []).append(k)
        indegree[k] = n
        if n == 0:
            ready.append(k)
    out = []
    while ready:
        k = ready.pop()
        out.append(k)
        for x in dependents.get(k, ()):
            indegree[x] -= 1
            if indegree[x] == 0:
                ready.append(x)
    if len(out) < len(dsk):
        placed = set(out)
        out.extend(k for k in dsk if k not in placed)
    return out
