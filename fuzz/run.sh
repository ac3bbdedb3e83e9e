#!/usr/bin/env bash
# Builds the fuzz targets, seeds their corpora and runs each for a while, one at a time.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     (default: 600 seconds each, every target)
#
# Seeds come from testdata/ and from images made here with qemu-img, qemu-io and cryptsetup
# (into fuzz/corpus/<target>/, not committed). Each target runs in libFuzzer's fork mode with one
# child at a time, so a crash, timeout or OOM is saved under fuzz/artifacts/<target>/ and the run
# goes on. Limits per input: 10 s and 2 GiB RSS. Prints one summary line per target.
set -euo pipefail

seconds=${1:-600}
shift || true
all=(qcow2_open qcow2_check luks_header nbd_server virtio_blk)
targets=("${@:-${all[@]}}")
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$here"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# -a: debug assertions (and overflow checks) on, so arithmetic overflow is found too.
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
for t in "${targets[@]}"; do cargo +nightly fuzz build -a "$t"; done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# qcow2 images of many shapes, each small (cluster sizes, refcount widths, compression,
# snapshots, subclusters, bitmaps, zero clusters, backing and data file names, encryption).
qcow2_seeds() {
    local out=$1 i=0
    mkdir -p "$out"
    cp "$root/testdata/"*.qcow2 "$out/" 2>/dev/null || true
    local q=qcow2
    make() { # NAME OPTIONS SIZE [qemu-io commands...]
        local name=$1 opts=$2 size=$3
        shift 3
        qemu-img create -q -f $q -o "$opts" "$work/$name" "$size" 2>/dev/null || return 0
        for cmd in "$@"; do qemu-io -f $q -c "$cmd" "$work/$name" >/dev/null 2>&1 || true; done
    }
    make c512 cluster_size=512 1M 'write -P 1 0 4k' 'write -P 2 100k 1k' 'write -z 8k 4k'
    make c4k cluster_size=4096,refcount_bits=1 4M 'write -P 3 0 16k' 'write -P 4 1M 4k' 'discard 0 4k'
    make r64 cluster_size=4096,refcount_bits=64 2M 'write -P 5 4k 8k'
    make v2 cluster_size=4096,compat=0.10 2M 'write -P 6 0 8k' 'write -z 64k 4k'
    make c64k cluster_size=65536 8M 'write -P 7 0 4k'
    make extl2 cluster_size=16384,extended_l2=on 2M 'write -P 8 0 2k' 'write -P 9 8k 1k' 'write -z 12k 512'
    make lazy cluster_size=4096,lazy_refcounts=on 2M 'write -P 10 0 8k'
    make prealloc cluster_size=4096,preallocation=metadata 256k
    make big cluster_size=4096 64G 'write -P 11 1G 4k'
    qemu-img create -q -f raw "$work/base.raw" 1M
    make backing cluster_size=4096,backing_file=base.raw,backing_fmt=raw 1M 'write -P 12 4k 4k'
    for alg in zlib zstd; do
        qemu-img create -q -f raw "$work/src.raw" 256k
        qemu-io -f raw -c 'write -P 13 0 64k' -c 'write -P 0 64k 64k' "$work/src.raw" >/dev/null
        qemu-img convert -c -O qcow2 -o cluster_size=4096,compression_type=$alg \
            "$work/src.raw" "$work/comp-$alg"
    done
    make snap cluster_size=4096 1M 'write -P 14 0 8k'
    qemu-img snapshot -c one "$work/snap" && qemu-io -f $q -c 'write -P 15 0 4k' "$work/snap" >/dev/null
    qemu-img snapshot -c two "$work/snap"
    make bitmap cluster_size=4096 1M 'write -P 16 0 4k'
    qemu-img bitmap --add "$work/bitmap" b0 2>/dev/null || true
    make datafile cluster_size=4096,data_file=data.raw,data_file_raw=on 1M 'write -P 17 0 4k'
    qemu-img create -q -f $q --object secret,id=s0,data=fuzz \
        -o cluster_size=4096,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.cipher-alg=aes-128 \
        "$work/luks" 1M
    for f in c512 c4k r64 v2 c64k extl2 lazy prealloc big backing comp-zlib comp-zstd snap bitmap datafile luks; do
        [ -f "$work/$f" ] && [ "$(stat -c %s "$work/$f")" -le $((1 << 20)) ] && cp "$work/$f" "$out/seed-$f"
    done
    # A few deliberately damaged copies: a leaked cluster, a dirty bit, a bad refcount.
    cp "$work/c4k" "$out/seed-c4k-dirty" && printf '\x01' | dd of="$out/seed-c4k-dirty" bs=1 seek=79 conv=notrunc 2>/dev/null
    cp "$work/snap" "$out/seed-snap-corrupt" && printf '\x02' | dd of="$out/seed-snap-corrupt" bs=1 seek=79 conv=notrunc 2>/dev/null
    true
}

