#!/usr/bin/env bash
# The whole test suite: core unit tests, loopback integration tests, process
# tests, the small form of the scaling benchmark (correctness only), then the
# Python package's end-to-end tests (real scheduler and worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh

# One profile for everything: the benchmark needs release, and building a
# second profile would double CI time on 2 cores.
cargo build --release --workspace --bins --examples
# setup.sh installed UCX: its tests must run, not skip.
export RDASK_REQUIRE_UCX=1
cargo test --release --workspace
# A build without UCX still speaks TCP, and ucx:// says why not.
cargo test --release -p rdask-transport --no-default-features --test backends
# 256 null workers over TCP, tree-15 and friends, plus workers in 4 processes
# and a 200k-task pending-memory check: fails on any wrong result or leaked
# task, never on timing.
./target/release/rdask-bench --ci --out bench-results/ci.json

# Python: venv, pinned requirements, the extension built in release mode.
setup_python
# test_gpu_device.py (the GPU machine's checks on CuPy) runs here on the
# host-memory stand-in, so that it is known to work before a GPU is lent.
RDASK_GPU_TEST_ARRAY=standin .venv/bin/python -m pytest python/tests -q -x -p no:cacheprovider
