#!/usr/bin/env bash
# Installs what the build and tests need on a fresh Debian 12 machine with a
# Rust toolchain. Sourced by ci/demo.sh and ci/test.sh; safe to run twice.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain first (rustup)" >&2
    exit 1
fi
# python3 reads the scheduler file in the demo; it ships with the base image,
# but a minimal machine may lack it.
if ! command -v python3 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && apt-get install -y -qq python3 >/dev/null
    else
        echo "python3 not found" >&2
        exit 1
    fi
fi

# System libraries the crates link against: hwloc 2.x (machine topology,
# worker pinning) found through pkg-config, and libudev that its static link
# flags name; OpenMPI (mpirun, and the library the Python build's `mpi`
# feature links; rsmpi runs bindgen, hence libclang); UCX (its headers for
# the generated bindings of the `ucx` feature, ucx_perftest for the
# benchmark); Chromium for the dashboard's browser test. Installed with apt
# when missing.
SYSTEM_PACKAGES=(pkg-config libhwloc-dev libudev-dev hwloc libopenmpi-dev openmpi-bin libclang-dev chromium libucx-dev ucx-utils)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing system packages: ${missing[*]}" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "missing system packages: ${missing[*]} (apt-get install them as root)" >&2
        exit 1
    fi
fi

# The Python side: a project venv (.venv) with the pinned requirements and the
# rdask package built in place from this checkout (maturin, release profile,
# sharing cargo's target/ with the Rust build). Call after sourcing.
setup_python() {
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        else
            echo "python3 venv support missing (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r "${1:-ci/requirements.txt}"
    VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin develop --release -q
}
