#!/usr/bin/env bash
# The GPU machine check for the device data plane (issue 12), as one run of
# about 5 minutes (each step has its own time limit; together at most 9 minutes).
# The GPU machine has no Rust toolchain and reaches no package registry, so
# everything is built here first into .gpu-carry:
#
#   bash gpu/prepare-device-check.sh          # here (about 1 minute)
#   run(command="bash gpu/device-check-data.sh", carry=[".gpu-carry"], timeout_s=590)
#
# Dry run here, on the host-memory stand-in (a fresh venv standing in for the
# machine's Python, which has numpy, pytest, psutil, cloudpickle, toolz,
# fsspec, pyyaml and CuPy but no dask):
#
#   RDASK_CHECK_ARRAY=standin RDASK_CHECK_MIB=256 PY=/tmp/gpu-sim/bin/python bash gpu/device-check-data.sh
#
# (RDASK_CHECK_MIB scales the benchmarks' sizes down: 1024 MiB moved, a
# 4096 MiB device memory limit and 512 MiB values by default.)
#
# Steps: the GPU and the UCX carried (CUDA transports or not), the rdask-gpu
# unit tests (on a GPU the CUDA test opens GPU 0 and moves bytes through
# pinned staging), python/tests/test_gpu_device.py (CuPy, PyTorch and Numba
# values over IPC, staging, UCX device frames, spilling, side streams, a dask
# array of CuPy chunks), rdask-gpu-bench (staged D2H/H2D throughput against
# one whole pinned copy; a 1 GiB device value over TCP and over UCX against
# the same bytes from host memory; spilling 3x a 4 GiB limit),
# benches/device_values.py (1 GiB device values between worker processes by
# each path; spilling 3x a 4 GiB limit) and gpu/device-check.sh
# (rdask-cuda-worker on this node). Figures go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/rdask-device-check}
array=${RDASK_CHECK_ARRAY:-cupy}
py=${PY:-python3}
carry=.gpu-carry
mib=${RDASK_CHECK_MIB:-1024}
mkdir -p "$out"
failed=()
step() {  # step NAME SECONDS COMMAND...: runs one step, logs it, carries on after a failure
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== $name: rc $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed+=("$name (rc $rc)")
}

echo "== nvidia-smi -L"; nvidia-smi -L || echo "no nvidia-smi"
[ -d "$carry" ] || { echo "no $carry: run gpu/prepare-device-check.sh here first and carry it"; exit 2; }

# UCX with CUDA transports (libucx-cu13's libraries): rdask opens libucp.so.0
# at run time, so this is all it takes; worker processes inherit it.
export LD_LIBRARY_PATH=$PWD/$carry/ucx/libucx/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "== UCX carried: $("$carry/ucx/ucx_info" -v | head -1)"
ucx_devices=$("$carry/ucx/ucx_info" -d 2>/dev/null || true)
grep -E "^#\s+(Transport|Memory domain):" <<<"$ucx_devices" | sort | uniq -c | head -20
if grep -q "Transport: cuda_copy" <<<"$ucx_devices"; then
  export RDASK_EXPECT_UCX_CUDA=1  # test_gpu_device.py then requires device frames in GPU memory
else
  echo "!! the carried UCX loaded no CUDA transports: device values over UCX will be staged"
fi

# dask and rdask into a folder of their own; the machine's packages stay.
site=/tmp/rdask-site
rm -rf "$site"
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$carry"/wheels/*.whl || exit 2
export PYTHONPATH=$site PATH=$site/bin:$PATH PYTHONUNBUFFERED=1
"$py" -c 'import rdask, rdask._rdask as r, dask; print("rdask from", rdask.__file__, "dask", dask.__version__);
print("UCX:", r.ucx_status(), "device frames over UCX carry", r.ucx_memory_kinds())' || exit 2

# The machine's memory starts small and grows as it is used (device README):
# limits worked out from MemTotal at start would pause or end workers that
# hold the benchmarks' 1 GiB host values. Host-memory thresholds off.
export DASK_DISTRIBUTED__WORKER__MEMORY__TARGET=False DASK_DISTRIBUTED__WORKER__MEMORY__SPILL=False \
  DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=False DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE=False
echo "== memory now: $(grep MemTotal /proc/meminfo)"
if [ "$array" = standin ]; then
  export RDASK_DEVICE=standin RDASK_GPU_TEST_ARRAY=standin
  device=standin
else
  device=cuda:0
fi
step "rdask-gpu unit tests" 20 "./$carry/bin/rdask-gpu-tests" --test-threads=1
step "test_gpu_device.py ($array)" 240 "$py" -m pytest python/tests/test_gpu_device.py -v -rs --durations=0 \
  -p no:cacheprovider
step "rdask-gpu-bench over TCP" 70 "./$carry/bin/rdask-gpu-bench" --device "$device" --size-mib "$mib" --limit-mib $((4 * mib)) \
  --out "$out/gpu.json"
step "rdask-gpu-bench over UCX" 60 "./$carry/bin/rdask-gpu-bench" --device "$device" --size-mib "$mib" --limit-mib "$mib" \
  --protocol ucx --out "$out/gpu-ucx.json"
step "benches/device_values.py ($array)" 110 "$py" benches/device_values.py --array "$array" --move-mib "$mib" \
  --limit-mib $((4 * mib)) --value-mib $((mib / 2)) --out "$out/device-values.json"
if [ "$array" != standin ]; then  # issue 11's check (rdask-cuda-worker on this node), cheap to add
  step "gpu/device-check.sh (rdask-cuda-worker)" 40 bash gpu/device-check.sh
fi
for f in gpu.json gpu-ucx.json device-values.json; do
  [ -f "$out/$f" ] && { echo "== $f"; cat "$out/$f"; echo; }
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== failed: ${failed[*]}"
  exit 1
fi
echo "== all steps passed"