# LUKS headers with cheap key derivation (passphrase "fuzz"); mode byte first (see the target).
luks_seeds() {
    local out=$1
    mkdir -p "$out"
    luks() { # NAME KEEP_BYTES cryptsetup-options...
        local name=$1 keep=$2
        shift 2
        truncate -s 20M "$work/$name.img"
        printf fuzz | cryptsetup luksFormat -q --key-file=- "$@" "$work/$name.img" >/dev/null 2>&1 || return 0
        for mode in 0 2; do
            { printf "\\x0$mode"; head -c "$keep" "$work/$name.img"; } >"$out/seed-$name-$mode"
        done
        { printf '\x01'; head -c 32768 "$work/$name.img"; } >"$out/seed-$name-exact"
    }
    luks luks1 $((4096 + 128000)) --type luks1 --hash sha256 --cipher aes-xts-plain64 --key-size 256 --pbkdf-force-iterations 1000
    luks luks1cbc $((4096 + 64000)) --type luks1 --hash sha1 --cipher aes-cbc-essiv:sha256 --key-size 128 --pbkdf-force-iterations 1000
    luks luks2 $((32768 + 131072)) --type luks2 --key-size 256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --luks2-metadata-size 16k
    luks luks2argon $((32768 + 131072)) --type luks2 --key-size 256 --pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 32 --pbkdf-parallel 1 --luks2-metadata-size 16k
    luks luks2s4k $((32768 + 131072)) --type luks2 --key-size 256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --sector-size 4096 --luks2-metadata-size 16k
    if [ -f "$work/luks2.img" ]; then
        { printf '\x04'; dd if="$work/luks2.img" bs=1 skip=4096 count=12288 2>/dev/null | tr -d '\0'; } >"$out/seed-json"
    fi
    true
}

seed() {
    local t=$1 dir=corpus/$1
    [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return 0
    case $t in
    qcow2_open | qcow2_check) qcow2_seeds "$dir" ;;
    luks_header) luks_seeds "$dir" ;;
    nbd_server | virtio_blk) python3 seeds.py corpus ;;
    esac
    if [ -d "$root/testdata/fuzz/$t" ]; then cp "$root/testdata/fuzz/$t/"* "$dir/"; fi
}

bin=target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release
declare -A max_len=([qcow2_open]=1048576 [qcow2_check]=1048576 [luks_header]=262144 [nbd_server]=65536 [virtio_blk]=65536)
summary=()
for t in "${targets[@]}"; do
    seed "$t"
    mkdir -p "artifacts/$t"
    before=$(ls "artifacts/$t" | wc -l)
    log=$(mktemp)
    echo "== $t: $seconds s, corpus $(ls "corpus/$t" | wc -l) inputs" >&2
    # The binary built above, run directly: edits made while this runs do not rebuild it.
    "$bin/$t" -artifact_prefix="artifacts/$t/" "corpus/$t" \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
        -max_len="${max_len[$t]}" -print_final_stats=1 2>&1 | tee "$log" >&2 || true
    runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    secs=$(grep -oE 'time: [0-9]+s' "$log" | tail -1 | grep -oE '[0-9]+')
    ooms=$(grep -oE 'oom/timeout/crash: [0-9]+/[0-9]+/[0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    found=$(($(ls "artifacts/$t" | wc -l) - before))
    summary+=("$(printf '%-12s runs %10s  time %5ss  oom/timeout/crash %-7s  new artifacts %s' \
        "$t" "${runs:-0}" "${secs:-0}" "${ooms:-0/0/0}" "$found")")
    rm -f "$log"
done
printf '%s\n' "${summary[@]}"
