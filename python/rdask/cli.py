"""`rdask-scheduler` and `rdask-worker`, with the flags Dask users type."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from . import _rdask
from .security import add_tls_flags, from_args
from .config import add_memory_flags, parse_memory_limit, parse_resources, thresholds_from_args, total_memory


def _wait_for_signal(stop: threading.Event):
    def handler(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.is_set():
        stop.wait(0.2)


def read_token_file(path: str) -> str:
    """The token in a `--token-file` (its first line), so it need not show
    in `ps`; an empty or unreadable file is an error naming the file."""
    try:
        with open(path) as f:
            token = f.readline().rstrip("\r\n")
    except OSError as e:
        raise SystemExit(f"cannot read token file {path}: {e.strerror}")
    if not token:
        raise SystemExit(f"token file {path} is empty")
    return token


def add_token_args(p: argparse.ArgumentParser):
    p.add_argument("--token", default=None,
                   help="shared secret clients and workers must present (or RDASK_TOKEN, or --token-file)")
    p.add_argument("--token-file", default=os.environ.get("RDASK_TOKEN_FILE"),
                   help="read the token from this file's first line (or RDASK_TOKEN_FILE)")


def token_of(a) -> str | None:
    if a.token is not None and a.token_file:
        raise SystemExit("give --token or --token-file, not both")
    if a.token_file:
        return read_token_file(a.token_file)
    return a.token if a.token is not None else os.environ.get("RDASK_TOKEN")


def scheduler_address(p: argparse.ArgumentParser, a) -> str | None:
    """The scheduler address from the command line or `--scheduler-file`
    (waited for up to `--death-timeout`); None after printing why not."""
    address = a.address
    if address is None and a.scheduler_file:
        from .client import _read_scheduler_file

        try:
            address = _read_scheduler_file(a.scheduler_file, a.death_timeout)
        except TimeoutError as e:
            print(f"{p.prog}: {e}", file=sys.stderr)
            return None
    if address is None:
        p.error("give the scheduler address or --scheduler-file")
    return address if "://" in address else f"{getattr(a, 'protocol', None) or 'tcp'}://" + address


def run_nannies(nannies: list) -> int:
    """Waits for SIGTERM/SIGINT or for every nanny to end, then stops them;
    1 if some worker could not reach its scheduler."""
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if all(not n.is_alive() and (n._thread is None or not n._thread.is_alive()) for n in nannies):
                stop.set()
            stop.wait(0.5)

    threading.Thread(target=watch, daemon=True).start()
    try:
        _wait_for_signal(stop)
    finally:
        for n in nannies:
            n.stop()
    if any(n.gave_up for n in nannies):
        print("the scheduler could not be reached; exiting", file=sys.stderr)
        return 1
    return 0


# Flags of `dask scheduler` / `dask worker` that mean nothing here: accepted
# with a one-line warning (cosmetic) ...
COSMETIC = {
    "--jupyter": "there is no Jupyter server in the scheduler", "--no-jupyter": "",
    "--show": "rdask does not open a browser", "--no-show": "",
    "--dashboard-prefix": "the dashboard is served at the root", "--use-xheaders": "the dashboard reads no proxy headers",
    "--nanny-port": "rdask's nannies are not network services",
}
# ... or refused, naming the flag and why (never a bare argparse error).
UNSUPPORTED = {
    "--preload": "preload scripts are not supported yet",
    "--preload-nanny": "preload scripts are not supported yet",
    "--listen-address": "give --host/--interface and --worker-port instead",
    "--contact-address": "workers advertise the address they listen on (--host/--interface)",
}


def add_dask_flags(p: argparse.ArgumentParser, worker: bool):
    """Dask's flags for every command, so job scripts written for `dask
    scheduler` / `dask worker` start: the ones that work here, and the rest
    listed in --help and answered clearly (see `check_dask_flags`)."""
    p.add_argument("--interface", default=None, help="network interface to listen on (e.g. ib0, eth0, lo)")
    p.add_argument("--protocol", default=None,
                   help="tcp, tls (the default with --tls-cert), ucx, or auto (ucx where available, else tcp); "
                        "MPI jobs use rdask-mpi")
    add_tls_flags(p)
    p.add_argument("--pid-file", default=None, help="write this process's id here (removed at exit)")
    for flag, why in COSMETIC.items():
        takes_value = flag in ("--dashboard-prefix", "--nanny-port")
        if takes_value:
            p.add_argument(flag, default=None, help=f"accepted and ignored: {why}")
        else:
            p.add_argument(flag, action="store_true", default=None, help=f"accepted and ignored: {why or 'see its positive form'}")
    for flag, why in UNSUPPORTED.items():
        p.add_argument(flag, default=None, help=f"not supported: {why}")


def check_dask_flags(prog: str, a) -> int | None:
    """Warns about cosmetic flags; for an unsupported one prints why and
    returns the exit code (2)."""
    for flag, why in UNSUPPORTED.items():
        if getattr(a, flag.lstrip("-").replace("-", "_"), None) is not None:
            print(f"{prog}: {flag} is not supported: {why}", file=sys.stderr)
            return 2
    for flag, why in COSMETIC.items():
        if getattr(a, flag.lstrip("-").replace("-", "_"), None) not in (None, False):
            print(f"{prog}: warning: {flag} is accepted and ignored" + (f" ({why})" if why else ""), file=sys.stderr)
    try:
        a.security = from_args(a)  # applied below, once the protocol is checked
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    from .protocols import resolve

    # A worker without --protocol speaks its scheduler address's protocol.
    sched = getattr(a, "address", None) if prog.endswith("worker") else None
    try:
        a.protocol = resolve(a.protocol, a.security, report=lambda line: print(f"{prog}: {line}", file=sys.stderr),
                             follow=sched)
    except ValueError as e:
        print(f"{prog}: --protocol: {e}", file=sys.stderr)
        return 2
    if a.security:
        try:
            a.security.apply("worker" if prog.endswith("worker") else "scheduler")
        except (OSError, _rdask.RdaskError, ValueError) as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
    if a.interface:
        addr = _rdask.interface_address(a.interface)
        if addr is None:
            print(f"{prog}: no IPv4 address on network interface {a.interface!r}", file=sys.stderr)
            return 2
        a.host = addr
    if a.pid_file:
        with open(a.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
        pid_file = a.pid_file

        def remove():
            try:
                os.remove(pid_file)
            except FileNotFoundError:
                pass

        import atexit

        atexit.register(remove)
    return None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_scheduler_file(path: str, address: str):
    body = {"type": "Scheduler", "id": f"rdask-scheduler-{os.getpid()}", "address": address,
            "services": {}, "started": time.time(), "workers": {}}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=2)
    os.replace(tmp, path)  # readers never see half a file


def scheduler_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rdask-scheduler", description="rdask scheduler (Rust core, in this process)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8786)
    p.add_argument("--scheduler-file", default=None)
    add_token_args(p)
    p.add_argument("--worker-timeout", type=float, default=60.0, help="drop a worker silent this many seconds")
    p.add_argument("--dashboard-address", default=":8787",
                   help="dashboard address: :8787, host:port, :0 for any free port, none to turn it off")
    p.add_argument("--dashboard", dest="dashboard", action="store_true", default=True, help="serve the dashboard")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false", help="do not serve the dashboard")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="shut down after this many seconds with no client and no task")
    add_dask_flags(p, worker=False)
    a = p.parse_args(argv)
    code = check_dask_flags("rdask-scheduler", a)
    if code is not None:
        return code
    token = token_of(a)
    dashboard = None if not a.dashboard or a.dashboard_address.lower() == "none" else a.dashboard_address
    _rdask.init_logging("info")
    from .scheduler_side import SchedulerSide

    side = SchedulerSide()
    try:
        sched = _rdask.Scheduler(a.host, a.port, token, a.worker_timeout, dashboard_address=dashboard,
                                 address=f"{a.protocol}://{_host_port(a.host, a.port)}", python_side=side)
    except OSError as e:
        print(f"rdask-scheduler: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 1
    side.state.address = side.state.id = sched.address
    print(f"rdask-scheduler bound to {sched.bound_address}; clients and workers connect to {sched.address}",
          file=sys.stderr, flush=True)
    if sched.dashboard_link:
        print(f"rdask-scheduler: dashboard at {sched.dashboard_link}", file=sys.stderr, flush=True)
    if a.scheduler_file:
        write_scheduler_file(a.scheduler_file, sched.address)
    stop = threading.Event()
    if a.idle_timeout:
        threading.Thread(target=_idle_watch, args=(sched, token, a.idle_timeout, stop), daemon=True).start()
    try:
        _wait_for_signal(stop)
    finally:
        sched.stop()
        if a.scheduler_file:
            try:
                os.remove(a.scheduler_file)
            except FileNotFoundError:
                pass
    return 0


def parse_seconds(text) -> float:
    """'90', '90s', '30m', '1 hour', '2h' as seconds (Dask's time strings)."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hrs|hours?)?\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 90, 30m, 1 hour)")
    unit = (m.group(2) or "s")[0]
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]


def worker_ports(spec: str, n: int) -> list[int]:
    """`--worker-port`: 0 (any), one port (one worker), or a range a:b."""
    spec = str(spec)
    if ":" in spec:
        lo, hi = (int(x) for x in spec.split(":", 1))
        if hi - lo + 1 < n:
            raise ValueError(f"--worker-port {spec} has {hi - lo + 1} ports for {n} workers")
        return list(range(lo, lo + n))
    port = int(spec)
    if port and n > 1:
        raise ValueError(f"--worker-port {port} is one port for {n} workers; give a range like {port}:{port + n - 1}")
    return [port] * n


def _idle_watch(sched, token, idle_timeout: float, stop: threading.Event):
    """Sets `stop` once the scheduler has had no client (but this probe)
    and no task for `idle_timeout` seconds, as Dask's --idle-timeout."""
    probe = _rdask.Client.connect(sched.address, token, 10.0)
    idle_since = time.monotonic()
    while not stop.wait(0.5):
        info = probe.cluster_info()
        # every client connection but the probe counts
        if info["tasks"] > 0 or info["clients"] > 1:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle_timeout:
            print(f"rdask-scheduler: idle for {idle_timeout:g} s; shutting down", file=sys.stderr, flush=True)
            stop.set()


def plan_layout(nworkers: str, nthreads: int, memory_limit, bind: bool, topo: dict | None = None) -> list[dict]:
    """The worker specs of `rdask-worker` for these flags, on this machine
    (or on `topo`)."""
    from . import topology

    topo = topology.read() if topo is None else topo
    n = None if str(nworkers).lower() == "auto" else int(nworkers)
    if n is not None and n < 1:
        raise ValueError(f"--nworkers must be at least 1 or 'auto', not {nworkers}")
    # "auto" memory: each NUMA node's memory split among its workers; other
    # forms (bytes, a fraction) are the same for every worker.
    count = n or max(1, len(topo["cores"]) // max(1, nthreads or 1))
    memory = None if str(memory_limit).lower() == "auto" else parse_memory_limit(memory_limit, count)
    return topology.plan(topo, nworkers=n, nthreads=nthreads or None, memory_limit=memory,
                         fallback_memory=total_memory(), bind=bind)


def worker_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rdask-worker", description="rdask worker processes, each under a nanny")
    p.add_argument("address", nargs="?", help="scheduler address, e.g. tcp://10.0.0.1:8786")
    p.add_argument("--scheduler-file", default=None)
    p.add_argument("--nworkers", "--nprocs", default="1",
                   help="worker processes: an integer, or 'auto' for one per physical core (per --nthreads cores)")
    p.add_argument("--nthreads", type=int, default=0, help="threads (and cores) per worker (0: cores / nworkers)")
    p.add_argument("--no-bind", dest="bind", action="store_false",
                   help="do not pin workers to their cores and their memory to their NUMA node")
    p.add_argument("--memory-limit", default="auto", help="per worker: auto, 0, bytes, '4GiB' or a fraction like 0.5")
    p.add_argument("--name", default=None, help="worker name (suffixed -i with several workers)")
    p.add_argument("--local-directory", default=None, help="where workers spill values to disk (default: the temporary directory)")
    add_memory_flags(p)
    p.add_argument("--resources", default="", help='e.g. "GPU=1 MEM=10e9"')
    add_token_args(p)
    p.add_argument("--listen-host", "--host", default="127.0.0.1")
    p.add_argument("--no-nanny", dest="nanny", action="store_false")
    p.add_argument("--death-timeout", type=float, default=30.0, help="seconds to keep trying to reach the scheduler")
    p.add_argument("--worker-port", default="0",
                   help="port each worker listens on for peers (0: any; with several workers a range 9000:9010)")
    p.add_argument("--lifetime", default=None, help="each worker leaves after this long (seconds, or '1 hour', '30m')")
    p.add_argument("--lifetime-stagger", default="0", help="spread lifetimes by up to this much, so workers do not all leave at once")
    p.add_argument("--lifetime-restart", action="store_true", help="start a worker again when its lifetime ends")
    p.add_argument("--dashboard-address", default=None, help="accepted and ignored: workers serve no dashboard")
    p.add_argument("--dashboard", dest="worker_dashboard", action="store_true", default=None,
                   help="accepted and ignored: workers serve no dashboard")
    p.add_argument("--no-dashboard", dest="worker_dashboard", action="store_false")
    add_dask_flags(p, worker=True)
    a = p.parse_args(argv)
    code = check_dask_flags("rdask-worker", a)
    if code is not None:
        return code
    a.listen_host = a.host if a.interface else a.listen_host
    if a.dashboard_address is not None or a.worker_dashboard:
        print("rdask-worker: warning: --dashboard/--dashboard-address are accepted and ignored (workers serve no dashboard)",
              file=sys.stderr)
    a.token = token_of(a)
    address = scheduler_address(p, a)
    if address is None:
        return 1
    try:
        specs = plan_layout(a.nworkers, a.nthreads, a.memory_limit, a.bind)
        resources = parse_resources(a.resources)
        thresholds = thresholds_from_args(a)
    except ValueError as e:
        p.error(str(e))
    nworkers = len(specs)
    base = a.name or f"{os.uname().nodename}-{os.getpid()}"
    names = [base] if nworkers == 1 else [f"{base}-{i}" for i in range(nworkers)]
    if not a.nanny:
        if nworkers != 1:
            p.error("--no-nanny runs exactly one worker in this process")
        from .worker import Leave, run

        s = specs[0]
        try:
            run(address, names[0], s["nthreads"], s["memory_limit"], resources, a.token, a.local_directory,
                a.listen_host, a.death_timeout, cpus=s["cpus"], numa_node=s["numa"], memory_thresholds=thresholds,
                listen=f"{a.protocol}://{a.listen_host}:{worker_ports(a.worker_port, 1)[0]}")
        except (KeyboardInterrupt, Leave):
            pass
        except _rdask.RdaskError as e:
            print(f"rdask-worker: {e}", file=sys.stderr)
            return 1
        return 0
    from .nanny import Nanny

    try:
        ports = worker_ports(a.worker_port, nworkers)
        lifetime = parse_seconds(a.lifetime) if a.lifetime else None
        stagger = parse_seconds(a.lifetime_stagger)
    except ValueError as e:
        p.error(str(e))
    import random

    nannies = []
    for i, (n, s) in enumerate(zip(names, specs)):
        local = os.path.join(a.local_directory, n) if a.local_directory else None
        life = None if lifetime is None else max(1.0, lifetime + random.uniform(-stagger, stagger))
        nannies.append(Nanny(address, n, s["nthreads"], s["memory_limit"], resources, a.token, local, a.listen_host,
                             death_timeout=a.death_timeout, cpus=s["cpus"], numa_node=s["numa"], lifetime=life,
                             lifetime_restart=a.lifetime_restart, worker_port=ports[i],
                             memory_thresholds=thresholds, security=a.security, protocol=a.protocol).start())
    threads = sorted({s["nthreads"] for s in specs})
    print(f"rdask-worker: {nworkers} worker(s) x {'/'.join(map(str, threads))} thread(s) for {address}"
          f"{'' if a.bind else ' (unbound)'}", file=sys.stderr, flush=True)
    return run_nannies(nannies)


def topology_main(argv=None) -> int:
    """`rdask topology`: the machine as read, and the workers the launchers
    would make on it with the given flags (nothing is started)."""
    p = argparse.ArgumentParser(prog="rdask topology", description=topology_main.__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", default=None, help='an hwloc synthetic description, e.g. "pack:2 numa:2 core:16 pu:2"')
    src.add_argument("--xml", default=None, help="an hwloc XML file (lstopo --of xml)")
    p.add_argument("--nworkers", default="auto", help="as rdask-worker: an integer or 'auto' (one per core)")
    p.add_argument("--nthreads", type=int, default=0)
    p.add_argument("--memory-limit", default="auto")
    p.add_argument("--no-bind", dest="bind", action="store_false")
    p.add_argument("--cuda", action="store_true",
                   help="the layout of rdask-cuda-worker (GPUs from NVML, or from --xml)")
    p.add_argument("--json", action="store_true", help="print the topology and layout as JSON")
    a = p.parse_args(argv)
    from . import cuda, topology

    try:
        topo = topology.read(synthetic=a.synthetic, xml=a.xml)
        if a.cuda:
            if a.synthetic or a.xml:  # a described machine: its GPUs stand in for NVML's
                gpus = [{k: g[k] for k in ("index", "name", "pci_bus_id", "cpus")} for g in topo["gpus"]]
            else:
                gpus = cuda.gpu_devices()
            specs = cuda.plan(topo, gpus, a.nthreads or 1, a.memory_limit, 0.8, a.bind,
                              os.environ.get("CUDA_VISIBLE_DEVICES"))
        else:
            specs = plan_layout(a.nworkers, a.nthreads, a.memory_limit, a.bind, topo)
    except (ValueError, _rdask.RdaskError) as e:
        print(f"rdask topology: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps({"topology": topo, "workers": specs}, indent=2))
        return 0
    print(topology.describe(topo), end="")
    command = "rdask-cuda-worker" if a.cuda else f"rdask-worker --nworkers {a.nworkers}"
    print(command + (f" --nthreads {a.nthreads}" if a.nthreads else "")
          + ("" if a.bind else " --no-bind") + f" would start {len(specs)} worker(s):")
    print(topology.describe_layout(specs))
    return 0


COMMANDS = {
    "scheduler": ("scheduler_main", "run a scheduler (as rdask-scheduler)"),
    "worker": ("worker_main", "run workers (as rdask-worker)"),
    "cuda-worker": ("cuda_worker_main", "run one worker per GPU (as rdask-cuda-worker)"),
    "topology": ("topology_main", "show this machine and the worker layout a launcher would make"),
}


def cuda_worker_main(argv=None) -> int:
    from .cuda import main as cuda_main

    return cuda_main(argv)


def main(argv=None) -> int:
    """`rdask COMMAND ...`, as `dask scheduler` / `dask worker`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: rdask {" + ",".join(COMMANDS) + "} ...\n", file=sys.stderr)
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return globals()[COMMANDS[argv[0]][0]](argv[1:])
