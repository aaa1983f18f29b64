"""Diagnostics as in distributed: the task stream (`client.get_task_stream`,
`with get_task_stream() as ts`) and `performance_report`, a self-contained
HTML file with the task stream and each worker's timeline."""

from __future__ import annotations

import html
import time

from . import _rdask


def _events(client, start: float | None = None, stop: float | None = None, count: int | None = None) -> list[dict]:
    """Task runs as distributed's `get_task_stream` returns them."""
    since_us = int((start or 0) * 1e6)
    out = []
    for key, worker, thread, start_us, stop_us, ok in client._rc.task_stream(since_us):
        if stop is not None and start_us / 1e6 > stop:
            continue
        out.append({
            "key": key,
            "worker": worker,
            "thread": thread,
            "status": "OK" if ok else "error",
            "startstops": ({"action": "compute", "start": start_us / 1e6, "stop": stop_us / 1e6},),
        })
    if count is not None:
        out = out[-count:]
    return out


class get_task_stream:
    """`with get_task_stream(client) as ts: ...` collects the task runs
    between entry and exit into `ts.data`. `plot=True` is not supported
    (there is no Bokeh here); `filename=` writes the task stream as HTML."""

    def __init__(self, client=None, plot: bool = False, filename: str = "task-stream.html"):
        if plot:
            raise NotImplementedError("rdask draws no Bokeh plots; use filename= or performance_report")
        from .client import default_client

        self.client = client if client is not None else default_client()
        if self.client is None:
            raise ValueError("get_task_stream needs a client")
        self.filename = filename if filename != "task-stream.html" else None
        self.data: list[dict] = []

    def __enter__(self):
        self.start = time.time()
        _events(self.client, self.start)  # asks the scheduler to keep task runs from now on
        return self

    def __exit__(self, *exc):
        time.sleep(0.05)  # the last runs' spans travel with their results
        self.data = _events(self.client, self.start)
        if self.filename:
            with open(self.filename, "w") as f:
                f.write(_report_html("rdask task stream", self.data, {}, self.start, time.time()))


class performance_report:
    """`with performance_report(filename="dask-report.html"): ...` writes a
    self-contained HTML file: the task stream of everything that ran inside
    the block (per worker thread), each worker's busy time, task counts per
    prefix, and the cluster as it was at the end."""

    def __init__(self, filename: str = "dask-report.html", client=None):
        self.filename = filename
        self.client = client

    def __enter__(self):
        from .client import default_client

        self.client = self.client if self.client is not None else default_client()
        if self.client is None:
            raise ValueError("performance_report needs a client (none is running)")
        self.start = time.time()
        _events(self.client, self.start)  # asks the scheduler to keep task runs from now on
        return self

    def __exit__(self, *exc):
        stop = time.time()
        time.sleep(0.05)
        events = _events(self.client, self.start)
        info = self.client.scheduler_info()
        with open(self.filename, "w") as f:
            f.write(_report_html("rdask performance report", events, info, self.start, stop))


_PALETTE = ["#3b82c4", "#f0ad4e", "#5cb85c", "#d9534f", "#8e6cc9", "#2bb3b3", "#c47f3b", "#7a7a7a"]


def _prefix(key: str) -> str:
    """The key's name part, grouped as the dashboard groups it."""
    return _rdask.key_prefix(key)


def _report_html(title: str, events: list[dict], info: dict, start: float, stop: float) -> str:
    """One self-contained page (inline SVG and CSS, no scripts)."""
    lanes = sorted({(e["worker"], e["thread"]) for e in events})
    lane_of = {lane: i for i, lane in enumerate(lanes)}
    t0 = min([start] + [e["startstops"][0]["start"] for e in events])
    t1 = max([stop] + [e["startstops"][0]["stop"] for e in events])
    span = max(t1 - t0, 1e-6)
    width, lane_h, left = 1000, 18, 180
    prefixes = sorted({_prefix(e["key"]) for e in events})
    color = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(prefixes)}
    rects = []
    for e in events:
        s = e["startstops"][0]
        x = left + (s["start"] - t0) / span * width
        w = max(1.0, (s["stop"] - s["start"]) / span * width)
        y = 10 + lane_of[(e["worker"], e["thread"])] * lane_h
        fill = "#000" if e["status"] != "OK" else color[_prefix(e["key"])]
        tip = html.escape(f"{e['key']} on {e['worker']} thread {e['thread']}: {1000 * (s['stop'] - s['start']):.2f} ms")
        rects.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{lane_h - 4}" fill="{fill}"><title>{tip}</title></rect>')
    labels = "".join(f'<text x="4" y="{10 + i * lane_h + 11}" font-size="11">{html.escape(w)} #{t}</text>'
                     for (w, t), i in lane_of.items())
    height = 20 + len(lanes) * lane_h
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{height}">'
           f"{labels}{''.join(rects)}</svg>")
    busy: dict[str, float] = {}
    per_prefix: dict[str, list] = {}
    for e in events:
        s = e["startstops"][0]
        busy[e["worker"]] = busy.get(e["worker"], 0.0) + (s["stop"] - s["start"])
        row = per_prefix.setdefault(_prefix(e["key"]), [0, 0.0])
        row[0] += 1
        row[1] += s["stop"] - s["start"]
    workers = info.get("workers", {}) if info else {}
    worker_rows = "".join(
        f"<tr><td>{html.escape(addr)}</td><td>{html.escape(str(w.get('name', '')))}</td><td>{w.get('nthreads', '')}</td>"
        f"<td>{busy.get(addr, 0.0):.3f} s</td><td>{100 * busy.get(addr, 0.0) / span / max(1, w.get('nthreads', 1)):.0f}%</td></tr>"
        for addr, w in workers.items())
    timeline = "".join(
        f'<tr><td>{html.escape(addr)}</td><td><div style="background:#eee;width:400px;height:12px">'
        f'<div style="background:#3b82c4;height:12px;width:{min(400, 400 * b / span):.0f}px"></div></div></td></tr>'
        for addr, b in sorted(busy.items()))
    prefix_rows = "".join(
        f'<tr><td><span style="color:{color[p]}">■</span> {html.escape(p)}</td><td>{n}</td><td>{t:.3f} s</td></tr>'
        for p, (n, t) in sorted(per_prefix.items()))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{font:13px system-ui,sans-serif;margin:1.2em}td,th{padding:2px 10px;text-align:left}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>"
            f"<p>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))}, {stop - start:.3f} s wall, "
            f"{len(events)} task runs on worker threads</p>"
            f"<h2>Task stream</h2>{svg}"
            f"<h2>Worker timelines</h2><table>{timeline}</table>"
            f"<h2>Workers</h2><table><tr><th>address</th><th>name</th><th>threads</th><th>busy</th><th>use</th></tr>{worker_rows}</table>"
            f"<h2>Task prefixes</h2><table><tr><th>prefix</th><th>runs</th><th>time</th></tr>{prefix_rows}</table>"
            "</body></html>")
