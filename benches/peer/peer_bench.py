"""Peer benchmark: the same workloads on rdask, dask.distributed and Frisky,
each on a LocalCluster of the same shape (default 2 worker processes x 1
thread), each system in its own Python process so they cannot interfere.

    .venv/bin/python benches/peer/peer_bench.py                  # all systems, full sizes
    .venv/bin/python benches/peer/peer_bench.py --quick --systems rdask

Prints a table and writes JSON (default bench-results/peer.json). Every
workload checks its result; a wrong result is reported as an error, never
as a time.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import subprocess
import sys
import time

SIZES = {
    "full": dict(map=100_000, map_dask=10_000, merge=10_000, tree=15, numpy=20_000, chunk=1_000,
                 df_rows=4_000_000, df_parts=40, bag=2_000_000, bag_parts=40, move_mib=1024),
    "quick": dict(map=5_000, map_dask=1_000, merge=1_000, tree=8, numpy=2_000, chunk=500,
                  df_rows=100_000, df_parts=4, bag=100_000, bag_parts=4, move_mib=16),
}


# ---------------------------------------------------------------- workloads
def inc(x):
    return x + 1


def make_array(nbytes):
    import numpy as np

    return np.ones(nbytes // 8, dtype="float64")


def array_nbytes(x):
    return x.nbytes


def tree_graph(depth):
    import dask

    level = [dask.delayed(inc)(i) for i in range(1 << depth)]
    while len(level) > 1:
        level = [dask.delayed(operator.add)(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0], sum(range(1, (1 << depth) + 1))


ALL = ["map", "merge", "tree", "numpy", "df-groupby", "df-join", "bag", "move"]


def workloads(client, system, sz, only=ALL):
    import dask
    import dask.array as da
    import dask.bag as db
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd

    out = {}

    def run(name, fn, tasks=None):
        if name not in only:
            return
        t0 = time.perf_counter()
        try:
            ok = fn()
            dt = time.perf_counter() - t0
            out[name] = {"seconds": dt, "ok": bool(ok)}
            if tasks:
                out[name]["tasks"] = tasks
                out[name]["tasks_per_s"] = tasks / dt
        except Exception as e:  # report, keep going with the next workload
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"   [{system}] {name}: {out[name]}", file=sys.stderr, flush=True)

    n_map = sz["map_dask"] if system == "dask" else sz["map"]

    def do_map():
        # Three rounds over distinct inputs (so no round reuses another's
        # keys); the best is reported, all three are kept.
        times = []
        for r in range(3):
            t0 = time.perf_counter()
            futs = client.map(inc, range(r * n_map, (r + 1) * n_map))
            if client.gather(futs)[-1] != (r + 1) * n_map:
                return False
            times.append(time.perf_counter() - t0)
            del futs
        out["map_rounds_s"] = times
        return min(times)

    if "map" in only:
        t0 = time.perf_counter()
        try:
            best = do_map()
            if best is False:
                out["map"] = {"ok": False, "error": "wrong result"}
            else:
                out["map"] = {"seconds": best, "all_seconds": out.pop("map_rounds_s"), "ok": True,
                              "tasks": n_map, "tasks_per_s": n_map / best}
        except Exception as e:
            out["map"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"   [{system}] map: {out['map']}", file=sys.stderr, flush=True)

    def do_merge():
        leaves = [dask.delayed(inc)(i) for i in range(sz["merge"])]
        (total,) = dask.compute(dask.delayed(sum)(leaves))
        return total == sum(range(1, sz["merge"] + 1))

    run("merge", do_merge, sz["merge"] + 1)

    if "tree" in only:
        root, expect = tree_graph(sz["tree"])
        run("tree", lambda: dask.compute(root)[0] == expect, (2 << sz["tree"]) - 1)
        del root

    def do_numpy():
        n, c = sz["numpy"], sz["chunk"]
        x = da.random.default_rng(42).random((n, n), chunks=(c, c))
        v = (x + x.T).mean(axis=0).std().compute()
        # mean over n values of (u + u') has std ~ sqrt(2/12/n); the check
        # catches wrong or missing blocks without a second full computation
        return 0.2 * (2 / 12 / n) ** 0.5 < v < 5 * (2 / 12 / n) ** 0.5

    run("numpy", do_numpy)

    rows, parts = sz["df_rows"], sz["df_parts"]
    pdf = pd.DataFrame({"k": np.arange(rows) % 1000, "v": np.arange(rows, dtype="float64")})
    other = pd.DataFrame({"k": np.arange(1000), "w": np.arange(1000) * 2.0})
    df = dd.from_pandas(pdf, npartitions=parts)

    def do_groupby():
        g = df.groupby("k").v.sum().compute()
        return len(g) == 1000 and g.sum() == pdf.v.sum()

    run("df-groupby", do_groupby)

    def do_join():
        j = df.merge(dd.from_pandas(other, npartitions=max(1, parts // 4)), on="k").compute()
        return len(j) == rows and j.w.sum() == (pdf.k * 2.0).sum()

    run("df-join", do_join)

    def do_bag():
        b = db.from_sequence(range(sz["bag"]), npartitions=sz["bag_parts"])
        total = b.map(inc).filter(lambda x: x % 3 == 0).sum().compute()
        return total == sum(x for x in range(1, sz["bag"] + 1) if x % 3 == 0)

    run("bag", do_bag)

    # worker -> worker: an array made on one worker, read by a task on the other
    # Frisky's client lists no worker addresses, so it cannot pin the two ends.
    info = getattr(client, "scheduler_info", None)
    workers = sorted(info()["workers"]) if info else []
    if "move" in only and len(workers) < 2:
        out["move"] = {"skipped": "the client cannot name two workers"}
    if len(workers) >= 2 and "move" in only:
        nbytes = sz["move_mib"] << 20

        def do_move():
            # Three transfers; the first lands in memory the receiving process
            # never touched, later ones in memory it freed and the VM may have
            # reclaimed meanwhile: all three are reported, the best is shown.
            times = []
            for _ in range(3):
                src = client.submit(make_array, nbytes, workers=[workers[0]], pure=False)
                _wait(src)
                t0 = time.perf_counter()
                got = client.submit(array_nbytes, src, workers=[workers[1]], pure=False).result()
                times.append(time.perf_counter() - t0)
                del src
                if got != nbytes:
                    out["move"] = {"ok": False, "error": f"moved {got} bytes, expected {nbytes}"}
                    return False
                time.sleep(0.5)
            best = min(times)
            out["move"] = {"seconds": best, "all_seconds": times, "ok": True, "mib": sz["move_mib"],
                           "mib_per_s": sz["move_mib"] / best}
            return True

        t0 = time.perf_counter()
        try:
            do_move()
        except Exception as e:
            out["move"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"   [{system}] move: {out['move']}", file=sys.stderr, flush=True)
    return out


def _wait(future):
    """Waits for a future without fetching its value to the client."""
    mod = type(future).__module__.split(".")[0]
    if mod == "rdask":
        import rdask

        rdask.wait([future])
    elif mod == "frisky":
        import frisky

        frisky.wait([future])
    else:
        from dask.distributed import wait

        wait([future])


def run_system(system, args):
    sz = SIZES["quick" if args.quick else "full"]
    t0 = time.perf_counter()
    if system == "rdask":
        from rdask import Client, LocalCluster
    elif system == "dask":
        from dask.distributed import Client, LocalCluster
    elif system == "frisky":
        from frisky import Client, LocalCluster
    else:
        raise SystemExit(f"unknown system {system}")
    kwargs = dict(n_workers=args.workers, threads_per_worker=args.threads, processes=True)
    if system == "dask":
        kwargs["dashboard_address"] = None
    cluster = LocalCluster(**kwargs)
    try:
        # Frisky's Client does not take a cluster object; all three have this.
        client = cluster.get_client()
        startup = time.perf_counter() - t0
        try:
            results = workloads(client, system, sz, args.workloads.split(","))
        finally:
            client.close()
    finally:
        cluster.close()
    return {"system": system, "startup_s": startup, "results": results}


def run_sync_baseline(args):
    """dask's single-process sync scheduler on the tree graph (the target)."""
    import dask

    if "tree" not in args.workloads.split(","):
        return {"system": "dask-sync", "results": {}}
    sz = SIZES["quick" if args.quick else "full"]
    root, expect = tree_graph(sz["tree"])
    t0 = time.perf_counter()
    ok = dask.compute(root, scheduler="sync")[0] == expect
    dt = time.perf_counter() - t0
    return {"system": "dask-sync", "results": {"tree": {"seconds": dt, "ok": ok, "tasks": (2 << sz["tree"]) - 1,
                                                         "tasks_per_s": ((2 << sz["tree"]) - 1) / dt}}}


