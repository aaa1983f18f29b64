"""This machine's topology and the worker layouts the launchers make from
it (the Rust side reads hwloc and plans; see docs/architecture.md).

    rdask topology                     # the machine, and the layout of rdask-worker --nworkers auto
    rdask topology --nworkers 4 --nthreads 2
    rdask topology --synthetic "pack:2 numa:2 core:16 pu:2" --nworkers auto
"""

from __future__ import annotations

import json

from . import _rdask


def read(synthetic: str | None = None, xml: str | None = None) -> dict:
    """This machine (the CPUs this process may use), or an hwloc synthetic
    description or XML file: packages, NUMA nodes, cores, GPUs."""
    return json.loads(_rdask.read_topology(synthetic=synthetic, xml=xml))


def describe(topology: dict) -> str:
    return _rdask.describe_topology(json.dumps(topology))


def plan(topology: dict, nworkers: int | None = None, nthreads: int | None = None,
         memory_limit: int | None = None, fallback_memory: int = 0, bind: bool = True,
         devices: list | None = None) -> list[dict]:
    """Worker specs: one per core (`nworkers=None`) or `nworkers` spread over
    the cores; with `devices` ([(id as in CUDA_VISIBLE_DEVICES, gpu dict)]),
    one per GPU. `memory_limit=None` splits each NUMA node's memory among
    its workers (`fallback_memory` when the topology does not know it)."""
    flags = {"nworkers": nworkers, "nthreads": nthreads, "memory_limit": memory_limit,
             "fallback_memory": int(fallback_memory), "bind": bool(bind)}
    out = _rdask.plan_workers(json.dumps(topology), json.dumps(flags),
                              None if devices is None else json.dumps(devices))
    return json.loads(out)


def cpu_list(cpus) -> str:
    """`0-3,8`, as taskset and /proc/PID/status write it."""
    cpus = sorted(set(cpus))
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpu_list(text: str) -> list[int]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def describe_layout(specs: list[dict]) -> str:
    lines = []
    for s in specs:
        cpus = cpu_list(s["cpus"]) if s["cpus"] else "unbound"
        numa = "-" if s["numa"] is None else s["numa"]
        mem = "no limit" if not s["memory_limit"] else f"{s['memory_limit'] / 2**30:.2f} GiB"
        line = f"  worker {s['index']:>3}: {s['nthreads']} thread(s), CPUs {cpus}, NUMA node {numa}, memory {mem}"
        if s.get("gpu"):
            g = s["gpu"]
            line += f", GPU {g['index']} ({g['name']}), CUDA_VISIBLE_DEVICES={g['visible_devices']}"
        lines.append(line)
    return "\n".join(lines)
