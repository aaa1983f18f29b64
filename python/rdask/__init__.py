"""rdask: run dask.distributed code on a Rust scheduler and worker runtime.

    from rdask import Client          # instead of: from dask.distributed import Client
    client = Client()                  # a LocalCluster of worker processes
    client.submit(sum, [1, 2]).result()
"""

from . import _rdask
from .errors import AuthenticationError, CommClosedError, KilledWorker, RdaskError
from .api import as_completed, fire_and_forget, get_client, wait, worker_client
from .client import Client, default_client
from .cluster import LocalCluster
from .cuda import GpuUnavailableError, LocalCUDACluster
from .diagnostics import get_task_stream, performance_report
from .future import Future, FutureCancelledError
from .plugins import NannyPlugin, PipInstall, SchedulerPlugin, UploadFile, WorkerPlugin
from .progress import progress
from .security import Security
from .coordination import Event, Lock, MultiLock, Queue, Semaphore, Variable, futures_of, print, warn
from .worker import get_worker, rejoin, secede

__version__ = "0.1.0"

__all__ = [
    "Client", "LocalCluster", "Future", "FutureCancelledError", "as_completed", "wait",
    "fire_and_forget", "get_client", "get_worker", "worker_client", "secede", "rejoin", "progress", "default_client",
    "RdaskError", "CommClosedError", "AuthenticationError", "KilledWorker", "LocalCUDACluster", "GpuUnavailableError",
    "get_task_stream", "performance_report", "Security",
    "Lock", "Semaphore", "MultiLock", "Variable", "Event", "Queue", "futures_of", "print", "warn",
    "WorkerPlugin", "SchedulerPlugin", "NannyPlugin", "PipInstall", "UploadFile",
]
