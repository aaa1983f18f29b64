#!/usr/bin/env bash
# Fuzzes the wire protocol with cargo-fuzz (libFuzzer + AddressSanitizer):
# frame decoding, the handshake and every archived message type, see
# docs/fuzzing.md. Not part of ci/test.sh: it needs the nightly toolchain and
# runs for as long as it is told.
#
#   bash ci/fuzz.sh [SECONDS]     # seconds per target; default $FUZZ_SECONDS or 60
#
# FUZZ_TARGETS="frame_decode messages" limits the run to some targets.
# The corpus each target grows is kept in transport/fuzz/corpus/<target>
# (seeded from transport/fuzz/seeds/<target>), the full libFuzzer output in
# transport/fuzz/artifacts/<target>.log and crash inputs in
# transport/fuzz/artifacts/<target>/. Exits non-zero when a target crashed.
set -euo pipefail
cd "$(dirname "$0")/../transport"

per_target="${1:-${FUZZ_SECONDS:-60}}"
if ! [[ "$per_target" =~ ^[0-9]+$ ]] || [ "$per_target" -lt 1 ]; then
    echo "usage: $0 [SECONDS]   (seconds per target, a positive integer)" >&2
    exit 2
fi
read -r -a targets <<<"${FUZZ_TARGETS:-frame_decode handshake messages}"

# libFuzzer and the sanitizers need nightly Rust.
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "the nightly toolchain is missing (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

echo "building the fuzz targets (nightly, release, AddressSanitizer, debug assertions)"
cargo +nightly fuzz build -O

# Longer inputs for the handshake: hellos over the 4 KiB pre-auth cap.
declare -A extra=([handshake]="-max_len=8192")

declare -A execs rates results
crashed=0
total=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts"
    log="fuzz/artifacts/$t.log"
    echo "fuzzing $t for ${per_target}s (log: transport/$log)"
    set +e
    # shellcheck disable=SC2086
    cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$per_target" -print_final_stats=1 -timeout=25 ${extra[$t]:-} >"$log" 2>&1
    rc=$?
    set -e
    n=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    if [ -z "$n" ]; then
        # Without the final stats: the last "#N ... DONE" (or progress) line.
        n=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
    fi
    n=${n:-0}
    r=$(sed -n 's/^stat::average_exec_per_sec: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    execs[$t]=$n
    rates[$t]=${r:-?}
    total=$((total + n))
    if [ "$rc" -ne 0 ]; then
        crashed=$((crashed + 1))
        results[$t]="CRASH (exit $rc)"
        echo "---- $t failed (exit $rc); end of its log:" >&2
        tail -n 60 "$log" >&2
        grep -E 'Test unit written to' "$log" >&2 || true
    else
        results[$t]="ok"
    fi
done

echo
printf '%-14s %14s %10s  %s\n' target executions exec/s result
for t in "${targets[@]}"; do
    printf '%-14s %14s %10s  %s\n' "$t" "${execs[$t]}" "${rates[$t]}" "${results[$t]}"
done
printf '%-14s %14s\n' total "$total"
echo "seconds per target: $per_target; crashes: $crashed"
[ "$crashed" -eq 0 ]
