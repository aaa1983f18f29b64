#!/usr/bin/env bash
# The main job: builds rdask, starts a scheduler and workers as real processes
# on this machine, runs the demo client against them, and shuts them down.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/setup.sh

cargo build --release --workspace --bins --examples -q
dir=$(mktemp -d)
cleanup() { kill "$sched" "$workers" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

echo "== starting rdask-scheduler (logs: $dir/scheduler.log)"
./target/release/rdask-scheduler --host 127.0.0.1 --port 0 --scheduler-file "$dir/scheduler.json" 2>"$dir/scheduler.log" &
sched=$!
for _ in $(seq 100); do [ -s "$dir/scheduler.json" ] && break; sleep 0.1; done
address=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["address"])' "$dir/scheduler.json")
echo "   scheduler at $address"

echo "== starting rdask-worker --nworkers 4 (logs: $dir/workers.log)"
./target/release/rdask-worker --scheduler-file "$dir/scheduler.json" --nworkers 4 --nthreads 1 2>"$dir/workers.log" &
workers=$!

echo "== running the demo client"
./target/release/examples/demo "$address" 4

echo "== stopping the scheduler (workers stop with it)"
kill -TERM "$sched"
wait "$sched"
wait "$workers"
[ ! -e "$dir/scheduler.json" ] && echo "   scheduler file removed on clean exit"
echo "== scheduler log (last lines)"
tail -n 5 "$dir/scheduler.log"
