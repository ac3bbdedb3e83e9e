#!/usr/bin/env bash
# Times vdisk against qemu-img on the same work, in one run, and prints the ratio
# (vdisk time / qemu-img time: below 1.0 means vdisk is faster). Not a test: numbers only.
#
#   bench/bench.sh [WORKDIR]      (default: a temporary directory, removed afterwards)
#
# Each measurement is the best of $REPEAT runs (default 5) to tame page-cache noise.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
VDISK=${CARGO_TARGET_DIR:-$PWD/target}/release/vdisk
REPEAT=${REPEAT:-5}
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

# --- convert: vdisk convert against qemu-img convert ----------------------------------------------
# Input: 256 MiB of text-like data (words drawn by a fixed-seed generator, so every run converts
# the same bytes), and an 8 GiB raw image that is 95 % holes (64 runs of 6 MiB of that text).
# Each row: best wall time of $REPEAT runs, the ratio, the output size on disk, and the peak RSS
# (from /usr/bin/time) of the best run.
text=$work/text.raw
python3 - "$text" <<'PY'
import random, sys
rng = random.Random(20261122)
letters = "etaoinshrdlcumwfgypbvkjxqz"
weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
words = ["".join(rng.choices(letters, weights, k=rng.randint(1, 10))) for _ in range(4000)]
line_words = [rng.choices(words, k=rng.randint(4, 14)) for _ in range(20000)]
lines = [(" ".join(w).capitalize() + ".\n").encode() for w in line_words]
size, out = 256 << 20, bytearray()
while len(out) < size:
    out += b"".join(rng.choices(lines, k=4096))
open(sys.argv[1], "wb").write(out[:size])
PY
sparse=$work/sparse.raw
rm -f "$sparse"
truncate -s 8G "$sparse"
for i in $(seq 0 63); do
  dd if="$text" of="$sparse" bs=1M count=6 skip=$(( (i * 4) % 250 )) seek=$(( i * 128 )) conv=notrunc status=none
done

# run_once OUT CMD...: removes OUT, flushes dirty pages (so one run's writeback does not land in
# the next one's time), runs CMD; prints "SECONDS PEAK_RSS_KIB". The wall time is taken here in
# nanoseconds (/usr/bin/time's %e has only 10 ms steps); the peak RSS comes from /usr/bin/time.
run_once() {
  local out=$1
  shift
  rm -f "$out"
  sync
  local t0 t1 rss
  t0=$(date +%s%N)
  rss=$(/usr/bin/time -f '%M' "$@" 2>&1 >/dev/null | tail -1)
  t1=$(date +%s%N)
  awk -v ns="$((t1 - t0))" -v rss="$rss" 'BEGIN { printf "%.4f %d\n", ns / 1e9, rss }'
}

echo
printf '%-40s %9s %9s %6s %11s %11s %10s %10s\n' "convert" "qemu-img" "vdisk" "ratio" \
  "qemu out" "vdisk out" "qemu RSS" "vdisk RSS"
# convert_row NAME INPUT ARGS...: times `convert ARGS INPUT OUT` with both tools, alternating
# qemu-img and vdisk runs so that drift of the machine (page cache, host memory) hits both alike;
# keeps the best of $REPEAT runs of each, and the peak RSS of that run.
convert_row() {
  local name=$1 input=$2
  shift 2
  local qt="" qm vt="" vm t m
  for _ in $(seq "$REPEAT"); do
    read -r t m < <(run_once "$work/q.out" qemu-img convert "$@" "$input" "$work/q.out")
    if [ -z "$qt" ] || awk -v a="$t" -v b="$qt" 'BEGIN { exit !(a < b) }'; then qt=$t qm=$m; fi
    read -r t m < <(run_once "$work/v.out" "$VDISK" convert "$@" "$input" "$work/v.out")
    if [ -z "$vt" ] || awk -v a="$t" -v b="$vt" 'BEGIN { exit !(a < b) }'; then vt=$t vm=$m; fi
  done
  qemu-img compare -q "$work/q.out" "$work/v.out" || echo "  !! outputs differ for: $name" >&2
  local qs vs
  qs=$(du -k "$work/q.out" | cut -f1) vs=$(du -k "$work/v.out" | cut -f1)
  printf '%-40s %8.3fs %8.3fs %6s %8s MiB %8s MiB %7s MiB %7s MiB\n' "$name" "$qt" "$vt" \
    "$(awk -v q="$qt" -v v="$vt" 'BEGIN { printf "%.2f", (q > 0 ? v / q : 0) }')" \
    $(( qs / 1024 )) $(( vs / 1024 )) $(( qm / 1024 )) $(( vm / 1024 ))
}
convert_row "raw -> qcow2 (256 MiB text)" "$text" -f raw -O qcow2
qemu-img convert -f raw -O qcow2 "$text" "$work/text.qcow2"
convert_row "qcow2 -> raw" "$work/text.qcow2" -f qcow2 -O raw
convert_row "raw -> qcow2 -c zlib" "$text" -f raw -O qcow2 -c -o compression_type=zlib
convert_row "raw -> qcow2 -c zstd" "$text" -f raw -O qcow2 -c -o compression_type=zstd
qemu-img convert -f raw -O qcow2 -c "$text" "$work/zlib.qcow2"
convert_row "compressed qcow2 (zlib) -> raw" "$work/zlib.qcow2" -f qcow2 -O raw
convert_row "sparse 8 GiB raw (95 % holes) -> qcow2" "$sparse" -f raw -O qcow2
convert_row "sparse 8 GiB raw (95 % holes) -> raw" "$sparse" -f raw -O raw
