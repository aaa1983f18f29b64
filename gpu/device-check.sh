#!/usr/bin/env bash
# The GPU machine check for rdask-cuda-worker (issue 11), as one short run
# (well under 5 minutes). The GPU machine has no Rust toolchain and no
# network, so everything is built here first and carried:
#
#   bash gpu/prepare-device-check.sh     # here: the rdask wheel and dask's, in .gpu-carry
#   run(command="bash gpu/device-check.sh", carry=[".gpu-carry"], timeout_s=420)
#
# (gpu/device-check-data.sh, the data plane's check, takes the same carry.)
#
# It prints: the GPUs, `rdask topology --cuda`, a scheduler plus
# rdask-cuda-worker, and from a task with resources={"GPU": 1} on each worker
# the NVML device name, CUDA_VISIBLE_DEVICES and the task's CPU affinity.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/rdask-device-check}
mkdir -p "$out"
site=/tmp/rdask-site
rm -rf "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu-carry/wheels/*.whl
export PYTHONPATH="$site" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
py() { python3 "$@"; }

echo "== nvidia-smi -L"; nvidia-smi -L || true
echo "== rdask topology --cuda"; py -c 'import sys; from rdask.cli import main; sys.exit(main(["topology", "--cuda"]))'

sched_file="$out/scheduler.json"
py -c 'import sys; from rdask.cli import scheduler_main; sys.exit(scheduler_main(sys.argv[1:]))' \
    --host 127.0.0.1 --port 0 --scheduler-file "$sched_file" >"$out/scheduler.log" 2>&1 &
sched=$!
py -c 'import sys; from rdask.cuda import main; sys.exit(main(sys.argv[1:]))' \
    --scheduler-file "$sched_file" >"$out/cuda-worker.log" 2>&1 &
workers=$!
trap 'kill $workers $sched 2>/dev/null || true; wait 2>/dev/null || true' EXIT

echo "== tasks with resources={'GPU': 1}"
SCHED_FILE="$sched_file" py - <<'PY'
import os, time
from rdask import Client, cuda

ngpus = len(cuda.gpu_devices())
c = Client(scheduler_file=os.environ["SCHED_FILE"], timeout=60)
t0 = time.monotonic()
c.wait_for_workers(ngpus, timeout=120)
print(f"{ngpus} GPU workers registered in {time.monotonic() - t0:.1f} s after the client connected")

def where():
    import pynvml
    pynvml.nvmlInit()
    first = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[0]
    h = pynvml.nvmlDeviceGetHandleByIndex(int(first)) if first.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(first)
    name = pynvml.nvmlDeviceGetName(h)
    from rdask import get_worker
    w = get_worker()
    return w.name, name, os.environ["CUDA_VISIBLE_DEVICES"], sorted(os.sched_getaffinity(0)), w.gpu

for w in c.scheduler_info()["workers"].values():
    print("registered:", w["name"], "cpus", w["cpus"], "numa", w["numa_node"], "gpu", w["gpu"])
    print("task says: ", c.submit(where, resources={"GPU": 1}, workers=[w["name"]], pure=False).result(timeout=60))
c.close()
PY
echo "== rdask-cuda-worker log"; tail -n 20 "$out/cuda-worker.log"
