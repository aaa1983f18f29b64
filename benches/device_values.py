"""Device values on a local cluster (issue 12): a device value moved between
two workers against the same bytes as a host (NumPy) value, and a graph whose
device values are 3x the device memory limit (time, bytes moved to host and
back, and the answer checked).

    python benches/device_values.py --array cupy        # on a GPU (CuPy)
    python benches/device_values.py --array standin     # anywhere: host memory
                                                        # behind the device path

Figures are printed and written to --out (JSON). With `standin` the "device"
is host memory: the figures measure rdask's device path (serialiser, device
tier, copies), not a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

MB = 1 << 20


def make(i, n, kind):
    if kind == "cupy":
        import cupy

        return cupy.full(n, float(i))
    if kind == "standin":
        from rdask.testing import StandInArray

        return StandInArray(np.full(n, float(i)))
    return np.full(n, float(i))


def first(x):
    a = getattr(x, "array", x)
    return float(a[0])


def total(*xs):
    return sum(float(getattr(x, "array", x).sum()) for x in xs)


def move(client, workers, size_mib, kind, repeat):
    """Seconds to fetch a value of `size_mib` made on worker 0 to worker 1."""
    import rdask

    a, b = workers
    n = size_mib * MB // 8
    times = []
    # One unmeasured move first: the processes' first large allocations
    # (fresh pages) are not what a move costs in a running cluster.
    for r in range(-1, repeat):
        x = client.submit(make, r, n, kind, workers=[a], pure=False)
        rdask.wait(x)
        t = time.perf_counter()
        assert client.submit(first, x, workers=[b], pure=False).result() == float(r)
        if r >= 0:
            times.append(time.perf_counter() - t)
        del x
    return min(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--array", choices=["cupy", "standin"], default="standin")
    p.add_argument("--move-mib", type=int, default=256)
    p.add_argument("--limit-mib", type=int, default=64)
    p.add_argument("--value-mib", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench-results/device-values.json")
    a = p.parse_args(argv)
    if a.array == "standin":
        os.environ["RDASK_DEVICE"] = "standin"
    import rdask
    from rdask import Client, LocalCluster

    result = {"array": a.array, "host": platform.node(), "limit_mib": a.limit_mib}
    # Moves with device memory counted but no limit (nothing spills).
    # Two workers of one node: the device value goes by IPC (the default),
    # then, in a cluster with IPC off, in staging chunks as between nodes;
    # over UCX (where it works here) as device frames, and staged again.
    os.environ["RDASK_DEVICE_MEMORY_LIMIT"] = "0"
    result["move"] = {"mib": a.move_mib}
    ways = [("ipc", "tcp", "1", "1"), ("staged", "tcp", "0", "0")]
    if rdask._rdask.ucx_status()[0]:
        ways += [("ucx_direct", "ucx", "0", "1"), ("ucx_staged", "ucx", "0", "0")]
    for how, protocol, ipc, direct in ways:
        os.environ["RDASK_DEVICE_IPC"] = ipc
        os.environ["RDASK_DEVICE_DIRECT"] = direct
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, protocol=protocol) as cluster, \
                Client(cluster) as client:
            workers = sorted(client.scheduler_info()["workers"])
            dev = move(client, workers, a.move_mib, a.array, a.repeat)
            result["move"][f"device_{how}_s"] = dev
            print(f"move {a.move_mib} MiB worker->worker: device value ({how}) {dev:.3f} s ({a.move_mib * MB / dev / 1e6:.0f} MB/s)")
            if how in ("ipc", "ucx_direct"):
                host = move(client, workers, a.move_mib, "numpy", a.repeat)
                result["move"][f"host_{protocol}_s"] = host
                print(f"move {a.move_mib} MiB worker->worker: host value over {protocol} {host:.3f} s ({a.move_mib * MB / host / 1e6:.0f} MB/s)")
    os.environ.pop("RDASK_DEVICE_IPC")
    os.environ.pop("RDASK_DEVICE_DIRECT")

    limit = a.limit_mib * MB
    os.environ["RDASK_DEVICE_MEMORY_LIMIT"] = str(limit)
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster) as client:
        workers = sorted(client.scheduler_info()["workers"])
        count = 3 * a.limit_mib // a.value_mib
        n = a.value_mib * MB // 8
        t = time.perf_counter()
        parts = client.map(make, range(count), n=n, kind=a.array, workers=[workers[0]], pure=False)
        sums = client.map(total, *[parts[i::8] for i in range(8)], workers=[workers[0]], pure=False)
        got = sum(client.gather(sums))
        took = time.perf_counter() - t
        want = sum(float(i) * n for i in range(count))
        time.sleep(1.5)  # a heartbeat with the last figures
        w = client.scheduler_info()["workers"][workers[0]]
        result["spill"] = {"values": count, "value_mib": a.value_mib, "seconds": took, "correct": got == want,
                           "to_host_bytes": w["device_spilled_total_bytes"],
                           "back_bytes": w["device_unspilled_total_bytes"]}
        print(f"spill: {count} x {a.value_mib} MiB device values under a {a.limit_mib} MiB limit in {took:.2f} s, "
              f"answer {'right' if got == want else 'WRONG'}; {w['device_spilled_total_bytes'] / MB:.0f} MiB moved to host, "
              f"{w['device_unspilled_total_bytes'] / MB:.0f} MiB back")
        del parts, sums
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if result["spill"]["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
