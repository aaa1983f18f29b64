"""TLS clusters: mutual authentication with the cluster's CA, on every
connection (client, scheduler, worker to worker)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import rdask
from rdask import Client, LocalCluster, Security


def inc(x):
    return x + 1


def total(*xs):
    return sum(xs)


def _client_attempt(address: str, ca: str | None, cert: str | None, key: str | None) -> subprocess.CompletedProcess:
    """A client in its own process (the TLS identity is process-wide)."""
    code = textwrap.dedent(f"""
        import rdask
        sec = rdask.Security(tls_ca_file={ca!r}, tls_client_cert={cert!r}, tls_client_key={key!r}) if {cert!r} else None
        c = rdask.Client({address!r}, security=sec, timeout=5)
        print("RESULT", c.submit(sum, [1, 2]).result())
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _plain_tcp_afterwards():
    """The TLS identity is process-wide: later tests of this session use plain TCP."""
    yield
    rdask._rdask.configure_tls(None, None, None, False)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    sec = Security.temporary(str(tmp_path_factory.mktemp("tls")))
    with LocalCluster(n_workers=2, threads_per_worker=1, security=sec, dashboard_address=None) as cluster:
        yield cluster, sec


def test_a_tls_cluster_computes_with_worker_to_worker_transfers(tls_cluster):
    cluster, sec = tls_cluster
    assert cluster.scheduler_address.startswith("tls://")
    with Client(cluster.scheduler_address, security=sec) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2 and all(a.startswith("tls://") for a in workers), workers
        a, b = sorted(workers)
        # Inputs on both workers: one of them fetches from the other over TLS.
        xs = [client.submit(inc, i, workers=[a if i % 2 else b]) for i in range(10)]
        assert client.submit(total, *xs).result() == sum(range(1, 11))
        import numpy as np

        big = client.submit(np.arange, 5_000_000, workers=[a])
        assert client.submit(lambda v: int(v.sum()), big, workers=[b]).result() == int(np.arange(5_000_000).sum())


def test_a_client_with_the_right_certificate_in_another_process_works(tls_cluster):
    cluster, sec = tls_cluster
    r = _client_attempt(cluster.scheduler_address, sec.tls_ca_file, sec.tls_client_cert, sec.tls_client_key)
    assert "RESULT 3" in r.stdout, r.stderr


def test_a_client_without_a_certificate_is_refused(tls_cluster):
    cluster, _ = tls_cluster
    r = _client_attempt(cluster.scheduler_address, None, None, None)
    assert r.returncode != 0 and "RESULT" not in r.stdout
    assert "--tls-ca-file" in r.stderr or "rdask.Security" in r.stderr, r.stderr
    # A plain TLS client (Python's ssl, no certificate) is refused by the server itself.
    import socket
    import ssl

    host, port = cluster.scheduler_address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"x" * 64)
                # TLS 1.3: the refusal of the missing certificate arrives as an alert on read.
                if not s.recv(1):
                    raise ConnectionError("closed")


def test_a_client_with_a_certificate_from_another_ca_is_refused(tls_cluster, tmp_path):
    cluster, sec = tls_cluster
    other = Security.temporary(str(tmp_path))
    # Its certificate is signed by another CA; it even trusts ours.
    r = _client_attempt(cluster.scheduler_address, sec.tls_ca_file, other.tls_client_cert, other.tls_client_key)
    assert r.returncode != 0 and "RESULT" not in r.stdout, r.stdout
    # Trusting only its own CA, it refuses our scheduler too.
    r = _client_attempt(cluster.scheduler_address, other.tls_ca_file, other.tls_client_cert, other.tls_client_key)
    assert r.returncode != 0 and "invalid peer certificate" in r.stderr, r.stderr


def test_cli_scheduler_and_workers_with_dask_tls_flags(tmp_path):
    from test_cli import Command, start_scheduler, start_workers, wait_for

    sec = Security.temporary(str(tmp_path / "certs"))
    flags = ["--tls-ca-file", sec.tls_ca_file, "--tls-cert", sec.tls_scheduler_cert, "--tls-key", sec.tls_scheduler_key]
    sched, sched_file = start_scheduler(tmp_path, "scheduler", "--no-dashboard", *flags)
    workers = None
    try:
        wait_for(lambda: os.path.exists(sched_file), 30, "scheduler file", sched)
        import json

        with open(sched_file) as f:
            address = json.load(f)["address"]
        assert address.startswith("tls://127.0.0.1:"), address
        workers = start_workers(tmp_path, "--scheduler-file", sched_file, "--nworkers", "2", "--nthreads", "1",
                                "--memory-limit", "0", *flags)
        with Client(address, security=sec, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
            xs = client.map(inc, range(20))
            assert client.submit(total, *xs).result() == sum(range(1, 21))
        # Plain tcp:// to a TLS scheduler gets nowhere.
        plain = _client_attempt(address.replace("tls://", "tcp://"), None, None, None)
        assert plain.returncode != 0 and "RESULT" not in plain.stdout
    finally:
        if workers is not None:
            workers.stop()
        sched.stop()


def test_tls_flag_mistakes_are_named(tmp_path):
    from test_cli import SCHEDULER

    r = subprocess.run([SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--tls-cert", str(tmp_path / "c.pem")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--tls-ca-file" in r.stderr, r.stderr
    missing = str(tmp_path / "missing-ca.pem")
    r = subprocess.run([SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--tls-ca-file", missing,
                        "--tls-cert", missing], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "missing-ca.pem" in r.stderr, r.stderr
    r = subprocess.run([SCHEDULER, "--host", "127.0.0.1", "--port", "0", "--protocol", "tls"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--tls-ca-file" in r.stderr, r.stderr
