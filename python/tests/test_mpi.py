"""rdask on an MPI job with real `mpirun` (OpenMPI): the `rdask-mpi`
command with a separate client, `rdask.mpi.initialize()` in a script, exit
codes, and a rank that dies. Every job here listens on loopback only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from rdask import Client, _rdask

BIN = os.path.dirname(sys.executable)
RDASK_MPI = os.path.join(BIN, "rdask-mpi")
MPIRUN = shutil.which("mpirun")

pytestmark = pytest.mark.skipif(MPIRUN is None or not _rdask.mpi_built(), reason="needs mpirun and an MPI build")

# As root (CI), OpenMPI wants to be told; --oversubscribe: more ranks than cores.
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")


def mpirun(n: int, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([MPIRUN, "-np", str(n), *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


INITIALIZE = """
    import sys
    from rdask.mpi import initialize
    initialize(interface="lo")
    from rdask import Client
"""


def test_initialize_runs_futures_and_an_array_reduction(tmp_path):
    job = script(tmp_path, INITIALIZE + """
    import dask.array as da
    c = Client()
    print("workers", len(c.scheduler_info()["workers"]), flush=True)
    print("sum", c.submit(sum, [1, 2, 3]).result(), flush=True)
    print("array", da.ones((600, 600), chunks=(100, 100)).sum().compute(), flush=True)
    """)
    start = time.monotonic()
    out = mpirun(4, sys.executable, job)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "workers 2" in out.stdout and "sum 6" in out.stdout and "array 360000.0" in out.stdout
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("ending, code, shows", [
    ("sys.exit(3)", 3, ""),
    ("raise ValueError('the script failed')", 1, "ValueError: the script failed"),
    ("pass", 0, ""),
])
def test_the_job_exits_with_the_scripts_exit_code(tmp_path, ending, code, shows):
    job = script(tmp_path, INITIALIZE + f"""
    c = Client()
    assert c.submit(sum, [1, 1]).result() == 2
    {ending}
    """)
    out = mpirun(3, sys.executable, job)
    assert out.returncode == code, out.stdout + out.stderr
    assert shows in out.stderr


def test_scheduler_workers_and_client_talk_over_mpi(tmp_path):
    """protocol="mpi": every connection is mpi://RANK:PORT, data included
    (a 32 MB array moves worker to worker and worker to client)."""
    job = script(tmp_path, """
    import sys
    from rdask.mpi import initialize
    initialize(protocol="mpi")
    from rdask import Client
    import dask.array as da
    import numpy as np
    c = Client()
    assert c.scheduler_address.startswith("mpi://0:"), c.scheduler_address
    addresses = sorted(w["address"] for w in c.scheduler_info()["workers"].values())
    assert addresses == ["mpi://2:1", "mpi://3:1"], addresses
    assert c.submit(sum, [1, 2, 3]).result() == 6
    assert da.ones((600, 600), chunks=(100, 100)).sum().compute() == 360000
    a = c.submit(np.ones, 4_000_000, workers=["rank-2"], pure=False)
    b = c.submit(np.sum, a, workers=["rank-3"], pure=False)
    assert b.result() == 4_000_000 and a.result().sum() == 4_000_000
    print("all good", flush=True)
    sys.exit(5)
    """)
    out = mpirun(4, sys.executable, job)
    assert out.returncode == 5, out.stdout + out.stderr
    assert "all good" in out.stdout


@pytest.mark.skipif(not _rdask.ucx_status()[0] and not os.environ.get("RDASK_REQUIRE_UCX"), reason="needs UCX")
def test_an_mpi_job_over_ucx(tmp_path):
    """protocol="ucx": the job's scheduler, workers and client talk UCX (the
    HPC set-up: mpirun starts the job, UCX carries the data)."""
    job = script(tmp_path, """
    import sys
    from rdask.mpi import initialize
    initialize(interface="lo", protocol="ucx")
    from rdask import Client
    import numpy as np
    c = Client()
    assert c.scheduler_address.startswith("ucx://127.0.0.1:"), c.scheduler_address
    addresses = [w["address"] for w in c.scheduler_info()["workers"].values()]
    assert len(addresses) == 2 and all(a.startswith("ucx://") for a in addresses), addresses
    a = c.submit(np.ones, 4_000_000, workers=["rank-2"], pure=False)
    b = c.submit(np.sum, a, workers=["rank-3"], pure=False)
    assert b.result() == 4_000_000 and a.result().sum() == 4_000_000
    print("all good", flush=True)
    """)
    out = mpirun(4, sys.executable, job)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all good" in out.stdout


def test_eight_ranks_on_two_cores(tmp_path):
    job = script(tmp_path, INITIALIZE + """
    c = Client()
    c.wait_for_workers(6, timeout=60)
    names = sorted(w["name"] for w in c.scheduler_info()["workers"].values())
    print("names", ",".join(names), flush=True)
    print("total", sum(c.gather(c.map(lambda x: x + 1, range(200)))), flush=True)
    """)
    out = mpirun(8, sys.executable, job)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "names rank-2,rank-3,rank-4,rank-5,rank-6,rank-7" in out.stdout
    assert "total 20100" in out.stdout


def test_a_worker_rank_that_dies_ends_the_job_with_a_clear_error(tmp_path):
    job = script(tmp_path, INITIALIZE + """
    import os, signal, time
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    c = Client()
    futures = c.map(time.sleep, [0.05] * 100, pure=False)
    dying = c.submit(die, workers=["rank-2"], pure=False)
    time.sleep(30)   # the job ends long before
    """)
    start = time.monotonic()
    out = mpirun(4, sys.executable, job)
    assert time.monotonic() - start < 25, "mpirun did not end the job promptly"
    assert out.returncode != 0
    assert "rank 2" in out.stderr and "signal 9" in out.stderr, out.stderr


def test_the_rdask_mpi_command_serves_a_separate_client(tmp_path):
    sched_file = str(tmp_path / "scheduler.json")
    proc = subprocess.Popen([MPIRUN, "-np", "4", RDASK_MPI, "--interface", "lo", "--scheduler-file", sched_file,
                             "--nthreads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=60) as c:
            c.wait_for_workers(3, timeout=60)
            info = c.scheduler_info()["workers"].values()
            assert sorted(w["name"] for w in info) == ["rank-1", "rank-2", "rank-3"]
            assert all(w["address"].startswith("tcp://127.0.0.1:") for w in info)
            assert sum(c.gather(c.map(lambda x: 2 * x, range(100)))) == 9900
        # SIGTERM to every rank, as a batch system's cancel does: each rank
        # shuts down cleanly, the scheduler file goes, and the job exits 0.
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 4
        for r in ranks:
            r.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stdout.read()
        assert not os.path.exists(sched_file)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rdask_mpi_refuses_what_it_cannot_do(tmp_path):
    for args, why in ((["--protocol", "mpi"], "--protocol mpi needs the client inside the MPI job"),
                      (["--nanny"], "a nanny forks its worker after MPI_Init")):
        out = subprocess.run([RDASK_MPI, *args], capture_output=True, text=True, timeout=30, env=ENV)
        assert out.returncode == 2 and why in out.stderr, out.stderr
