"""Plugins as in distributed, end to end on worker processes:
Client.register_plugin / register_worker_plugin / unregister_worker_plugin
with WorkerPlugin (setup on current, later and restarted workers, teardown,
replacement, idempotent, transition), PipInstall, UploadFile, and the
refusal of scheduler and nanny plugins."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import time
import types
import uuid
import zipfile

import pytest

import rdask
from rdask import Client, LocalCluster, PipInstall, SchedulerPlugin, UploadFile, WorkerPlugin

# In each worker process: what the plugins of this module did there.
EVENTS: list = []


class Recorder(WorkerPlugin):
    """Records its setup and teardown in EVENTS and on the worker object,
    and (with a folder) as empty files named after what happened where."""

    def __init__(self, tag, folder=None):
        self.tag = tag
        self.folder = None if folder is None else str(folder)

    def setup(self, worker):
        EVENTS.append(("setup", self.tag))
        worker.recorded = getattr(worker, "recorded", []) + [self.tag]
        self._note(worker, "setup")

    def teardown(self, worker):
        EVENTS.append(("teardown", self.tag))
        self._note(worker, "teardown")

    def _note(self, worker, what):
        if self.folder:
            open(os.path.join(self.folder, f"{what}-{self.tag}-{worker.name}-{os.getpid()}"), "w").close()


class Transitions(WorkerPlugin):
    name = "transitions"

    def setup(self, worker):
        self.seen = worker.seen_transitions = []

    def transition(self, key, start, finish, **kwargs):
        self.seen.append((key, start, finish))


class AsyncSetup(WorkerPlugin):
    async def setup(self, worker):
        EVENTS.append(("async-setup", worker.name))


class BrokenSetup(WorkerPlugin):
    name = "broken"

    def setup(self, worker):
        raise ZeroDivisionError("setup broke on purpose")


class DuckWorkerPlugin:
    """No base class: a setup method is enough."""

    def setup(self, worker):
        EVENTS.append(("duck", worker.name))

    def teardown(self, worker):
        EVENTS.append(("duck-teardown", worker.name))


class MySchedulerPlugin(SchedulerPlugin):
    def add_worker(self, scheduler, worker):
        pass


class DuckSchedulerPlugin:
    def start(self, scheduler):
        pass

    def add_worker(self, scheduler, worker):
        pass


# stand-ins for distributed.diagnostics.plugin's classes (distributed is not
# installed here): a plugin deriving from distributed's WorkerPlugin
class FakeDistWorkerPlugin:
    def setup(self, worker):
        pass

    def teardown(self, worker):
        pass


class FakeDistSchedulerPlugin:
    pass


class FakeDistNannyPlugin:
    def setup(self, nanny):
        pass


class DistSubclass(FakeDistWorkerPlugin):
    name = "from-distributed"

    def setup(self, worker):
        EVENTS.append(("distributed-subclass", worker.name))


# ---------------------------------------------------------------- task functions
def events():
    return list(EVENTS)


def pid_and_events():
    return os.getpid(), list(EVENTS)


def plugin_names():
    return sorted(rdask.get_worker().plugins)


def recorded():
    return getattr(rdask.get_worker(), "recorded", [])


def seen_transitions():
    return list(getattr(rdask.get_worker(), "seen_transitions", []))


def inc(x):
    return x + 1


def explode():
    raise ValueError("boom")


def import_value(module):
    import importlib

    return importlib.import_module(module).VALUE


def use_module(name):
    import importlib

    return importlib.import_module(name).f()


# ---------------------------------------------------------------- helpers
def quick_cluster(n=1, **kwargs):
    kwargs.setdefault("dashboard_address", None)
    return LocalCluster(n_workers=n, threads_per_worker=1, memory_limit="1GiB", **kwargs)


def addresses(client):
    return sorted(client.scheduler_info()["workers"])


def notes(folder, what):
    return sorted(f for f in os.listdir(folder) if f.startswith(what + "-"))


def wait_for(predicate, timeout=30.0, what="condition"):
    from conftest import wait_until

    return wait_until(predicate, timeout, 0.05, what)


def build_wheel(folder, dist: str, value) -> str:
    """A pure-Python wheel built by hand (a zip with a .dist-info folder):
    pip cannot build a source tree offline here (no `wheel` package)."""
    version = "0.1"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": f"VALUE = {value!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: rdask-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = os.path.join(str(folder), f"{dist}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def pip_uninstall(dist: str):
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", dist], capture_output=True,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"), timeout=60)


OFFLINE = ["--no-deps", "--no-index"]


# ---------------------------------------------------------------- setup everywhere
def test_setup_runs_on_current_later_and_restarted_workers(tmp_path):
    with quick_cluster(2) as cluster, Client(cluster, set_as_default=False) as c:
        out = c.register_plugin(Recorder("a", tmp_path), name="rec")
        assert out == {a: {"status": "OK"} for a in addresses(c)}
        assert list(c.run(events).values()) == [[("setup", "a")]] * 2
        assert list(c.run(plugin_names).values()) == [["rec"], ["rec"]]
        assert c.submit(recorded, pure=False).result(timeout=30) == ["a"]

        # a worker added later sets it up when it starts, before any task
        # (a plain submit pinned to it; no run() call in between)
        before = set(addresses(c))
        cluster.scale(3)
        (new,) = set(addresses(c)) - before
        assert c.submit(events, workers=[new], pure=False).result(timeout=30) == [("setup", "a")]

        # a worker killed and started again by its nanny sets it up again
        name = "0"
        old_pid = cluster.workers[name].pid
        old_addrs = set(addresses(c))
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda: len(set(addresses(c)) - old_addrs) == 1 and len(addresses(c)) == 3, 30,
                 "the killed worker to come back")
        (back,) = set(addresses(c)) - old_addrs
        pid, evs = c.submit(pid_and_events, workers=[back], pure=False).result(timeout=30)
        assert pid != old_pid and pid == cluster.workers[name].pid
        assert evs == [("setup", "a")]

        # Client.restart: every new process sets it up
        c.restart()
        out = c.run(pid_and_events)
        assert len(out) == 3 and all(evs == [("setup", "a")] for _, evs in out.values())
        assert len(notes(tmp_path, "setup-a")) == 2 + 1 + 1 + 3


def test_teardown_replace_idempotent_and_clean_leave(tmp_path):
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        c.register_plugin(Recorder("a"), name="rec")
        # the same name again replaces it: teardown of the old one first
        c.register_plugin(Recorder("b"), name="rec")
        assert list(c.run(events).values()) == [[("setup", "a"), ("teardown", "a"), ("setup", "b")]]
        # idempotent: nothing happens
        assert c.register_plugin(Recorder("c"), name="rec", idempotent=True) == {}
        assert list(c.run(events).values()) == [[("setup", "a"), ("teardown", "a"), ("setup", "b")]]

        # unregister: teardown, and later workers no longer set it up
        (addr,) = addresses(c)
        assert c.unregister_worker_plugin("rec") == {addr: {"status": "OK"}}
        assert c.run(events)[addr][-1] == ("teardown", "b")
        assert c.run(plugin_names) == {addr: []}
        with pytest.raises(ValueError, match="does not exist"):
            c.unregister_worker_plugin("rec")
        cluster.scale(2)
        (new,) = set(addresses(c)) - {addr}
        assert c.submit(events, workers=[new], pure=False).result(timeout=30) == []

        # the older name, and a default name from the class
        out = c.register_worker_plugin(Recorder("d", tmp_path))
        assert sorted(out) == addresses(c)
        (name,) = c.run(plugin_names)[addr]
        assert name.startswith("Recorder-")
        assert len(notes(tmp_path, "setup-d")) == 2

        # a worker that leaves cleanly (scale down, close) runs teardown
        cluster.scale(1)
        wait_for(lambda: len(notes(tmp_path, "teardown-d")) == 1, 10, "teardown of the stopped worker")
        assert notes(tmp_path, "teardown-d")[0].startswith("teardown-d-1-")
    wait_for(lambda: len(notes(tmp_path, "teardown-d")) == 2, 10, "teardown at cluster close")


def test_transition_async_setup_errors_and_duck_typing(monkeypatch):
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        (addr,) = addresses(c)
        c.register_plugin(Transitions())
        ok = c.submit(inc, 1, key="inc-ok")
        bad = c.submit(explode, key="explode-bad")
        assert ok.result(timeout=30) == 2
        with pytest.raises(ValueError):
            bad.result(timeout=30)
        seen = c.run(seen_transitions)[addr]
        assert ("inc-ok", "ready", "executing") in seen and ("inc-ok", "executing", "memory") in seen
        assert ("explode-bad", "executing", "error") in seen
        c.unregister_worker_plugin("transitions")
        c.submit(inc, 5, key="inc-after").result(timeout=30)
        assert not any(k == "inc-after" for k, _, _ in c.run(seen_transitions)[addr])

        # a coroutine setup is awaited
        c.register_plugin(AsyncSetup(), name="async")
        assert ("async-setup", "0") in c.run(events)[addr]

        # a setup error is raised on the client (the plugin stays registered, as in distributed)
        with pytest.raises(ZeroDivisionError, match="on purpose"):
            c.register_plugin(BrokenSetup())
        assert "broken" in c.run(plugin_names)[addr]
        c.unregister_worker_plugin("broken")

        # duck-typed (a setup method, no base class)
        c.register_plugin(DuckWorkerPlugin(), name="duck")
        assert ("duck", "0") in c.run(events)[addr]
        c.unregister_worker_plugin("duck")
        assert c.run(events)[addr][-1] == ("duck-teardown", "0")

        # a subclass of distributed's WorkerPlugin (a stand-in module here)
        fake = types.ModuleType("distributed.diagnostics.plugin")
        fake.WorkerPlugin, fake.SchedulerPlugin = FakeDistWorkerPlugin, FakeDistSchedulerPlugin
        fake.NannyPlugin = FakeDistNannyPlugin
        monkeypatch.setitem(sys.modules, "distributed.diagnostics.plugin", fake)
        c.register_plugin(DistSubclass())
        assert ("distributed-subclass", "0") in c.run(events)[addr]
        # a subclass of distributed's SchedulerPlugin runs on the scheduler
        assert c.register_plugin(type("S", (FakeDistSchedulerPlugin,), {})(), name="dist-sched") == {}
        c.unregister_scheduler_plugin("dist-sched")
        with pytest.raises(NotImplementedError, match="nann"):
            c.register_plugin(type("N", (FakeDistNannyPlugin,), {})())


class WatchWorkers(SchedulerPlugin):
    """Records what the scheduler's Python side tells it."""

    def __init__(self):
        self.seen = []

    def start(self, scheduler):
        self.seen.append(("start", scheduler.address))

    def add_worker(self, scheduler=None, worker=None, **kwargs):
        self.seen.append(("add", worker))

    def remove_worker(self, scheduler=None, worker=None, **kwargs):
        self.seen.append(("remove", worker))

    def close(self):
        self.seen.append(("close", None))


