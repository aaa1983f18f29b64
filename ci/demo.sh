#!/usr/bin/env bash
# The main job: builds rdask (Rust crates and the Python package), starts
# `rdask-scheduler` and `rdask-worker --nworkers 2` as real processes on this
# machine, and runs the Dask-style demo client (python/examples/demo.py)
# against them.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh
setup_python

dir=$(mktemp -d)
cleanup() { kill "$workers" "$sched" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

echo "== starting rdask-scheduler (logs: $dir/scheduler.log)"
.venv/bin/rdask-scheduler --host 127.0.0.1 --port 0 --scheduler-file "$dir/scheduler.json" 2>"$dir/scheduler.log" &
sched=$!
echo "== starting rdask-worker --nworkers 2 --nthreads 1 (logs: $dir/workers.log)"
.venv/bin/rdask-worker --scheduler-file "$dir/scheduler.json" --nworkers 2 --nthreads 1 --name demo 2>"$dir/workers.log" &
workers=$!

echo "== running python/examples/demo.py"
.venv/bin/python python/examples/demo.py --scheduler-file "$dir/scheduler.json"

echo "== stopping workers and scheduler"
kill -TERM "$workers"; wait "$workers" || true
kill -TERM "$sched"; wait "$sched" || true
[ ! -e "$dir/scheduler.json" ] && echo "   scheduler file removed on clean exit"
echo "== scheduler log (last lines)"
tail -n 5 "$dir/scheduler.log"
