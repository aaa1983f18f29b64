"""Time from starting `rdask-worker --nworkers auto` (one pinned worker
process per core) to every worker registered with the scheduler, with and
without binding. Writes bench-results/startup.json.

    .venv/bin/python benches/startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from rdask import Client, topology

BIN = os.path.dirname(sys.executable)


def one(flags: list[str], expected: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        sched_file = os.path.join(d, "s.json")
        sched = subprocess.Popen([os.path.join(BIN, "rdask-scheduler"), "--host", "127.0.0.1", "--port", "0",
                                  "--scheduler-file", sched_file], stderr=subprocess.DEVNULL)
        try:
            client = Client(scheduler_file=sched_file, set_as_default=False, timeout=30)
            t0 = time.monotonic()
            workers = subprocess.Popen([os.path.join(BIN, "rdask-worker"), "--scheduler-file", sched_file, *flags],
                                       stderr=subprocess.DEVNULL)
            try:
                client.wait_for_workers(expected, timeout=120)
                elapsed = time.monotonic() - t0
            finally:
                workers.terminate()
                workers.wait(30)
            client.close()
            return elapsed
        finally:
            sched.terminate()
            sched.wait(30)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench-results/startup.json")
    a = p.parse_args()
    cores = len(topology.read()["cores"])
    results = {"cores": cores, "runs": {}}
    for label, flags in (("auto (bound)", ["--nworkers", "auto"]), ("auto --no-bind", ["--nworkers", "auto", "--no-bind"])):
        times = [one(flags, cores) for _ in range(a.rounds)]
        results["runs"][label] = times
        print(f"rdask-worker --nworkers {' '.join(flags[1:])}: {cores} workers registered in "
              + ", ".join(f"{t:.2f}" for t in times) + " s", flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
