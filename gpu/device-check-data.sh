#!/usr/bin/env bash
# The GPU machine check for the device data plane (issue 12), as one short
# run (about 2 minutes on an H200). The GPU machine has no Rust toolchain,
# so the binaries are built here and carried:
#
#   # here, once:
#   echo /.gpu-bin/ >> .git/info/exclude
#   cargo build --release -p rdask-bench --bin rdask-gpu-bench
#   cargo test --release -p rdask-gpu --no-run --message-format=json \
#     | python3 -c 'import sys,json; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and "rdask_gpu" in m["executable"]]' \
#     | head -1 | xargs -I{} cp {} .gpu-bin/rdask-gpu-tests
#   cp target/release/rdask-gpu-bench .gpu-bin/
#   strip .gpu-bin/*     # release builds keep debug info: 45 MB -> a few MB
#   # optional, UCX with CUDA transports (43 MB; carry budget is 64 MiB):
#   #   pip download --no-deps -d .gpu-wheels libucx-cu12
#   # then, with the device tool:
#   run(command="bash gpu/device-check-data.sh", carry=[".gpu-bin", ".gpu-wheels"], timeout_s=300)
#
# It prints the GPU, runs the rdask-gpu unit tests (on a GPU the CUDA test
# opens GPU 0 and moves bytes through pinned staging), then rdask-gpu-bench:
# staged D2H/H2D throughput against one whole pinned copy, a 1 GiB device
# value over TCP against the same bytes from host memory, and spilling of
# values 3x a 4 GiB device memory limit. Figures go to $OUT/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/rdask-device-check}
mkdir -p "$out"
echo "== nvidia-smi -L"; nvidia-smi -L || true
# A carried libucx-cu12 wheel (43 MB) gives rdask a UCX with CUDA transports:
# device values then go as device frames, GPU memory to GPU memory.
if ls .gpu-wheels/libucx*.whl >/dev/null 2>&1; then
  python3 -m zipfile -e .gpu-wheels/libucx*.whl /tmp/libucx-wheel
  export LD_LIBRARY_PATH=/tmp/libucx-wheel/libucx/lib:${LD_LIBRARY_PATH:-}
  echo "UCX from the libucx wheel: /tmp/libucx-wheel/libucx/lib"
fi
if [ -x .gpu-bin/rdask-gpu-tests ]; then
  echo "== rdask-gpu unit tests"; ./.gpu-bin/rdask-gpu-tests --test-threads=1
  echo "== rdask-gpu-bench"
  ./.gpu-bin/rdask-gpu-bench --device cuda:0 --size-mib 1024 --limit-mib 4096 --out "$out/gpu.json"
  cat "$out/gpu.json"
  echo "== rdask-gpu-bench over UCX (device frames where this UCX moves GPU memory)"
  ./.gpu-bin/rdask-gpu-bench --device cuda:0 --size-mib 1024 --limit-mib 1024 --protocol ucx \
    --out "$out/gpu-ucx.json" || echo "UCX run failed (rc $?)"
else
  echo "== skipped the Rust-side checks: no .gpu-bin carried"
fi
# The Python device path (device frames, device memory limit) on CuPy arrays:
# needs the rdask abi3 wheel and dask's wheels carried in .gpu-wheels (the
# machine's Python has CuPy but no dask; the device README says how to carry
# wheels). Skipped without them.
echo "== benches/device_values.py --array cupy"
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
  python3 -m venv --system-site-packages /tmp/rdask-venv
  /tmp/rdask-venv/bin/pip install -q --no-index --find-links .gpu-wheels .gpu-wheels/rdask-*.whl
  /tmp/rdask-venv/bin/python benches/device_values.py --array cupy --move-mib 1024 --limit-mib 4096 \
    --value-mib 512 --out "$out/device-values.json"
else
  echo "skipped: no wheels in .gpu-wheels"
fi
