#!/usr/bin/env bash
# Boot time and memory overhead of the tiny test guest (vmm/tests/guest: reads, writes and
# flushes a virtio-blk disk, prints a report on COM1, resets) under `vdisk boot` and, when
# qemu-system-x86_64 10 is installed, under QEMU's microvm machine, in one run. Not a test:
# numbers only.
#
#   bench/boot.sh [RUNS]          (default 10 runs each; medians are printed)
#
# Time, measured from the launch (fork/exec) of the VMM, over RUNS runs that alternate vdisk and
# QEMU: the first serial byte, the report's last line ("done"), and for vdisk the process exit
# (the guest's i8042 reset ends it; microvm has no i8042, so QEMU is stopped once "done" is
# printed and has no exit time).
#
# Memory, in separate runs (sampling costs CPU, so it is not done while timing): the VMM's
# overhead beyond guest RAM, as Firecracker measures it: the resident set of every mapping of
# the process except guest RAM, from /proc/PID/smaps, sampled as fast as the sampler can parse
# it (the achieved interval is printed) until "done" (QEMU) or the exit (vdisk); the peak over a
# run, median over runs. Guest RAM is the one anonymous mapping whose size is the guest's
# memory (32 MiB); both VMMs map it in one piece and the guest touches little of it, so its
# resident part is small either way. The overhead is split into anonymous memory (heap,
# stacks, per-thread malloc arenas, page tables are not counted) and file-backed pages (the
# executable and shared libraries, which other processes running them share). The
# whole-process peak (VmHWM, guest RAM included) is printed too.
#
# QEMU runs as: qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,auto-kernel-cmdline=off
#   -bios /usr/share/qemu/qboot.rom -enable-kvm -kernel guest.elf -nographic -serial stdio ...
# with the virtio-mmio transport given on the command line as the guest expects it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
VDISK=${CARGO_TARGET_DIR:-$PWD/target}/release/vdisk
RUNS=${1:-10}
GUEST_MIB=32
work=$(mktemp -d /var/tmp/vdisk-boot-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

as --64 -o "$work/guest.o" vmm/tests/guest/guest.s
ld --no-warn-rwx-segments -T vmm/tests/guest/guest.ld -o "$work/guest.elf" "$work/guest.o"
python3 -c "
d = bytearray(1 << 20)
for i in range(4096): d[i] = (i * 7 + i // 256) & 255
open('$work/disk.raw', 'wb').write(d)"

vdisk_cmd=("$VDISK" boot --kernel "$work/guest.elf" --memory "${GUEST_MIB}M" --append console=ttyS0
  --disk "$work/disk.raw,format=raw" --serial stdio)
qemu_cmd=()
if command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 --version | grep -q 'version 10\.'; then
  # The last of microvm's 24 virtio-mmio transports gets the first device.
  qemu_cmd=(qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,auto-kernel-cmdline=off
    -global virtio-mmio.force-legacy=false -bios /usr/share/qemu/qboot.rom -enable-kvm
    -m "${GUEST_MIB}M" -kernel "$work/guest.elf"
    -append "console=ttyS0 virtio_mmio.device=4K@0xfeb02e00:12"
    -nographic -serial stdio -monitor none -no-reboot
    -drive "id=d0,file=$work/disk.raw,format=raw,if=none,cache=writeback"
    -device virtio-blk-device,drive=d0,serial=vdisk0)
else
  echo "(qemu-system-x86_64 10 is not installed: vdisk only)"
fi

# measure.py RUNS GUEST_MIB -- exits|stops CMD... [-- exits|stops CMD...]: one line per VMM with
# the median times to the first byte, to "done" and to the exit (ms), the memory medians
# (MiB: overhead, its anonymous and file-backed parts, VmHWM) and the sampling interval (ms).
# A VMM that "stops" (does not exit by itself) is killed once "done" is printed.
cat > "$work/measure.py" <<'EOF'
import os, re, select, statistics, subprocess, sys, time

runs, guest_kb = int(sys.argv[1]), int(sys.argv[2]) * 1024
groups = [g.split("\0") for g in "\0".join(sys.argv[4:]).split("\0--\0")]
vmms = [(g[0] == "exits", g[1:]) for g in groups]
MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+ *(.*)$")

def memory(pid):
    """(overhead, anonymous part, file-backed part, VmHWM) in kB, or None (not yet mapped)."""
    try:
        with open("/proc/%d/smaps" % pid) as f:
            text = f.read()
        with open("/proc/%d/status" % pid) as f:
            high = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return None
    anon = filed = guests = 0
    path, size = "", 0
    for line in text.splitlines():
        m = MAPPING.match(line)
        if m:
            path = m.group(1)
        elif line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
            if not path and size == guest_kb:
                guests += 1
            elif path.startswith("/"):
                filed += rss
            else:
                anon += rss
    return (anon + filed, anon, filed, high) if guests == 1 else None

def run(exits, cmd, sample):
    """Times (s) to the first byte, "done" and the exit (nan if stopped); the peak memory
    sample; the number of samples; the run's duration (s)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    fd, out, first, done = p.stdout.fileno(), b"", None, None
    peak, samples = None, 0

    def take():
        nonlocal peak, samples
        m = memory(p.pid)
        if m:
            samples += 1
            high = max(m[3], peak[3]) if peak else m[3]
            peak = (m if peak is None or m[0] > peak[0] else peak)[:3] + (high,)

    while done is None and time.monotonic() - t0 < 30:
        if sample:
            take()
        r, _, _ = select.select([fd], [], [], 0 if sample else 30)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        first = first or time.monotonic()
        out += chunk
        if b"done\n" in out:
            done = time.monotonic()
    if done is None:
        sys.exit("no report from %r: %r" % (cmd, out))
    exited = float("nan")
    if exits:
        while sample and p.poll() is None and time.monotonic() - done < 5:
            take()
        try:
            p.wait(timeout=5)
            exited = time.monotonic() - t0 if p.returncode == 0 else exited
        except subprocess.TimeoutExpired:
            pass
    elif sample:
        take()
    if p.poll() is None:
        p.kill()
        p.wait()
    return (first - t0, done - t0, exited), peak, samples, time.monotonic() - t0

timing = [[] for _ in vmms]
for _ in range(runs):
    for i, (exits, cmd) in enumerate(vmms):
        timing[i].append(run(exits, cmd, False)[0])
med = statistics.median
for (exits, cmd), t in zip(vmms, timing):
    mem = [run(exits, cmd, True)[1:] for _ in range(runs)]
    ms = [med(x[k] for x in t) * 1000 for k in range(3)]
    mib = [med(x[0][k] for x in mem) / 1024 for k in range(4)]
    every = med(x[2] / max(x[1], 1) for x in mem) * 1000
    print(" ".join("%.1f" % v for v in ms + mib), "%.2f" % every)
EOF

results=$(python3 "$work/measure.py" "$RUNS" "$GUEST_MIB" -- exits "${vdisk_cmd[@]}" \
  ${qemu_cmd[0]+-- stops} "${qemu_cmd[@]}")
read -r v_first v_done v_exit v_over v_anon v_file v_hwm v_every < <(sed -n 1p <<<"$results")
q_first=n/a q_done=n/a q_over=n/a q_anon=n/a q_file=n/a q_hwm=n/a q_every=n/a
if [ ${#qemu_cmd[@]} -gt 0 ]; then
  read -r q_first q_done _ q_over q_anon q_file q_hwm q_every < <(sed -n 2p <<<"$results")
fi

ratio() { awk -v v="$1" -v q="$2" 'BEGIN { if (q == "n/a") print "n/a"; else printf "%.2f", v / q }'; }
row() { printf '%-40s %9s %s %9s %s %7s\n' "$1" "$2" "$4" "$3" "$4" "$(ratio "$2" "$3")"; }
printf '%-40s %12s %12s %7s\n' "median of $RUNS runs" "vdisk boot" "qemu microvm" "ratio"
row "first serial byte" "$v_first" "$q_first" ms
row "report done" "$v_done" "$q_done" ms
printf '%-40s %9s ms %12s\n' "process exit (guest reset)" "$v_exit" "n/a"
row "memory beyond guest RAM (peak)" "$v_over" "$q_over" MiB
row "  anonymous" "$v_anon" "$q_anon" MiB
row "  file-backed (binary, libraries)" "$v_file" "$q_file" MiB
row "whole process peak RSS (VmHWM)" "$v_hwm" "$q_hwm" MiB
echo "(memory sampled every $v_every ms for vdisk, $q_every ms for QEMU; ${GUEST_MIB} MiB guest)"