class CountDone(SchedulerPlugin):
    def __init__(self):
        self.done = {}

    def transition(self, key, start, finish, *args, **kwargs):
        self.done[finish] = self.done.get(finish, 0) + 1


def boom(x):
    raise ValueError(x)


def counted(dask_scheduler=None):
    return dict(dask_scheduler.plugins["count"].done)


def test_a_scheduler_plugin_sees_tasks_finish_and_fail():
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        c.register_plugin(CountDone(), name="count")
        c.gather(c.map(inc, range(10), pure=False))
        with pytest.raises(ValueError):
            c.submit(boom, 1, pure=False).result()
        deadline = time.time() + 10
        while c.run_on_scheduler(counted).get("erred", 0) < 1 and time.time() < deadline:
            time.sleep(0.05)
        got = c.run_on_scheduler(counted)
        assert got.get("memory", 0) >= 10 and got.get("erred") == 1, got


def seen_by(name, dask_scheduler=None):
    return list(dask_scheduler.plugins[name].seen)


def test_a_scheduler_plugin_sees_workers_come_and_go():
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        c.register_plugin(WatchWorkers(), name="watch")
        assert c.run_on_scheduler(seen_by, "watch") == [("start", cluster.scheduler_address)]
        cluster.scale(2)
        c.wait_for_workers(2)
        new = [a for a in c.scheduler_info()["workers"] if ("add", a) in c.run_on_scheduler(seen_by, "watch")]
        assert len(new) == 1, c.run_on_scheduler(seen_by, "watch")
        c.retire_workers(new)
        deadline = time.time() + 20
        while ("remove", new[0]) not in c.run_on_scheduler(seen_by, "watch") and time.time() < deadline:
            time.sleep(0.1)
        assert ("remove", new[0]) in c.run_on_scheduler(seen_by, "watch")
        # idempotent registration keeps the running plugin; unregistering closes it
        c.register_plugin(WatchWorkers(), name="watch", idempotent=True)
        assert c.run_on_scheduler(seen_by, "watch")[0][0] == "start"
        plugin_state = c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["watch"])
        c.unregister_scheduler_plugin("watch")
        assert plugin_state.seen[-1][0] in ("add", "remove", "start")
        with pytest.raises(ValueError, match="Could not find plugin"):
            c.unregister_scheduler_plugin("watch")
        c.register_plugin(MySchedulerPlugin(), name="mine")
        c.register_plugin(DuckSchedulerPlugin(), name="duck")


