#!/usr/bin/env bash
# Times vdisk against qemu-img on the same work, in one run, and prints the ratio
# (vdisk time / qemu-img time: below 1.0 means vdisk is faster). Not a test: numbers only.
#
#   bench/bench.sh [WORKDIR]      (default: a temporary directory, removed afterwards)
#
# Each measurement is the best of $REPEAT runs (default 3) to tame page-cache noise.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
VDISK=${CARGO_TARGET_DIR:-$PWD/target}/release/vdisk
REPEAT=${REPEAT:-3}
work=${1:-$(mktemp -d /var/tmp/vdisk-bench.XXXXXX)}
[ -n "${1:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"

# best_of CMD...: prints the best wall time in seconds of $REPEAT runs (setup via $SETUP if set).
best_of() {
  local best=""
  for _ in $(seq "$REPEAT"); do
    [ -z "${SETUP:-}" ] || eval "$SETUP"
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    local t=$(( t1 - t0 ))
    if [ -z "$best" ] || [ "$t" -lt "$best" ]; then best=$t; fi
  done
  awk -v ns="$best" 'BEGIN { printf "%.3f", ns / 1e9 }'
}

printf '%-44s %10s %10s %8s\n' "operation" "qemu-img" "vdisk" "ratio"
row() {
  local name=$1 q=$2 v=$3
  printf '%-44s %9ss %9ss %8s\n' "$name" "$q" "$v" "$(awk -v q="$q" -v v="$v" 'BEGIN { printf "%.2f", v / q }')"
}

# --- create ---------------------------------------------------------------------------------
q=$(best_of qemu-img create -q -f qcow2 "$work/q.qcow2" 1T)
v=$(best_of "$VDISK" create -q -f qcow2 "$work/v.qcow2" 1T)
row "create qcow2 1 TiB" "$q" "$v"
q=$(best_of qemu-img create -q -f qcow2 -o preallocation=metadata "$work/q.qcow2" 4G)
v=$(best_of "$VDISK" create -q -f qcow2 -o preallocation=metadata "$work/v.qcow2" 4G)
row "create qcow2 4 GiB preallocation=metadata" "$q" "$v"

# --- sequential write then read of 1 GiB, 64 KiB requests, 16 in flight ----------------------
BENCH_ARGS=(-c 16384 -s 65536 -d 16 -t writeback)
for fmt in qcow2 raw; do
  SETUP="qemu-img create -q -f $fmt $work/q.$fmt 1G"
  q=$(best_of qemu-img bench -q -f "$fmt" -w "${BENCH_ARGS[@]}" "$work/q.$fmt")
  SETUP="qemu-img create -q -f $fmt $work/v.$fmt 1G"
  v=$(best_of "$VDISK" bench -q -f "$fmt" -w "${BENCH_ARGS[@]}" "$work/v.$fmt")
  row "bench -w 1 GiB seq write ($fmt, fresh image)" "$q" "$v"
  SETUP=""
  q=$(best_of qemu-img bench -q -f "$fmt" "${BENCH_ARGS[@]}" "$work/q.$fmt")
  v=$(best_of "$VDISK" bench -q -f "$fmt" "${BENCH_ARGS[@]}" "$work/v.$fmt")
  row "bench 1 GiB seq read ($fmt)" "$q" "$v"
done