def iperf_loopback():
    """Loopback bandwidth as iperf3 reports it (None if iperf3 is missing)."""
    from shutil import which

    if which("iperf3") is None:
        return None
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", "5299"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", "5299", "-t", "5", "-J"], capture_output=True, text=True, timeout=30)
        data = json.loads(out.stdout)
        return data["end"]["sum_received"]["bits_per_second"] / 8 / 2**20
    finally:
        server.kill()


def table(reports, iperf):
    names = ALL
    systems = [r["system"] for r in reports]
    lines = [f"{'workload':<12}" + "".join(f"{s:>22}" for s in systems)]
    for n in names:
        row = f"{n:<12}"
        for r in reports:
            v = r["results"].get(n)
            if v is None:
                cell = "-"
            elif "skipped" in v:
                cell = "n/a"
            elif "error" in v:
                cell = "error"
            elif not v.get("ok", False):
                cell = "WRONG"
            elif n == "move":
                cell = f"{v['seconds']:.2f}s {v['mib_per_s']:.0f}MiB/s"
            elif "tasks_per_s" in v:
                cell = f"{v['seconds']:.2f}s {v['tasks_per_s']:.0f}/s"
            else:
                cell = f"{v['seconds']:.2f}s"
            row += f"{cell:>22}"
        lines.append(row)
    if iperf:
        lines.append(f"iperf3 loopback: {iperf:.0f} MiB/s")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="rdask,dask,frisky")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--workloads", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--out", default="bench-results/peer.json")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per system")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: run one system, print JSON
    args = p.parse_args()
    if args.one:
        r = run_sync_baseline(args) if args.one == "dask-sync" else run_system(args.one, args)
        print(json.dumps(r))
        return 0
    reports = []
    failed = False
    for system in args.systems.split(",") + ["dask-sync"]:
        print(f"== {system}", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--one", system, "--workers", str(args.workers), "--threads", str(args.threads),
               "--workloads", args.workloads]
        if args.quick:
            cmd.append("--quick")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{system} did not finish within {args.timeout} s", file=sys.stderr)
            failed = True
            continue
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            print(f"{system} failed (exit {proc.returncode})", file=sys.stderr)
            failed = True
            continue
        reports.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    iperf = None if args.quick else iperf_loopback()
    bad = [(r["system"], n) for r in reports for n, v in r["results"].items()
           if "skipped" not in v and ("error" in v or not v.get("ok"))]
    print(table(reports, iperf))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"workers": args.workers, "threads": args.threads, "quick": args.quick,
                   "iperf3_loopback_mib_per_s": iperf, "reports": reports}, f, indent=2)
    print(f"wrote {args.out}")
    if bad:
        print(f"errors or wrong results: {bad}", file=sys.stderr)
    rd = [r for r in reports if r["system"] == "rdask"]
    rdask_bad = [b for b in bad if b[0] == "rdask"]
    return 1 if failed or rdask_bad or not rd else 0


if __name__ == "__main__":
    sys.exit(main())