def test_nanny_plugins_are_refused():
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        with pytest.raises(NotImplementedError, match="nannies run no plugin code"):
            c.register_plugin(rdask.NannyPlugin())
        with pytest.raises(NotImplementedError, match="nannies"):
            c.register_worker_plugin(Recorder("x"), nanny=True)
        with pytest.raises(TypeError, match="instance of a plugin, not a type"):
            c.register_plugin(Recorder)
        with pytest.raises(TypeError, match="not a plugin"):
            c.register_plugin(object())
        assert c.run(plugin_names) == {addresses(c)[0]: []}
    with quick_cluster(1, processes=False) as cluster, Client(cluster, set_as_default=False) as c:
        with pytest.raises(NotImplementedError, match="processes=False"):
            c.register_plugin(Recorder("t"))


def test_remote_client_plugins_reach_later_workers_on_next_run():
    with quick_cluster(1) as cluster, Client(cluster.scheduler_address, set_as_default=False) as remote:
        remote.register_plugin(Recorder("r"), name="rec")
        before = set(addresses(remote))
        cluster.scale(2)
        (new,) = set(addresses(remote)) - before
        # the documented limit: this client has no cluster folder, so a
        # worker that joined later has not set it up before a run() call
        assert remote.submit(events, workers=[new], pure=False).result(timeout=30) == []
        assert remote.run(events, workers=[new]) == {new: [("setup", "r")]}
        # once only
        assert remote.run(events) == {a: [("setup", "r")] for a in addresses(remote)}


