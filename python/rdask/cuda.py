"""GPU workers: `rdask-cuda-worker` and `LocalCUDACluster`, as dask-cuda's.

One worker process per visible NVIDIA GPU (found through NVML), each with
`CUDA_VISIBLE_DEVICES` rotated so its own GPU comes first, bound to the CPU
cores and NUMA node closest to its GPU, one thread by default, the resource
`GPU=1` registered, and a device memory limit (0.8 of the GPU by default).
Without a driver or a GPU, both say so in one line and stop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import _rdask, topology
from .cluster import LocalCluster
from .config import parse_memory_limit, parse_resources, total_memory
from .errors import RdaskError

GpuUnavailableError = _rdask.GpuUnavailableError

# dask-cuda flags that mean nothing here yet, and why.
UNSUPPORTED = {
    "--rmm-pool-size": "rdask has no RMM pool; device values are allocated by their library (CuPy, ...) and by rdask on arrival",
    "--rmm-maximum-pool-size": "rdask has no RMM pool",
    "--rmm-managed-memory": "rdask has no RMM pool",
    "--rmm-async": "rdask has no RMM pool",
    "--rmm-release-threshold": "rdask has no RMM pool",
    "--rmm-log-directory": "rdask has no RMM pool",
    "--rmm-track-allocations": "rdask has no RMM pool",
    "--enable-jit-unspill": "rdask has no JIT-unspill proxies; device values move to host memory past "
                            "--device-memory-limit and come back when a task uses them",
    "--shared-filesystem": "only dask-cuda's JIT-unspill uses it, which rdask does not have",
    "--preload": "preload scripts are not supported yet",
    "--preload-argv": "preload scripts are not supported yet",
}


def gpu_devices() -> list[dict]:
    """The GPUs NVML reports; GpuUnavailableError (one line) without any."""
    return json.loads(_rdask.gpu_devices())


def _fraction_or_bytes(value, total: int) -> int:
    """`0.8` (of `total`), bytes, '30GB', or 0 / 'auto' (0.8)."""
    if value in (None, "auto"):
        return int(total * 0.8)
    return parse_memory_limit(value, 1, total)


def plan(topo: dict, gpus: list[dict], nthreads: int | None = 1, memory_limit="auto",
         device_memory_limit=0.8, bind: bool = True, visible: str | None = None) -> list[dict]:
    """Worker specs, one per GPU in `visible` (CUDA_VISIBLE_DEVICES), each
    with `device_memory_limit` in bytes and a `gpu_label` to register."""
    n = len(visible.split(",")) if visible else len(gpus)
    memory = None if str(memory_limit).lower() == "auto" else parse_memory_limit(memory_limit, max(1, n))
    flags = {"nworkers": None, "nthreads": nthreads, "memory_limit": memory,
             "fallback_memory": total_memory(), "bind": bool(bind)}
    specs = json.loads(_rdask.plan_cuda_workers(json.dumps(topo), json.dumps(flags), json.dumps(gpus), visible))
    by_index = {g["index"]: g for g in gpus}
    for s in specs:
        g = s["gpu"]
        device = by_index[g["index"]].get("memory", 0)
        s["device_memory_limit"] = _fraction_or_bytes(device_memory_limit, device) if device else 0
        s["gpu_label"] = f"{g['index']}: {g['name']} ({g['pci_bus_id']})"
    return specs


def ucx_device_path() -> str:
    """One line saying how device values travel over this process's UCX:
    dask-cuda users expect GPU-to-GPU transfers, which need a UCX built with
    CUDA transports (Debian's libucx has none)."""
    from . import _rdask

    ok, detail = _rdask.ucx_status()
    if not ok:
        return f"UCX is not usable here: {detail}"
    kinds = _rdask.ucx_memory_kinds()
    if "cuda" in kinds:
        return "UCX moves GPU memory: device values between nodes go GPU to GPU as device frames"
    why = ("device frames are off (RDASK_UCX_DEVICE_FRAMES=0, or UCX's message headers are too small for them)"
           if not kinds else "this UCX has no CUDA transports")
    return (f"{why}: device values between nodes go through host memory in staging chunks (between processes "
            "of one node by CUDA IPC); for GPU-to-GPU transfers put a UCX with CUDA transports (such as the "
            "libraries of the libucx-cu12 or libucx-cu13 wheels) on LD_LIBRARY_PATH")


def ucx_env(protocol: str | None, enable_tcp_over_ucx=None, enable_infiniband=None, enable_nvlink=None,
            enable_rdmacm=None, net_devices=None) -> dict:
    """The UCX settings dask-cuda's flags stand for, for the GPU workers'
    environment: none when no flag is given (UCX then picks every transport
    it has, CUDA ones included, which is what dask-cuda recommends now);
    else `UCX_TLS` with `cuda_copy` and what the flags ask for (TCP is kept
    for setting up connections unless RDMA CM is asked for), and
    `UCX_NET_DEVICES`. ValueError when a flag is given without UCX."""
    flags = {"enable_tcp_over_ucx": enable_tcp_over_ucx, "enable_infiniband": enable_infiniband,
             "enable_nvlink": enable_nvlink, "enable_rdmacm": enable_rdmacm, "net_devices": net_devices}
    given = {k: v for k, v in flags.items() if v not in (None, False, "")}
    if not given:
        return {}
    if protocol not in ("ucx", "auto"):  # auto: UCX where it can start (else the settings do nothing)
        raise ValueError(f"{', '.join(sorted(given))} need protocol 'ucx' (the workers use {protocol or 'tcp'!r})")
    env = {}
    if any(k != "net_devices" for k in given):
        tls = ["cuda_copy"]
        if enable_infiniband:
            tls.append("rc")
        if enable_nvlink:
            tls.append("cuda_ipc")
        if enable_tcp_over_ucx or not enable_rdmacm:
            tls.append("tcp")
        if enable_rdmacm:
            tls.append("rdmacm")
        env["UCX_TLS"] = ",".join(tls)
    if net_devices:
        env["UCX_NET_DEVICES"] = str(net_devices)
    return env


def _worker_env(spec: dict) -> dict:
    return {
        "CUDA_VISIBLE_DEVICES": spec["gpu"]["visible_devices"],
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "RDASK_DEVICE_MEMORY_LIMIT": str(spec["device_memory_limit"]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rdask-cuda-worker",
                                description="one rdask worker per visible NVIDIA GPU, each under a nanny")
    p.add_argument("address", nargs="?", help="scheduler address, e.g. tcp://10.0.0.1:8786")
    p.add_argument("--scheduler-file", default=None)
    p.add_argument("--nthreads", type=int, default=1, help="threads per worker (default 1, as dask-cuda)")
    p.add_argument("--memory-limit", default="auto", help="host memory per worker: auto (split), bytes, 0.5")
    p.add_argument("--device-memory-limit", default="0.8", help="per GPU: a fraction of it (0.8) or bytes")
    p.add_argument("--resources", default="", help='extra resources; "GPU=1" is always registered')
    p.add_argument("--name", default=None, help="name prefix (workers are NAME-gpuI)")
    p.add_argument("--local-directory", default=None)
    p.add_argument("--death-timeout", type=float, default=30.0)
    p.add_argument("--protocol", default=None,
                   help="tcp, tls (the default with --tls-cert), ucx, or auto (default: the scheduler address's)")
    p.add_argument("--listen-host", "--host", default="127.0.0.1")
    p.add_argument("--no-bind", dest="bind", action="store_false")
    # dask-cuda's UCX flags (`ucx_env`); without them UCX picks its transports.
    for flag in ("tcp-over-ucx", "infiniband", "nvlink", "rdmacm"):
        p.add_argument(f"--enable-{flag}", action="store_true", default=None)
        p.add_argument(f"--disable-{flag}", dest=f"enable_{flag.replace('-', '_')}", action="store_false")
    p.add_argument("--net-devices", default=None, help="UCX_NET_DEVICES for the workers (with --protocol ucx)")
    p.add_argument("--dashboard-address", default=None,
                   help="accepted and ignored: workers have no dashboard of their own (the scheduler's shows them)")
    from .cli import add_token_args, run_nannies, scheduler_address, token_of
    from .config import add_memory_flags, thresholds_from_args
    from .security import add_tls_flags, apply_args

    add_token_args(p)
    add_memory_flags(p)
    add_tls_flags(p)
    a, rest = p.parse_known_args(argv)
    for arg in rest:
        flag = arg.split("=", 1)[0]
        if flag in UNSUPPORTED:
            print(f"rdask-cuda-worker: {flag} is not supported: {UNSUPPORTED[flag]}", file=sys.stderr)
            return 2
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.dashboard_address is not None:  # as `rdask-worker` does
        print("rdask-cuda-worker: warning: --dashboard-address is accepted and ignored (workers have no dashboard "
              "of their own; the scheduler's dashboard shows them)", file=sys.stderr)
    try:
        security = apply_args(a)
    except ValueError as e:
        print(f"rdask-cuda-worker: {e}", file=sys.stderr)
        return 2
    from .protocols import resolve

    try:
        a.protocol = resolve(a.protocol, security, report=lambda line: print(f"rdask-cuda-worker: {line}", file=sys.stderr),
                             follow=a.address)
    except ValueError as e:
        print(f"rdask-cuda-worker: --protocol: {e}", file=sys.stderr)
        return 2
    try:
        ucx = ucx_env(a.protocol, a.enable_tcp_over_ucx, a.enable_infiniband, a.enable_nvlink, a.enable_rdmacm,
                      a.net_devices)
    except ValueError as e:
        print(f"rdask-cuda-worker: {e}", file=sys.stderr)
        return 2
    if a.protocol == "ucx":
        # Asked of UCX with the workers' UCX settings (UCX reads them once).
        os.environ.update(ucx)
        print(f"rdask-cuda-worker: {ucx_device_path()}", file=sys.stderr)
    a.token = token_of(a)
    try:
        gpus = gpu_devices()
    except GpuUnavailableError as e:
        print(f"rdask-cuda-worker: {e}", file=sys.stderr)
        return 1
    address = scheduler_address(p, a)
    if address is None:
        return 1
    try:
        specs = plan(topology.read(), gpus, a.nthreads, a.memory_limit, a.device_memory_limit, a.bind,
                     os.environ.get("CUDA_VISIBLE_DEVICES"))
        resources = {**parse_resources(a.resources), "GPU": 1.0}
        thresholds = thresholds_from_args(a)
    except ValueError as e:
        print(f"rdask-cuda-worker: {e}", file=sys.stderr)
        return 1
    from .nanny import Nanny

    base = a.name or os.uname().nodename
    nannies = []
    for s in specs:
        name = f"{base}-gpu{s['gpu']['index']}"
        local = os.path.join(a.local_directory, name) if a.local_directory else None
        nannies.append(Nanny(address, name, s["nthreads"], s["memory_limit"], resources, a.token, local,
                             a.listen_host, death_timeout=a.death_timeout, cpus=s["cpus"], numa_node=s["numa"],
                             gpu=s["gpu_label"], env={**_worker_env(s), **ucx}, memory_thresholds=thresholds,
                             security=security, protocol=a.protocol).start())
    print(f"rdask-cuda-worker: {len(specs)} GPU worker(s) for {address}:\n{topology.describe_layout(specs)}",
          file=sys.stderr, flush=True)
    return run_nannies(nannies)


class LocalCUDACluster(LocalCluster):
    """A scheduler in this process and one worker process per visible GPU,
    as dask-cuda's `LocalCUDACluster`. Raises GpuUnavailableError (one line)
    on a machine without an NVIDIA driver or GPU."""

    def __init__(self, n_workers: int | None = None, threads_per_worker: int = 1, CUDA_VISIBLE_DEVICES=None,
                 memory_limit="auto", device_memory_limit=0.8, bind: bool = True, enable_tcp_over_ucx=None,
                 enable_infiniband=None, enable_nvlink=None, enable_rdmacm=None, net_devices=None, **kwargs):
        unsupported = sorted(k for k in kwargs if k.startswith("rmm_") or k in ("jit_unspill", "pre_import"))
        if unsupported:
            raise TypeError(f"LocalCUDACluster: {', '.join(unsupported)} not supported (rdask has no RMM pool "
                            "or JIT-unspill; device values move to host past device_memory_limit)")
        # What the workers' UCX is told (dask-cuda's flags), checked before anything starts.
        self._ucx_env = ucx_env(kwargs.get("protocol"), enable_tcp_over_ucx, enable_infiniband, enable_nvlink,
                                enable_rdmacm, net_devices)
        gpus = gpu_devices()  # before anything starts
        visible = CUDA_VISIBLE_DEVICES
        if isinstance(visible, (list, tuple)):
            visible = ",".join(map(str, visible))
        visible = visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
        specs = plan(topology.read(), gpus, threads_per_worker, memory_limit, device_memory_limit, bind, visible)
        if n_workers is not None:
            if n_workers > len(specs):
                raise ValueError(f"n_workers={n_workers} but only {len(specs)} GPU(s) are visible")
            specs = specs[:n_workers]
        self._gpu_specs = specs
        resources = {**(kwargs.pop("resources", None) or {}), "GPU": 1}
        super().__init__(n_workers=len(specs), threads_per_worker=threads_per_worker, resources=resources, **kwargs)

    def _start_worker(self):
        from .nanny import Nanny

        s = self._gpu_specs[self._next % len(self._gpu_specs)]
        name = str(s["gpu"]["index"])
        self._next += 1
        if not self.processes:
            raise RdaskError("LocalCUDACluster runs one process per GPU (processes=False is not supported)")
        self.workers[name] = Nanny(self.scheduler_address, name, s["nthreads"], s["memory_limit"], self.resources,
                                   self.token, self.local_directory, self.host, quiet=False, cpus=s["cpus"],
                                   numa_node=s["numa"], gpu=s["gpu_label"], memory_thresholds=self.memory_thresholds,
                                   security=self.security, protocol=self.protocol,
                                   env={**_worker_env(s), **self._ucx_env, **self._worker_env()}).start()
