"""Time from `mpirun` to a ready rdask cluster (every worker rank
registered, seen from the client rank of `rdask.mpi.initialize()`), and
from the script's end to mpirun's clean exit, for N ranks (N-2 workers).
Writes bench-results/mpi_startup.json.

    .venv/bin/python benches/mpi_startup.py --ranks 4,16,64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

JOB = """
import sys, time
from rdask.mpi import initialize
initialize(interface="lo")
from rdask import Client
c = Client(timeout=300)
c.wait_for_workers({workers}, timeout=600)
print("READY", time.time(), flush=True)
assert c.submit(sum, [1, 2]).result() == 3
print("END", time.time(), flush=True)
"""


def one(n: int) -> tuple[float, float]:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(JOB.format(workers=n - 2))
    try:
        t0 = time.time()
        out = subprocess.run([shutil.which("mpirun"), "-np", str(n), sys.executable, f.name],
                             capture_output=True, text=True, timeout=900, env=env)
        t_exit = time.time()
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"mpirun -np {n} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    marks = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("READY", "END")))
    return float(marks["READY"]) - t0, t_exit - float(marks["END"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="4,16")
    p.add_argument("--out", default="bench-results/mpi_startup.json")
    a = p.parse_args()
    results = {}
    for n in map(int, a.ranks.split(",")):
        ready, exit_ = one(n)
        results[n] = {"ready_s": ready, "exit_s": exit_}
        print(f"mpirun -np {n}: {n - 2} workers ready after {ready:.2f} s; clean exit {exit_:.2f} s after the script ended",
              flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
