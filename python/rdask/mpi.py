"""rdask on an MPI job, as dask-mpi: one command or one call.

    mpirun -np 4 rdask-mpi --scheduler-file sched.json   # rank 0 scheduler, ranks 1.. workers
    mpirun -np 4 python script.py                        # the script calls rdask.mpi.initialize():
                                                         # rank 0 scheduler, rank 1 runs the script, others workers

When the script ends (normally, by an exception or sys.exit(code)), every
rank shuts down and mpirun exits with the script's exit code. A rank that
dies makes mpirun end the job. Each rank's worker runs in the rank's own
process: nothing forks after MPI_Init, so there is no nanny under MPI.
MPI carries only the start-up (the scheduler address, the script's end);
rdask's traffic uses its transport (TCP).
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
import time

from . import _rdask
from .errors import RdaskError

# How long a rank waits in MPI_Finalize before giving up on the others (a
# rank stuck elsewhere must not hang the job at exit).
FINALIZE_TIMEOUT = 30.0

_initialized = False


def _host(interface: str | None) -> str:
    """The address to listen on: the interface's, or this host's for others."""
    if interface:
        addr = _rdask.interface_address(interface)
        if addr is None:
            raise RdaskError(f"no IPv4 address on network interface {interface!r}")
        return addr
    return _rdask.contact_ip()


def _finalize(code_if_stuck: int):
    """MPI_Finalize under a watchdog: it waits for every rank, and one that
    never comes must not keep this one forever."""
    t = threading.Timer(FINALIZE_TIMEOUT, lambda: os._exit(code_if_stuck))
    t.daemon = True
    t.start()
    _rdask.mpi_finalize()
    t.cancel()


def _finalize_and_exit(code: int, exit: bool = True):
    # Shutting down already: a further SIGTERM (a batch system signals
    # again, or twice) must not interrupt MPI_Finalize.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    _finalize(code or 1)
    if exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _start_mpi() -> tuple[int, int]:
    global _initialized
    if not _rdask.mpi_built():
        raise RdaskError("this rdask was built without MPI; rebuild it with the `mpi` feature (the default "
                         "Python build) on a machine with an MPI library")
    if _initialized:
        raise RdaskError("rdask.mpi.initialize() was called already in this process")
    rank, size = _rdask.mpi_init()
    _initialized = True
    return rank, size


def _serve_scheduler(host: str, port: int, token, scheduler_file, wait_for_client: bool, protocol: str) -> int:
    """Rank 0: the scheduler, until the client rank says it is done (or a
    signal comes). Returns the exit code for this rank."""
    from .cli import write_scheduler_file

    _rdask.init_logging()
    address = f"mpi://0:{port}" if protocol == "mpi" else (f"ucx://{host}:{port}" if protocol == "ucx" else None)
    from .scheduler_side import SchedulerSide

    sched = _rdask.Scheduler(host, port, token, address=address, python_side=SchedulerSide())
    _rdask.mpi_broadcast(sched.address)
    if scheduler_file:
        write_scheduler_file(scheduler_file, sched.address)
    print(f"rdask-mpi: scheduler at {sched.address} (rank 0)", file=sys.stderr, flush=True)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    try:
        while not stop.is_set():
            if wait_for_client and _rdask.mpi_recv_done() is not None:
                break
            stop.wait(0.05)
    finally:
        # The file first: on a signal mpirun may kill this rank soon.
        if scheduler_file:
            try:
                os.remove(scheduler_file)
            except FileNotFoundError:
                pass
        sched.stop()  # workers are told to stop and hang up
    print("rdask-mpi: scheduler stopped (rank 0)", file=sys.stderr, flush=True)
    return 0


def _serve_worker(rank: int, name: str | None, nthreads: int, memory_limit, local_directory, host: str,
                  token, death_timeout: float, protocol: str) -> int:
    """A worker rank: runs until the scheduler stops it (0), SIGTERM (0) or
    the scheduler is lost (1)."""
    from .config import parse_memory_limit
    from .worker import Leave, run

    address = _rdask.mpi_broadcast(None)
    local = os.path.join(local_directory, f"rank-{rank}") if local_directory else None
    try:
        run(address, f"{name or 'rank'}-{rank}", nthreads, parse_memory_limit(memory_limit, 1), None, token, local,
            host, death_timeout, listen=f"mpi://{rank}:0" if protocol == "mpi" else None)
        return 0
    except (KeyboardInterrupt, Leave):
        return 0
    except RdaskError as e:
        print(f"rdask-mpi rank {rank}: {e}", file=sys.stderr, flush=True)
        return 1


def _protocol(protocol: str | None) -> str:
    """tcp, mpi, or what rdask.protocols makes of ucx/auto (the workers
    follow the scheduler address's protocol)."""
    protocol = (protocol or "tcp").rstrip(":/")
    if protocol in ("tcp", "mpi"):
        return protocol
    if protocol not in ("ucx", "auto"):
        raise RdaskError(f"protocol {protocol!r} is not supported under MPI (tcp, ucx, auto or mpi)")
    from .protocols import resolve

    try:
        return resolve(protocol, None, report=lambda line: print(f"rdask-mpi: {line}", file=sys.stderr, flush=True))
    except ValueError as e:
        raise RdaskError(str(e)) from None


def initialize(interface: str | None = None, nthreads: int = 1, local_directory: str | None = None,
               memory_limit="auto", nanny: bool = False, dashboard: bool = True, dashboard_address=None,
               protocol: str | None = None, worker_class=None, worker_options=None, comm=None, exit: bool = True,
               scheduler_port: int = 0, token: str | None = None, name: str | None = None,
               death_timeout: float = 60.0) -> bool:
    """Turns an `mpirun -np N python script.py` job into an rdask cluster,
    with dask-mpi's keywords: rank 0 runs the scheduler, ranks 2.. run
    workers (neither returns when `exit` is true), and rank 1 returns True to
    run the rest of the script as the client; `Client()` there connects to
    the job's scheduler. When the script ends, every rank shuts down and the
    job exits with the script's exit code."""
    protocol = _protocol(protocol)
    if nanny:
        raise RdaskError("nanny=True is not supported under MPI: a nanny forks its worker after MPI_Init; "
                         "each rank runs its worker in its own process")
    if worker_class is not None or worker_options or comm is not None:
        raise RdaskError("worker_class, worker_options and comm are not supported by rdask.mpi.initialize")
    rank, size = _start_mpi()
    if size < 2:
        raise RdaskError(f"rdask.mpi.initialize needs at least 2 ranks (scheduler and client), got {size}")
    host = _host(interface)
    token = token if token is not None else os.environ.get("RDASK_TOKEN")
    if rank == 0:
        code = _serve_scheduler(host, scheduler_port, token, None, True, protocol)
        _finalize_and_exit(code, exit)
        return False
    if rank >= 2:
        code = _serve_worker(rank, name, nthreads, memory_limit, local_directory, host, token, death_timeout,
                             protocol)
        if code != 0:
            _rdask.mpi_abort(code)
        _finalize_and_exit(code, exit)
        return False
    # rank 1: the client
    import dask

    address = _rdask.mpi_broadcast(None)
    dask.config.set({"scheduler-address": address})
    if token:
        os.environ.setdefault("RDASK_TOKEN", token)

    def done():
        from .client import _close_all

        _close_all()
        try:
            _rdask.mpi_send_done(0)
        finally:
            # The process then exits with the script's own code.
            _finalize(1)

    atexit.register(done)
    return True


def main(argv=None) -> int:
    """`mpirun -np N rdask-mpi`: rank 0 the scheduler, every other rank a worker."""
    p = argparse.ArgumentParser(prog="rdask-mpi", description=main.__doc__)
    p.add_argument("--scheduler-file", default=None, help="write the scheduler's address here (removed at exit)")
    p.add_argument("--scheduler-port", type=int, default=0)
    p.add_argument("--interface", default=None, help="network interface to listen on (e.g. ib0, lo)")
    p.add_argument("--nthreads", type=int, default=1)
    p.add_argument("--memory-limit", default="auto")
    p.add_argument("--local-directory", default=None)
    p.add_argument("--protocol", default="tcp", choices=("tcp", "ucx", "auto", "mpi"),
                   help="what scheduler, workers and clients talk over: tcp (default), ucx, auto (ucx where "
                        "available, else tcp) or mpi (mpi://RANK:PORT)")
    p.add_argument("--name", default=None, help="worker name prefix (workers are NAME-RANK)")
    p.add_argument("--nanny", dest="nanny", action="store_true", help="not supported under MPI")
    p.add_argument("--no-nanny", dest="nanny", action="store_false")
    p.add_argument("--death-timeout", type=float, default=60.0)
    from .cli import add_token_args, token_of

    add_token_args(p)
    a = p.parse_args(argv)
    if a.protocol == "mpi":
        # Clients outside the job cannot reach mpi:// addresses (nor fetch
        # from workers listening on them).
        print("rdask-mpi: --protocol mpi needs the client inside the MPI job; use rdask.mpi.initialize(protocol=\"mpi\") "
              "in the script run by mpirun, or --protocol tcp here", file=sys.stderr)
        return 2
    try:
        a.protocol = _protocol(a.protocol)
    except RdaskError as e:
        print(f"rdask-mpi: --protocol: {e}", file=sys.stderr)
        return 2
    if a.nanny:
        print("rdask-mpi: --nanny is not supported: a nanny forks its worker after MPI_Init; "
              "each rank runs its worker in its own process", file=sys.stderr)
        return 2
    token = token_of(a)
    try:
        rank, size = _start_mpi()
        host = _host(a.interface)
    except RdaskError as e:
        print(f"rdask-mpi: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        code = _serve_scheduler(host, a.scheduler_port, token, a.scheduler_file, False, a.protocol)
    else:
        code = _serve_worker(rank, a.name, a.nthreads, a.memory_limit, a.local_directory, host, token,
                             a.death_timeout, a.protocol)
        if code != 0:
            _rdask.mpi_abort(code)
    _finalize_and_exit(code)
    return code
