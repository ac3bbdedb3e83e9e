#!/usr/bin/env bash
# LUKS1 read and write throughput of vdisk against qemu-img on the same image, in one run.
#
#   bench/luks.sh [SIZE_MIB]      (default 512)
#
# Both tools copy SIZE MiB of random data into an existing LUKS1 image (`convert -n` with
# --target-image-opts: the write) and out of it into a raw file (the read). Key derivation is
# timed separately, on a 1 MiB image with the same header settings, and subtracted, so the MiB/s
# columns are the data path alone. Each time is the best of $REPEAT runs (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
VDISK=${CARGO_TARGET_DIR:-$PWD/target}/release/vdisk
REPEAT=${REPEAT:-5}
SIZE=${1:-512}
work=$(mktemp -d /var/tmp/vdisk-luks.XXXXXX)
trap 'rm -rf "$work"' EXIT

OBJ=(--object secret,id=s0,data=benchmark-passphrase)
head -c "$((SIZE << 20))" /dev/urandom > "$work/src.raw"
head -c 1M /dev/urandom > "$work/small.raw"
qemu-img create -q -f luks "${OBJ[@]}" -o key-secret=s0,iter-time=200 "$work/img.luks" "${SIZE}M"
qemu-img create -q -f luks "${OBJ[@]}" -o key-secret=s0,iter-time=200 "$work/small.luks" 1M
opts() { echo "driver=luks,key-secret=s0,file.filename=$1"; }

# once ARGS...: flushes dirty pages (so one run's writeback does not land in the next one's time),
# runs ARGS; prints the wall time in nanoseconds.
once() {
  rm -f "$work/out.raw"
  sync
  local t0 t1
  t0=$(date +%s%N)
  "$@" >/dev/null
  t1=$(date +%s%N)
  echo $((t1 - t0))
}

# Each measurement: the best of $REPEAT runs, qemu-img and vdisk runs alternating so that drift
# of the machine (page cache, host memory) hits both alike.
declare -A T
for _ in $(seq "$REPEAT"); do
  for tool in qemu-img "$VDISK"; do
    name=$(basename "$tool")
    for op in kdf write read; do
      case $op in
        kdf) t=$(once "$tool" convert -n "${OBJ[@]}" -f raw "$work/small.raw" --target-image-opts "$(opts "$work/small.luks")") ;;
        write) t=$(once "$tool" convert -n "${OBJ[@]}" -f raw "$work/src.raw" --target-image-opts "$(opts "$work/img.luks")") ;;
        read) t=$(once "$tool" convert "${OBJ[@]}" --image-opts "$(opts "$work/img.luks")" -O raw "$work/out.raw") ;;
      esac
      if [ -z "${T[$name.$op]:-}" ] || [ "$t" -lt "${T[$name.$op]}" ]; then T[$name.$op]=$t; fi
    done
  done
done
for k in "${!T[@]}"; do T[$k]=$(awk -v ns="${T[$k]}" 'BEGIN { printf "%.3f", ns / 1e9 }'); done
# The last runs were vdisk's: its read must give back the source, and qemu-img must read vdisk's
# write as the source too.
cmp -s "$work/out.raw" "$work/src.raw" || { echo "vdisk read back other data" >&2; exit 1; }
qemu-img compare -q "${OBJ[@]}" --image-opts "$(opts "$work/img.luks")" \
  "driver=raw,file.filename=$work/src.raw" || { echo "qemu-img reads other data" >&2; exit 1; }

rate() { awk -v mib="$SIZE" -v t="$1" -v k="$2" 'BEGIN { d = t - k; printf "%.0f", (d > 0 ? mib / d : 0) }'; }
printf '%-30s %12s %12s %8s\n' "LUKS1 aes-xts-plain64, ${SIZE} MiB" "qemu-img" "vdisk" "ratio"
printf '%-30s %11ss %11ss %8s\n' "key derivation (open)" "${T[qemu-img.kdf]}" "${T[vdisk.kdf]}" \
  "$(awk -v q="${T[qemu-img.kdf]}" -v v="${T[vdisk.kdf]}" 'BEGIN { printf "%.2f", v / q }')"
for op in write read; do
  q=$(rate "${T[qemu-img.$op]}" "${T[qemu-img.kdf]}")
  v=$(rate "${T[vdisk.$op]}" "${T[vdisk.kdf]}")
  printf '%-30s %8s MiB/s %8s MiB/s %7sx\n' "$op (convert, minus key derivation)" "$q" "$v" \
    "$(awk -v q="$q" -v v="$v" 'BEGIN { printf "%.1f", (q > 0 ? v / q : 0) }')"
done