# ---------------------------------------------------------------- PipInstall
def test_pip_install_local_package(tmp_path):
    dist = f"rdask_pip_{uuid.uuid4().hex[:8]}"
    wheel = build_wheel(tmp_path, dist, "installed")
    try:
        with quick_cluster(2) as cluster, Client(cluster, set_as_default=False) as c:
            with pytest.raises(ModuleNotFoundError):
                c.submit(import_value, dist, pure=False).result(timeout=30)
            plugin = PipInstall([wheel], pip_options=OFFLINE)
            out = c.register_plugin(plugin)
            assert sorted(out) == addresses(c)
            assert set(c.run(import_value, dist).values()) == {"installed"}
            assert c.submit(import_value, dist, pure=False).result(timeout=30) == "installed"
            # idempotent: the same PipInstall again is a no-op
            assert c.register_plugin(PipInstall([wheel], pip_options=OFFLINE)) == {}
            # a later worker installs too (its plugins list has it)
            before = set(addresses(c))
            cluster.scale(3)
            (new,) = set(addresses(c)) - before
            assert plugin.name in c.submit(plugin_names, workers=[new], pure=False).result(timeout=30)
            assert c.submit(import_value, dist, workers=[new], pure=False).result(timeout=30) == "installed"
            # a failed install raises pip's message on the client
            with pytest.raises(RuntimeError, match="pip install .* failed"):
                c.register_plugin(PipInstall([str(tmp_path / "no-such-package.whl")], pip_options=OFFLINE))
    finally:
        pip_uninstall(dist)


def test_pip_install_restart_workers(tmp_path):
    dist = f"rdask_pipr_{uuid.uuid4().hex[:8]}"
    wheel = build_wheel(tmp_path, dist, "after restart")
    try:
        with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
            (old_pid,) = c.run(os.getpid).values()
            c.register_plugin(PipInstall([wheel], pip_options=OFFLINE, restart_workers=True))
            (new_pid,) = c.run(os.getpid).values()
            assert new_pid != old_pid and new_pid == cluster.workers["0"].pid
            assert set(c.run(import_value, dist).values()) == {"after restart"}
            # restarted once, not again and again
            time.sleep(1.5)
            assert list(c.run(os.getpid).values()) == [new_pid]
    finally:
        pip_uninstall(dist)


# ---------------------------------------------------------------- UploadFile
def test_upload_file_plugin_reaches_later_workers(tmp_path):
    modname = f"rdask_upplug_{uuid.uuid4().hex[:8]}"
    src = tmp_path / f"{modname}.py"
    src.write_text("def f():\n    return 'uploaded'\n")
    with quick_cluster(1) as cluster, Client(cluster, set_as_default=False) as c:
        with pytest.raises(ModuleNotFoundError):
            c.submit(use_module, modname, pure=False).result(timeout=30)
        out = c.register_plugin(UploadFile(str(src)))
        assert sorted(out) == addresses(c)
        assert set(c.run(use_module, modname).values()) == {"uploaded"}
        before = set(addresses(c))
        cluster.scale(2)
        (new,) = set(addresses(c)) - before
        assert c.submit(use_module, modname, workers=[new], pure=False).result(timeout=30) == "uploaded"
        # the same file name again replaces it (and reloads the module)
        src.write_text("def f():\n    return 'again'\n")
        c.register_plugin(UploadFile(str(src)))
        assert set(c.run(use_module, modname).values()) == {"again"}
        assert set(map(tuple, c.run(plugin_names).values())) == {(f"upload_file-{modname}.py",)}


def test_register_plugin_is_awaitable_on_an_asynchronous_client():
    import asyncio

    with quick_cluster(1) as cluster:
        async def main():
            async with Client(cluster, asynchronous=True, set_as_default=False) as c:
                out = await c.register_plugin(Recorder("async"), name="rec")
                got = await c.run(events)
                await c.unregister_worker_plugin("rec")
                return out, got

        out, got = asyncio.run(main())
        assert len(out) == 1 and list(got.values()) == [[("setup", "async")]]
