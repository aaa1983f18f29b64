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
from .serialize import dumps_payload

NODE = 2


def graph_to_tasks(dsk, wanted: list, held: set, priority: int = 0, retries: int = 0) -> list:
    """Task tuples for `_rdask.Client.submit`. `held` are keys this client
    already holds (persisted futures): nodes that only point at them are not
    sent again."""
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
        prio = dask_order(dsk) if len(dsk) > 1 else {}
    except Exception:  # ordering is an optimisation only
        prio = {}
    wanted_s = {key_str(k) for k in wanted}
    tasks = []
    for k, node in dsk.items():
        deps = list(node.dependencies)
        skey = key_str(k)
        payload = dumps_payload((NODE, node, deps)) if not isinstance(node, DataNode) else dumps_payload((3, node.value))
        tasks.append((skey, [key_str(d) for d in deps], payload, priority, prio.get(k), skey in wanted_s, retries))
    return tasks
