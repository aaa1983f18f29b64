"""Chaos: a large graph runs while worker processes are killed (SIGKILL)
again and again; their nannies bring them back. The answer must be right
and nothing may hang. `pytest -m chaos` runs the long form (set
RDASK_CHAOS_SECONDS); CI runs the short form as part of the suite."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from rdask import Client, LocalCluster

pytestmark = pytest.mark.chaos


def inc(x):
    return x + 1


def add_all(*xs):
    return sum(xs)


def test_a_large_graph_survives_workers_killed_again_and_again():
    """100k tasks (a map and a two-level sum over it) on 3 workers while one
    random worker process is SIGKILLed every RDASK_CHAOS_INTERVAL seconds,
    graph after graph, for RDASK_CHAOS_SECONDS (5 s and 0.4 s in CI). A
    nanny restarts its worker at most 10 times a minute, so long runs kill
    every 2.5 s by default (fewer than 10 deaths a minute per worker)."""
    seconds = float(os.environ.get("RDASK_CHAOS_SECONDS", "5"))
    interval = float(os.environ.get("RDASK_CHAOS_INTERVAL", "0.4" if seconds <= 10 else "2.5"))
    n = 100_000
    offset = random.Random(7).randrange(3)
    with LocalCluster(n_workers=3, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False, timeout=60) as client:
        stop = threading.Event()
        kills = []

        def killer():
            deadline = time.monotonic() + seconds
            while not stop.is_set() and time.monotonic() < deadline:
                stop.wait(interval)
                # Round-robin over the workers (from a random start), so no
                # nanny reaches its restart limit by bad luck.
                names = sorted(cluster.workers)
                victim = cluster.workers[names[(offset + len(kills)) % len(names)]]
                if victim.is_alive() and not stop.is_set():
                    try:
                        os.kill(victim.pid, signal.SIGKILL)
                        kills.append(victim.pid)
                    except ProcessLookupError:
                        pass

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        graphs = 0
        started = time.monotonic()
        try:
            while graphs == 0 or time.monotonic() - started < seconds:
                mapped = client.map(inc, range(n), pure=False)
                chunks = [client.submit(add_all, *mapped[i:i + 1000], pure=False) for i in range(0, n, 1000)]
                total = client.submit(add_all, *chunks, pure=False)
                assert total.result(timeout=600) == n * (n + 1) // 2, f"wrong answer in graph {graphs}"
                graphs += 1
                del mapped, chunks, total
        finally:
            stop.set()
            t.join()
        print(f"{graphs} graphs of {n + n // 1000 + 1} tasks, {len(kills)} workers killed", flush=True)
        assert len(kills) >= 3, f"only {len(kills)} kills happened"
        # The cluster is whole again and still computes.
        deadline = time.monotonic() + 60
        while len(client.scheduler_info()["workers"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.submit(inc, 41).result(timeout=60) == 42


def slow_inc(x):
    time.sleep(0.25)
    return x + 1


class NetNs:
    """A network namespace joined to this one by a veth pair with private
    addresses (10.231.N.1 here, 10.231.N.2 inside): a second host on this
    machine, whose link can be cut. Needs root and iproute2."""

    def __init__(self):
        import shutil
        import subprocess

        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("network namespaces need root and iproute2")
        n = os.getpid() % 200 + 20
        self.name, self.outer, self.inner = f"rdask-part-{os.getpid()}", f"rdp{n}a", f"rdp{n}b"
        self.host_ip, self.ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"
        self._run = lambda *a: subprocess.run(["ip", *a], capture_output=True, text=True)
        steps = [
            ("netns", "add", self.name),
            ("link", "add", self.outer, "type", "veth", "peer", "name", self.inner),
            ("link", "set", self.inner, "netns", self.name),
            ("addr", "add", f"{self.host_ip}/30", "dev", self.outer),
            ("link", "set", self.outer, "up"),
            ("netns", "exec", self.name, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.inner),
            ("netns", "exec", self.name, "ip", "link", "set", self.inner, "up"),
            ("netns", "exec", self.name, "ip", "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = self._run(*step)
            if r.returncode != 0:
                self.close()
                pytest.skip(f"cannot build a network namespace here (ip {' '.join(step)}: {r.stderr.strip()})")

    def cut(self):
        """Drops every packet between the namespace and here (the link stays up,
        as when a switch port dies: no reset reaches either end)."""
        r = self._run("link", "set", self.outer, "down")
        assert r.returncode == 0, r.stderr

    def close(self):
        self._run("link", "del", self.outer)
        self._run("netns", "del", self.name)


def test_a_worker_cut_off_by_a_network_partition_is_dropped_and_its_work_redone(tmp_path):
    """A worker in another network namespace loses its link mid-graph: the
    scheduler hears nothing from it for --worker-timeout, drops it, and the
    worker on this side recomputes what was lost. The answer is right."""
    import json
    import subprocess
    import sys

    from test_cli import Command, wait_for

    ns = NetNs()
    bindir = os.path.dirname(sys.executable)
    sched = workers_here = worker_there = None
    try:
        sched_file = tmp_path / "sched.json"
        sched = Command([os.path.join(bindir, "rdask-scheduler"), "--host", ns.host_ip, "--port", "0",
                         "--no-dashboard", "--worker-timeout", "4", "--scheduler-file", str(sched_file)],
                        tmp_path / "scheduler.log")
        wait_for(lambda: sched_file.exists(), 30, "scheduler file", sched)
        address = json.loads(sched_file.read_text())["address"]
        worker = [os.path.join(bindir, "rdask-worker"), address, "--nthreads", "2", "--memory-limit", "0"]
        workers_here = Command(worker + ["--name", "here", "--listen-host", ns.host_ip], tmp_path / "here.log")
        worker_there = Command(["ip", "netns", "exec", ns.name] + worker
                               + ["--name", "there", "--listen-host", ns.ns_ip, "--no-nanny"], tmp_path / "there.log")
        with Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
            assert set(names) == {"here", "there"}, names
            parts = client.map(slow_inc, range(40), pure=False)
            time.sleep(1.0)  # both workers are busy with the first tasks
            ns.cut()
            cut_at = time.monotonic()
            total = client.submit(add_all, *parts, workers=[names["here"]], pure=False)
            assert total.result(timeout=120) == sum(range(1, 41))
            gone = [w["name"] for w in client.scheduler_info()["workers"].values()]
            assert gone == ["here"], gone
        assert "dropping worker" in sched.output(), sched.output()
        print(f"partition to right answer: {time.monotonic() - cut_at:.1f} s", flush=True)
    finally:
        # `ip netns exec` runs the worker in its own place (exec): killing
        # it kills the worker; the others leave on SIGTERM with their children.
        if worker_there is not None:
            worker_there.stop(signal.SIGKILL)
        for c in (workers_here, sched):
            if c is not None:
                c.stop()
        ns.close()
