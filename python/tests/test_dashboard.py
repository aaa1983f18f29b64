"""The scheduler's dashboard against real worker processes: pages, the JSON
API and its live events, /metrics read with Prometheus' own parser, links
and reprs, and the page itself in a headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rdask import Client, LocalCluster, get_task_stream, performance_report


def slow_inc(x, delay=0.0):
    time.sleep(delay)
    return x + 1


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def base(cluster) -> str:
    return cluster.dashboard_link.rsplit("/", 1)[0]


def snapshot(cluster) -> dict:
    return json.loads(get(base(cluster) + "/api/snapshot")[2])


def metrics(cluster) -> dict:
    out = {}
    for family in text_string_to_metric_families(get(base(cluster) + "/metrics")[2]):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def dash():
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        yield cluster, client


def test_links_and_pages(dash):
    cluster, client = dash
    assert cluster.dashboard_link.startswith("http://127.0.0.1:") and cluster.dashboard_link.endswith("/status")
    assert client.dashboard_link == cluster.dashboard_link
    assert cluster.dashboard_link in repr(cluster) and cluster.dashboard_link in repr(client)
    html = client._repr_html_()
    assert cluster.dashboard_link in html and "Workers" in html and "Threads" in html
    assert get(base(cluster) + "/health")[2] == "ok"
    status, kind, page = get(base(cluster) + "/status")
    assert status == 200 and kind.startswith("text/html") and "EventSource" in page
    assert "rdask workers" in get(base(cluster) + "/workers")[2]
    info = get(base(cluster) + "/info")[2]
    assert cluster.scheduler_address in info
    with pytest.raises(urllib.error.HTTPError) as e:
        get(base(cluster) + "/no-such-page")
    assert e.value.code == 404


def test_metrics_match_the_cluster(dash):
    cluster, client = dash
    futures = client.map(slow_inc, range(30), pure=False)
    assert client.gather(futures) == list(range(1, 31))
    deadline = time.monotonic() + 10
    while True:
        m = metrics(cluster)
        if m[("dask_scheduler_tasks", (("state", "memory"),))] == 30 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert m[("dask_scheduler_workers", ())] == 2
    assert m[("dask_scheduler_clients", ())] >= 1
    assert m[("dask_scheduler_tasks", (("state", "memory"),))] == 30
    assert m[("dask_scheduler_tasks", (("state", "erred"),))] == 0
    info = client.scheduler_info()
    for address, w in info["workers"].items():
        labels = (("name", w["name"]), ("worker", address))
        assert m[("dask_worker_threads", labels)] == 1
        assert m[("dask_worker_memory_limit_bytes", labels)] == w["memory_limit"]
    assert m[("dask_scheduler_tasks_finished_total", ())] >= 30
    del futures


def make_block(n):
    import numpy as np

    return np.ones(n)


def total(x):
    return float(x.sum())


def test_workers_report_transfers_in_their_heartbeats(dash):
    cluster, client = dash
    names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
    block = client.submit(make_block, 2_000_000, workers=[names[0]], pure=False)   # 16 MB
    assert client.submit(total, block, workers=[names[1]], pure=False).result(timeout=30) == 2_000_000
    deadline = time.monotonic() + 10
    while True:
        rows = {w["name"]: w for w in snapshot(cluster)["workers"]}
        if rows[names[1]]["bytes_in"] >= 16_000_000 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows[names[1]]["bytes_in"] >= 16_000_000, rows
    assert rows[names[0]]["bytes_out"] >= 16_000_000, rows
    m = metrics(cluster)
    incoming = {dict(labels)["name"]: v for (name, labels), v in m.items()
                if name == "dask_worker_transfer_incoming_bytes_total"}
    assert incoming[names[1]] >= 16_000_000


def test_the_api_shows_progress_by_task_prefix_and_worker_load(dash):
    cluster, client = dash
    futures = client.map(slow_inc, range(40), pure=False)
    client.gather(futures)
    deadline = time.monotonic() + 10
    while True:
        s = snapshot(cluster)
        rows = {p["prefix"]: p for p in s["prefixes"]}
        done = rows.get("slow_inc", {}).get("done")
        if done == 40 and all(w["rss"] > 0 for w in s["workers"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert rows["slow_inc"]["total"] == 40 and rows["slow_inc"]["done"] == 40
    assert len(s["workers"]) == 2
    assert all(w["rss"] > 0 and w["nthreads"] == 1 for w in s["workers"]), s["workers"]
    del futures


def test_live_events_stream_snapshots(dash):
    cluster, _ = dash
    with urllib.request.urlopen(base(cluster) + "/api/events", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = r.readline().decode()
        assert first.startswith("data: ")
        assert json.loads(first[len("data: "):])["address"] == cluster.scheduler_address
        r.readline()  # the blank line that ends the event
        second = r.readline().decode()  # the next snapshot, within a second
        assert second.startswith("data: ")


def test_dashboard_off_and_port_in_use():
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False, timeout=30) as client:
        assert cluster.dashboard_link is None and client.dashboard_link is None
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=f":{port}") as cluster:
            link = cluster.dashboard_link
            assert link and f":{port}/" not in link, link
            assert get(link.rsplit("/", 1)[0] + "/health")[2] == "ok"
    finally:
        taken.close()


def test_the_scheduler_command_logs_its_dashboard(tmp_path):
    sched = os.path.join(os.path.dirname(sys.executable), "rdask-scheduler")
    proc = subprocess.Popen([sched, "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while "dashboard at" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        # The Rust log line and the command's own line say the same; take
        # the first link on the line (they may share one when they race).
        import re

        found = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/status)", line)
        assert found, line
        link = found.group(1)
        assert get(link)[0] == 200
    finally:
        proc.terminate()
        proc.wait(20)


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_the_status_page_in_a_browser_follows_a_running_graph(dash, tmp_path):
    """Headless Chromium renders /status while 24 half-second tasks run on
    2 workers; the progress it shows rises, and ends at the true totals.
    (`?poll=` makes the page poll the JSON API: a headless dump waits for
    the network to go quiet, which an event stream never does; the stream
    itself is tested above.)"""
    cluster, client = dash

    def dom(extra=()):
        profile = tempfile.mkdtemp(dir=tmp_path)
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=2500",
                              *extra, "--dump-dom", cluster.dashboard_link + "?poll=200"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout

    def progress(html: str):
        import re
        m = re.search(r'data-prefix="slow_inc" data-done="(\d+)" data-total="(\d+)"', html)
        return (int(m.group(1)), int(m.group(2))) if m else None

    futures = client.map(slow_inc, range(24), [0.5] * 24, pure=False)
    seen = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        p = progress(dom())
        if p:
            seen.append(p)
            if p[0] == 24:
                break
    assert client.gather(futures) == list(range(1, 25))
    assert seen and seen[-1] == (24, 24), seen
    assert any(done < 24 for done, _ in seen), f"never saw the graph in progress: {seen}"
    # the live task stream drew the runs (one rect per run, per prefix)
    assert dom().count('class="task" data-prefix="slow_inc"') >= 20
    shot = tmp_path / "status.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
                    "--virtual-time-budget=2500", "--window-size=1100,800", f"--screenshot={shot}",
                    cluster.dashboard_link + "?poll=200"], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 5000
    artifacts = os.environ.get("RDASK_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(shot, os.path.join(artifacts, "dashboard-status.png"))
    del futures


def test_task_stream_and_its_context_manager(dash):
    cluster, client = dash
    addresses = set(client.scheduler_info()["workers"])
    start = time.time()
    with get_task_stream(client) as ts:
        assert client.gather(client.map(slow_inc, range(12), [0.05] * 12, pure=False)) == list(range(1, 13))
    assert len(ts.data) == 12
    for e in ts.data:
        assert e["key"].startswith("slow_inc-") and e["worker"] in addresses and e["status"] == "OK"
        (ss,) = e["startstops"]
        assert ss["action"] == "compute" and ss["stop"] - ss["start"] >= 0.045
        assert start - 1 <= ss["start"] <= ss["stop"] <= time.time() + 1
    recent = client.get_task_stream(start=start)
    assert {e["key"] for e in ts.data} <= {e["key"] for e in recent}
    assert len(client.get_task_stream(start=start, count=3)) == 3
    with pytest.raises(NotImplementedError):
        client.get_task_stream(plot=True)
    with pytest.raises(NotImplementedError, match="profiler"):
        client.profile()


def test_performance_report_writes_a_self_contained_page(dash, tmp_path):
    cluster, client = dash
    path = tmp_path / "report.html"
    with performance_report(filename=str(path), client=client):
        client.gather(client.map(slow_inc, range(10), [0.02] * 10, pure=False))
    page = path.read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert "Task stream" in page and "Worker timelines" in page
    assert page.count("<rect ") == 10
    for address in client.scheduler_info()["workers"]:
        assert address in page
