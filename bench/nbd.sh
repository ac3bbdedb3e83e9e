#!/usr/bin/env bash
# NBD servers side by side, in one run, on the same 1 GiB images (filled with data):
# vdisk serve, qemu-nbd and nbdkit (file plugin; nbdkit before 1.36 has no qcow2 reader, so
# nbdkit serves raw only). Not a test: numbers only.
#
#   bench/nbd.sh [WORKDIR]        (default: a temporary directory, removed afterwards)
#
# Workloads, each over Unix sockets with multi-conn servers (-e 0 / -e 4):
#   seq read   nbdcopy -C 4 nbd+unix:///?socket=S null:           (MiB/s, best of $REPEAT)
#   rand read  fio ioengine=nbd, 4 KiB, iodepth 32, 4 jobs/conns   (IOPS over $RUNTIME s)
#   rand write fio ioengine=nbd, 4 KiB, iodepth 32, 4 jobs/conns   (IOPS over $RUNTIME s)
# The ratio column is vdisk / qemu-nbd (above 1.0: vdisk is faster).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
VDISK=${CARGO_TARGET_DIR:-$PWD/target}/release/vdisk
REPEAT=${REPEAT:-3}
RUNTIME=${RUNTIME:-8}
for tool in qemu-nbd nbdkit nbdcopy fio jq qemu-img; do
  command -v "$tool" >/dev/null || { echo "bench/nbd.sh needs $tool" >&2; exit 1; }
done
keep=${1:-}
work=${1:-$(mktemp -d /var/tmp/vdisk-nbd-bench.XXXXXX)}
trap 'stop; [ -n "$keep" ] || rm -rf "$work"' EXIT
mkdir -p "$work"

# --- images: 1 GiB of incompressible data, raw and qcow2 --------------------------------------
if [ ! -f "$work/disk.raw" ]; then
  head -c 1G /dev/urandom > "$work/disk.raw"
  qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
fi

sock=$work/nbd.sock
server_pid=""
stop() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
  rm -f "$sock"
}

# start SERVER FORMAT: serves a fresh copy of the image on $sock.
start() {
  local server=$1 fmt=$2
  cp --reflink=auto "$work/disk.$fmt" "$work/served.$fmt"
  case $server in
    vdisk)    "$VDISK" serve -t -e 0 -f "$fmt" -k "$sock" "$work/served.$fmt" & ;;
    qemu-nbd) qemu-nbd -t -e 0 -f "$fmt" -k "$sock" "$work/served.$fmt" & ;;
    nbdkit)   nbdkit -f -U "$sock" file "$work/served.$fmt" & ;;
  esac
  server_pid=$!
  for _ in $(seq 200); do [ -S "$sock" ] && return; sleep 0.05; done
  echo "$server did not start" >&2; exit 1
}

uri() { echo "nbd+unix:///?socket=$sock"; }

seq_read() {
  local best=""
  for _ in $(seq "$REPEAT"); do
    local t0 t1
    t0=$(date +%s%N)
    nbdcopy -C 4 "$(uri)" null:
    t1=$(date +%s%N)
    local t=$(( t1 - t0 ))
    if [ -z "$best" ] || [ "$t" -lt "$best" ]; then best=$t; fi
  done
  awk -v ns="$best" 'BEGIN { printf "%.0f", 1024 / (ns / 1e9) }'
}

# fio_iops RW: 4 KiB random RW (randread|randwrite), 4 jobs x iodepth 32.
fio_iops() {
  local rw=$1 key
  key=$([ "$rw" = randread ] && echo read || echo write)
  fio --name=nbd --ioengine=nbd --uri="$(uri)" --rw="$rw" --bs=4k --iodepth=32 --numjobs=4 \
      --size=1G --runtime="$RUNTIME" --time_based --group_reporting --output-format=json \
      --output="$work/fio.json" >/dev/null
  jq ".jobs[0].$key.iops | floor" "$work/fio.json"
}

declare -A result
for fmt in raw qcow2; do
  for server in vdisk qemu-nbd nbdkit; do
    if [ "$server" = nbdkit ] && [ "$fmt" = qcow2 ]; then continue; fi
    start "$server" "$fmt"
    result[$server,$fmt,seq]=$(seq_read)
    result[$server,$fmt,randread]=$(fio_iops randread)
    result[$server,$fmt,randwrite]=$(fio_iops randwrite)
    stop
  done
done

printf '%-34s %12s %12s %12s %8s\n' "workload" "vdisk" "qemu-nbd" "nbdkit" "ratio"
for fmt in raw qcow2; do
  for w in seq randread randwrite; do
    case $w in
      seq) name="seq read nbdcopy -C 4 (MiB/s)";;
      randread) name="4k rand read QD32x4 (IOPS)";;
      randwrite) name="4k rand write QD32x4 (IOPS)";;
    esac
    v=${result[vdisk,$fmt,$w]}
    q=${result[qemu-nbd,$fmt,$w]}
    k=${result[nbdkit,$fmt,$w]:-n/a}
    printf '%-34s %12s %12s %12s %8s\n' "$fmt: $name" "$v" "$q" "$k" \
      "$(awk -v v="$v" -v q="$q" 'BEGIN { printf "%.2f", v / q }')"
  done
done
