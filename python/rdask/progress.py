"""`progress`: a live progress bar for futures or persisted collections, as
text in a terminal and as a widget in notebooks (when ipywidgets is there)."""

from __future__ import annotations

import sys
import threading
import time

import dask

from .packing import flatten_futures


def _futures_of(objs) -> list:
    out = []
    for o in objs:
        if dask.is_dask_collection(o):
            from dask.base import collections_to_expr  # noqa: F401

            graph = o.__dask_graph__()
            out.extend(v for v in dict(graph).values() if hasattr(v, "_state"))
        else:
            out.extend(flatten_futures(o))
    return out


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        ip = get_ipython()
        return ip is not None and "IPKernelApp" in ip.config
    except Exception:
        return False


class TextProgressBar:
    def __init__(self, futures, width: int = 40, interval: float = 0.1, file=None):
        self.futures = futures
        self.width = width
        self.interval = interval
        self.file = file or sys.stdout
        self.start = time.monotonic()

    def fraction(self) -> float:
        if not self.futures:
            return 1.0
        return sum(f.done() for f in self.futures) / len(self.futures)

    def render(self, frac: float) -> str:
        bar = "#" * int(self.width * frac)
        return f"\r[{bar:<{self.width}}] | {frac * 100:3.0f}% Completed | {time.monotonic() - self.start:5.1f}s"

    def run(self):
        while True:
            frac = self.fraction()
            self.file.write(self.render(frac))
            self.file.flush()
            if frac >= 1.0:
                self.file.write("\n")
                self.file.flush()
                return
            time.sleep(self.interval)


class WidgetProgressBar:
    def __init__(self, futures):
        import ipywidgets
        from IPython.display import display

        self.futures = futures
        self.bar = ipywidgets.IntProgress(min=0, max=max(1, len(futures)), description="rdask")
        self.label = ipywidgets.HTML()
        display(ipywidgets.HBox([self.bar, self.label]))
        self.done = 0
        self.lock = threading.Lock()
        for f in futures:
            f.add_done_callback(self._one)
        self._update()

    def _one(self, _):
        with self.lock:
            self.done += 1
            self._update()

    def _update(self):
        self.bar.value = self.done
        self.label.value = f"{self.done} / {len(self.futures)}"


def progress(*futures, notebook: bool | None = None, multi: bool = False, complete: bool = True, **kwargs):
    """Shows progress of futures (or persisted collections). Blocks in a
    terminal until they are done; returns a widget at once in a notebook."""
    futs = _futures_of(futures)
    if notebook is None:
        notebook = _in_notebook()
    if notebook:
        try:
            return WidgetProgressBar(futs)
        except ImportError:
            pass
    TextProgressBar(futs, **kwargs).run()
