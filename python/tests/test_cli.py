"""The `rdask-scheduler` and `rdask-worker` commands, run as a user runs
them, and the parsing of the values given on their command lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from rdask import AuthenticationError, Client, get_worker
from rdask import topology
from rdask.cli import plan_layout
from rdask.topology import parse_cpu_list
from rdask.config import parse_memory_limit, parse_resources, total_memory

BIN = os.path.dirname(sys.executable)
SCHEDULER = os.path.join(BIN, "rdask-scheduler")
RDASK = os.path.join(BIN, "rdask")
WORKER = os.path.join(BIN, "rdask-worker")
GiB = 2**30


def inc(x):
    return x + 1


def getpid(_=None):
    return os.getpid()


def worker_facts(_=None):
    w = get_worker()
    return w.name, w.local_directory, os.getpid()


class Command:
    """A console script running in the background, its output in a file."""

    def __init__(self, args: list, log_path):
        self.args = args
        self.log_path = str(log_path)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self):
        return self.proc.pid

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def children(self) -> list:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int | None:
        """Sends `sig` and waits; kills it (and its children) if it hangs."""
        if self.proc.poll() is None:
            kids = self.children()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for k in kids:
                    try:
                        k.kill()
                    except psutil.Error:
                        pass
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                return None
        self.log.close()
        return self.proc.returncode


def start_scheduler(tmp_path, name="scheduler", *extra) -> tuple[Command, str]:
    # Loopback only: tests never reach this machine's other addresses.
    sched_file = str(tmp_path / f"{name}.json")
    cmd = Command([SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--scheduler-file", sched_file, *extra],
                  tmp_path / f"{name}.log")
    return cmd, sched_file


def start_workers(tmp_path, *args, name="workers") -> Command:
    return Command([WORKER, *args], tmp_path / f"{name}.log")


def wait_for(predicate, timeout: float, what: str, *commands: Command):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {c.args[0]}:\n{c.output()}" for c in commands)
            pytest.fail(f"{what} not reached within {timeout} s\n{logs}")
        time.sleep(0.1)


def workers_of(client) -> dict:
    return client.scheduler_info()["workers"]


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """rdask-scheduler plus `rdask-worker --nworkers 2`, and a client."""
    tmp = tmp_path_factory.mktemp("cli")
    sched, sched_file = start_scheduler(tmp)
    workers = start_workers(tmp, "--scheduler-file", sched_file, "--nworkers", "2", "--nthreads", "1",
                            "--memory-limit", "1GiB")
    client = None
    try:
        client = Client(scheduler_file=sched_file, set_as_default=False, timeout=30)
        wait_for(lambda: len(workers_of(client)) == 2, 30, "2 workers registered", sched, workers)
        yield sched, workers, sched_file, client
    finally:
        if client is not None:
            client.close()
        workers.stop()
        sched.stop()


# ---------------------------------------------------------------- commands
def test_cli_workers_register_with_their_settings(cli_cluster):
    sched, workers, sched_file, client = cli_cluster
    info = workers_of(client)
    assert len(info) == 2
    assert [w["nthreads"] for w in info.values()] == [1, 1]
    assert [w["memory_limit"] for w in info.values()] == [GiB, GiB]
    names = sorted(w["name"] for w in info.values())
    assert names[0].endswith("-0") and names[1].endswith("-1")
    assert names[0][:-2] == names[1][:-2]
    # the work runs in the worker command's child processes
    pids = set(client.gather(client.map(getpid, range(20), pure=False)))
    assert pids <= {p.pid for p in workers.children()}
    assert client.gather(client.map(inc, range(10))) == list(range(1, 11))


def test_cli_nanny_restarts_a_killed_worker(cli_cluster):
    sched, workers, sched_file, client = cli_cluster
    before = workers_of(client)
    names = sorted(w["name"] for w in before.values())
    victim = client.submit(getpid, pure=False).result(timeout=30)
    assert victim in {p.pid for p in workers.children()}
    os.kill(victim, signal.SIGKILL)
    # a new worker process registers (new address) in place of the dead one
    wait_for(lambda: len(after := workers_of(client)) == 2 and set(after) != set(before), 15,
             "the killed worker's replacement registering", workers)
    after = workers_of(client)
    assert sorted(w["name"] for w in after.values()) == names
    assert workers.proc.poll() is None, "the worker command exited"
    pids = set(client.gather(client.map(getpid, range(20), pure=False), errors="raise"))
    assert victim not in pids
    assert client.gather(client.map(inc, range(100, 110))) == list(range(101, 111))


def test_cli_worker_address_name_resources_and_directory(cli_cluster, tmp_path):
    sched, workers, sched_file, client = cli_cluster
    address = client.scheduler_address
    local = tmp_path / "scratch"
    extra = start_workers(tmp_path, address, "--name", "gpu-box", "--nthreads", "1", "--resources", "GPU=1",
                          "--memory-limit", "0", "--local-directory", str(local), name="gpu-worker")
    try:
        wait_for(lambda: any(w["name"] == "gpu-box" for w in workers_of(client).values()), 30,
                 "the named worker registering", extra)
        gpu = [w for w in workers_of(client).values() if w["name"] == "gpu-box"][0]
        assert gpu["memory_limit"] == 0
        # tasks that need a GPU only run on the worker that has one
        facts = client.gather(client.map(worker_facts, range(6), resources={"GPU": 1}, pure=False))
        assert {name for name, _, _ in facts} == {"gpu-box"}
        directory = facts[0][1]
        assert directory == os.path.join(str(local), "gpu-box")
        assert os.path.isdir(directory)
        by_name = client.submit(worker_facts, workers="gpu-box", pure=False).result(timeout=30)
        assert by_name[0] == "gpu-box"
    finally:
        assert extra.stop() == 0, extra.output()
    wait_for(lambda: len(workers_of(client)) == 2, 15, "the named worker leaving", extra)


def test_sigterm_stops_worker_command_and_scheduler(tmp_path):
    sched, sched_file = start_scheduler(tmp_path, "own-scheduler")
    workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--nworkers", "2", "--nthreads", "1",
                            "--memory-limit", "auto", name="own-workers")
    client = None
    try:
        client = Client(scheduler_file=sched_file, set_as_default=False, timeout=30)
        wait_for(lambda: len(workers_of(client)) == 2, 30, "2 workers registered", sched, workers)
        # auto: each NUMA node's memory split among its workers
        expected = [s["memory_limit"] for s in plan_layout("2", 0, "auto", True)]
        assert sorted(w["memory_limit"] for w in workers_of(client).values()) == sorted(expected)
        assert abs(sum(expected) - total_memory()) <= 2
        assert client.submit(inc, 1).result(timeout=30) == 2
        children = workers.children()
        assert len(children) >= 2

        assert workers.stop(signal.SIGTERM, timeout=20) == 0, workers.output()
        for child in children:
            try:
                child.wait(10)
            except psutil.TimeoutExpired:
                pytest.fail(f"worker process {child.pid} still running after SIGTERM of its command")
        wait_for(lambda: len(workers_of(client)) == 0, 15, "the scheduler dropping the stopped workers", sched)
        client.close()
        client = None

        assert os.path.exists(sched_file)
        assert sched.stop(signal.SIGTERM, timeout=20) == 0, sched.output()
        assert not os.path.exists(sched_file), "the scheduler left its scheduler file behind"
        with pytest.raises((TimeoutError, OSError)):
            Client(scheduler_file=sched_file, set_as_default=False, timeout=1)
    finally:
        if client is not None:
            client.close()
        workers.stop(signal.SIGKILL)
        sched.stop(signal.SIGKILL)


def test_worker_command_exits_when_the_scheduler_stops(tmp_path):
    sched, sched_file = start_scheduler(tmp_path, "short-scheduler")
    workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--nworkers", "2", "--nthreads", "1",
                            name="short-workers")
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as client:
            wait_for(lambda: len(workers_of(client)) == 2, 30, "2 workers registered", sched, workers)
            children = workers.children()
        assert sched.stop(signal.SIGTERM, timeout=20) == 0, sched.output()
        try:
            assert workers.proc.wait(20) == 0, workers.output()
        except subprocess.TimeoutExpired:
            pytest.fail("rdask-worker kept running after its scheduler stopped\n" + workers.output())
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    finally:
        workers.stop(signal.SIGKILL)
        sched.stop(signal.SIGKILL)


def test_worker_command_rejects_bad_values(tmp_path):
    for bad in (["--memory-limit", "lots"], ["--resources", "GPU"]):
        proc = subprocess.run([WORKER, "tcp://127.0.0.1:1", *bad], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert "error" in proc.stderr.lower()


def test_scheduler_says_where_it_listens_and_warns_when_exposed_without_a_token(tmp_path):
    """Bound to every interface (the default), the scheduler logs that bind
    address and the one clients should use, and warns once that anyone who
    reaches the port can run code. With a token (here from a file, so it
    does not show in `ps`) it does not warn, and the token is enforced."""
    exposed = Command([SCHEDULER, "--port", "0"], tmp_path / "exposed.log")
    try:
        out = wait_for(lambda: "connect to" in (o := exposed.output()) and o, 30, "the listening line", exposed)
        assert re.search(r"bound to tcp://0\.0\.0\.0:\d+", out), out
        assert re.search(r"connect to tcp://[0-9.]+:\d+", out), out
        wait_for(lambda: "without a token" in exposed.output(), 10, "the exposure warning", exposed)
        assert exposed.output().count("without a token") == 1
    finally:
        assert exposed.stop() == 0
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-from-a-file\n")
    sched = Command([SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file)],
                    tmp_path / "tokened.log")
    try:
        out = wait_for(lambda: "connect to" in (o := sched.output()) and o, 30, "the listening line", sched)
        address = re.search(r"connect to (tcp://127\.0\.0\.1:\d+)", out).group(1)
        assert "s3cret" not in " ".join(psutil.Process(sched.pid).cmdline())
        with pytest.raises(AuthenticationError):
            Client(address, set_as_default=False, timeout=10)
        with Client(address, token="s3cret-from-a-file", set_as_default=False, timeout=10) as c:
            assert c.scheduler_info()["workers"] == {}
        assert "without a token" not in sched.output()
    finally:
        assert sched.stop() == 0


def test_a_worker_without_nanny_leaves_cleanly_on_sigterm(tmp_path):
    sched, sched_file = start_scheduler(tmp_path, "nonanny-scheduler")
    worker = start_workers(tmp_path, "--scheduler-file", sched_file, "--no-nanny", "--nthreads", "1",
                           name="nonanny-worker")
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as client:
            wait_for(lambda: len(workers_of(client)) == 1, 30, "the worker registering", sched, worker)
            assert client.submit(inc, 1).result(timeout=30) == 2
            assert worker.stop(signal.SIGTERM, timeout=20) == 0, worker.output()
            wait_for(lambda: len(workers_of(client)) == 0, 15, "the worker leaving", sched)
        wait_for(lambda: "worker is leaving" in sched.output(), 10, "the scheduler noting the goodbye", sched)
        assert "worker died" not in sched.output()
    finally:
        worker.stop(signal.SIGKILL)
        sched.stop(signal.SIGKILL)


def test_nannies_give_up_when_the_scheduler_is_gone(tmp_path):
    """The scheduler is killed: workers do not restart forever. Each tries
    to reach it for --death-timeout, then the worker command exits 1."""
    sched, sched_file = start_scheduler(tmp_path, "doomed-scheduler")
    workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--nworkers", "2", "--nthreads", "1",
                            "--death-timeout", "2", name="orphans")
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as client:
            wait_for(lambda: len(workers_of(client)) == 2, 30, "2 workers registered", sched, workers)
        sched.stop(signal.SIGKILL)
        try:
            rc = workers.proc.wait(45)
        except subprocess.TimeoutExpired:
            pytest.fail("rdask-worker kept restarting workers for a dead scheduler\n" + workers.output())
        assert rc == 1, workers.output()
        assert "could not reach its scheduler" in workers.output()
    finally:
        workers.stop(signal.SIGKILL)
        sched.stop(signal.SIGKILL)


def test_the_scheduler_process_gives_memory_back_after_a_large_graph(tmp_path):
    """The scheduler hosted in a Python process (`rdask-scheduler`) returns
    to near its starting memory once a 200k-task graph is released."""
    sched, sched_file = start_scheduler(tmp_path, "memory-scheduler")
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as client:
            proc = psutil.Process(sched.pid)
            base = proc.memory_info().rss
            # No workers: every task stays pending in the scheduler.
            futures = client.map(inc, range(200_000), pure=False)
            wait_for(lambda: client.scheduler_info()["tasks"] == 200_000, 60, "the graph arriving", sched)
            peak = proc.memory_info().rss
            assert peak - base > 40 << 20, (base, peak)
            client.cancel(futures)
            del futures
            wait_for(lambda: client.scheduler_info()["tasks"] == 0, 60, "the graph being forgotten", sched)
            wait_for(lambda: proc.memory_info().rss - base < (peak - base) / 4, 30,
                     f"memory going back (base {base >> 20} MiB, peak {peak >> 20} MiB)", sched)
    finally:
        sched.stop()


def affinity(_=None):
    return sorted(os.sched_getaffinity(0)), get_worker().name


def cpus_allowed(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(l for l in f if l.startswith("Cpus_allowed_list:"))
    return parse_cpu_list(line.split(":", 1)[1].strip())


def test_nworkers_auto_pins_one_worker_to_each_core(tmp_path):
    """`--nworkers auto`: one worker process per physical core, each bound
    to its own core (as the kernel reports it), registered with its CPUs and
    NUMA node, and its tasks run there."""
    cores = len(topology.read()["cores"])
    sched, sched_file = start_scheduler(tmp_path, "pinned-scheduler")
    workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--nworkers", "auto", name="pinned")
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as client:
            wait_for(lambda: len(workers_of(client)) == cores, 60, f"{cores} workers registered", sched, workers)
            info = list(workers_of(client).values())
            assert all(len(w["cpus"]) >= 1 and w["numa_node"] is not None and w["host"] for w in info), info
            registered = sorted(tuple(w["cpus"]) for w in info)
            assert len(set(registered)) == cores, f"each worker has its own core: {registered}"
            assert all(w["nthreads"] == 1 for w in info)
            # what the kernel says about each worker process
            kids = [p for p in workers.children() if "rdask.worker_process" in " ".join(p.cmdline())]
            assert len(kids) == cores
            assert sorted(tuple(cpus_allowed(p.pid)) for p in kids) == registered
            # and a task on each worker sees its worker's CPUs
            for w in info:
                cpus, name = client.submit(affinity, workers=[w["name"]], pure=False).result(timeout=30)
                assert (cpus, name) == (w["cpus"], w["name"])
        wait_for(lambda: "cpus=" in sched.output(), 10, "the placement in the scheduler's log", sched)
    finally:
        workers.stop()
        sched.stop()


def test_no_bind_leaves_workers_on_every_cpu(tmp_path):
    allowed = sorted(os.sched_getaffinity(0))
    sched, sched_file = start_scheduler(tmp_path, "unbound-scheduler")
    workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--nworkers", "2", "--no-bind", name="unbound")
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as client:
            wait_for(lambda: len(workers_of(client)) == 2, 60, "2 workers registered", sched, workers)
            assert all(w["cpus"] == [] and w["numa_node"] is None for w in workers_of(client).values())
            cpus, _ = client.submit(affinity, pure=False).result(timeout=30)
            assert cpus == allowed
    finally:
        workers.stop()
        sched.stop()


def test_rdask_topology_prints_the_machine_and_a_dry_run_layout():
    out = subprocess.run([RDASK, "topology"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "core(s)" in out.stdout and "would start" in out.stdout
    fixture = os.path.join(os.path.dirname(__file__), "..", "..", "worker", "tests", "fixtures", "dgx-like.xml")
    out = subprocess.run([RDASK, "topology", "--xml", fixture, "--nworkers", "4", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["topology"]["gpus"]) == 8
    assert [w["numa"] for w in data["workers"]] == [0, 1, 2, 3]
    bad = subprocess.run([RDASK, "topology", "--synthetic", "pack:banana"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "banana" in bad.stderr
    usage = subprocess.run([RDASK], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "topology" in usage.stderr


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "value, nworkers, expected",
    [
        ("4GiB", 1, 4 * GiB),
        ("4 GiB", 3, 4 * GiB),
        ("500MB", 1, 500_000_000),
        ("2kib", 1, 2048),
        ("1e9", 1, 10**9),
        (4e9, 1, 4 * 10**9),
        (0.5, 1, 4 * GiB),
        ("0.25", 1, 2 * GiB),
        ("auto", 1, 8 * GiB),
        ("auto", 4, 2 * GiB),
        ("AUTO", 3, 8 * GiB // 3),
        (0, 1, 0),
        ("0", 4, 0),
        (None, 1, 0),
    ],
)
def test_parse_memory_limit(value, nworkers, expected):
    assert parse_memory_limit(value, nworkers, total=8 * GiB) == expected


def test_parse_memory_limit_defaults_to_this_machine():
    assert parse_memory_limit("auto", 2) == total_memory() // 2
    assert parse_memory_limit(1.0) == total_memory()


@pytest.mark.parametrize("bad", ["lots", "4XB", "GiB", "4 GiB please", -1, "-4GiB"])
def test_parse_memory_limit_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        parse_memory_limit(bad, 1, total=8 * GiB)


def test_parse_resources():
    assert parse_resources("GPU=1 MEM=10e9") == {"GPU": 1.0, "MEM": 1e10}
    assert parse_resources("GPU=2,FOO=0.5") == {"GPU": 2.0, "FOO": 0.5}
    assert parse_resources("  GPU=1  ") == {"GPU": 1.0}
    assert parse_resources("") == {}
    assert parse_resources(None) == {}
    assert parse_resources({"GPU": 1}) == {"GPU": 1.0}
    for bad in ("GPU", "GPU=", "GPU=lots", "=1", "GPU=1 MEM"):
        with pytest.raises(ValueError):
            parse_resources(bad)


# ---------------------------------------------------------------- dask's flags
def test_job_script_flags_work_warn_or_say_why(tmp_path):
    """A Slurm/PBS script written for `dask scheduler`/`dask worker`: the
    flags that mean something work (--interface, --pid-file, --worker-port,
    --idle-timeout), cosmetic ones warn, unsupported ones name themselves
    and the reason; none is a bare argparse error."""
    sched_file = str(tmp_path / "s.json")
    pid_file = tmp_path / "scheduler.pid"
    sched = Command([SCHEDULER, "--interface", "lo", "--port", "0", "--scheduler-file", sched_file,
                     "--pid-file", str(pid_file), "--no-jupyter", "--dashboard-prefix", "/x", "--idle-timeout", "3",
                     "--no-dashboard"], tmp_path / "sched.log")
    worker_pid = tmp_path / "worker.pid"
    port = free_port()
    workers = None
    try:
        wait_for(lambda: pid_file.exists() and os.path.exists(sched_file), 30, "the pid and scheduler files", sched)
        assert int(pid_file.read_text()) == sched.pid
        assert "warning: --dashboard-prefix is accepted and ignored" in sched.output()
        workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--interface", "lo", "--worker-port",
                                str(port), "--nanny-port", "0", "--pid-file", str(worker_pid), name="flag-workers")
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as c:
            wait_for(lambda: len(workers_of(c)) == 1, 30, "the worker registering", sched, workers)
            (w,) = workers_of(c).values()
            assert w["address"] == f"tcp://127.0.0.1:{port}", w
            assert c.submit(inc, 1).result(timeout=30) == 2
        assert int(worker_pid.read_text()) == workers.pid
        workers.stop()
        workers = None
        assert not worker_pid.exists(), "the worker command removes its pid file"
        # no client and no task for 3 s: the scheduler shuts itself down
        try:
            sched.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("--idle-timeout did not stop the scheduler\n" + sched.output())
        assert "idle for 3 s; shutting down" in sched.output()
        assert not pid_file.exists()
    finally:
        if workers is not None:
            workers.stop(signal.SIGKILL)
        sched.stop(signal.SIGKILL)
    for command, args, why in (
        (SCHEDULER, ["--tls-cert", "c.pem"], "TLS needs --tls-ca-file and --tls-cert"),
        (WORKER, ["tcp://127.0.0.1:1", "--preload", "x.py"], "--preload is not supported"),
        (WORKER, ["tcp://127.0.0.1:1", "--contact-address", "tcp://10.0.0.1:9000"], "--contact-address is not supported"),
        (WORKER, ["tcp://127.0.0.1:1", "--protocol", "inproc"], "protocol 'inproc' is not supported"),
        (WORKER, ["tcp://127.0.0.1:1", "--nworkers", "2", "--worker-port", "9000"], "is one port for 2 workers"),
    ):
        out = subprocess.run([command, *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and why in out.stderr, (args, out.stderr)
        assert "unrecognized arguments" not in out.stderr


def test_worker_lifetime_restarts_the_worker(tmp_path):
    sched, sched_file = start_scheduler(tmp_path, "life-scheduler")
    workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--lifetime", "2s", "--lifetime-restart",
                            name="mortal")
    try:
        with Client(scheduler_file=sched_file, set_as_default=False, timeout=30) as c:
            wait_for(lambda: len(workers_of(c)) == 1, 30, "the worker registering", sched, workers)
            first = set(workers_of(c))
            wait_for(lambda: len(w := workers_of(c)) == 1 and set(w) != first, 30,
                     "a new worker after the first one's lifetime", sched, workers)
            assert c.submit(inc, 1).result(timeout=30) == 2
        assert "reached its lifetime of" in workers.output()
        assert "worker is leaving" in sched.output()
    finally:
        workers.stop(signal.SIGKILL)
        sched.stop(signal.SIGKILL)


def free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_durations_and_port_ranges():
    from rdask.cli import parse_seconds, worker_ports

    assert [parse_seconds(t) for t in ("90", "90s", "30m", "1 hour", "2h", "0.5 minutes")] == [90, 90, 1800, 3600, 7200, 30]
    with pytest.raises(ValueError):
        parse_seconds("soon")
    assert worker_ports("0", 3) == [0, 0, 0]
    assert worker_ports("9000:9010", 3) == [9000, 9001, 9002]
    with pytest.raises(ValueError):
        worker_ports("9000:9001", 3)
