#!/usr/bin/env bash
# Boot time of the tiny test guest (vmm/tests/guest: reads, writes and flushes a virtio-blk
# disk, prints a report on COM1, resets) under `vdisk boot` and, when qemu-system-x86_64 10 is
# installed, under QEMU's microvm machine, in one run. Not a test: numbers only.
#
#   bench/boot.sh [RUNS]          (default 10 runs each; medians are printed)
#
# Measured from launch: the first serial byte, the report's last line ("done"), and for vdisk
# the process exit (the guest's i8042 reset ends it; microvm has no i8042, so QEMU is stopped
# once "done" is printed). Peak RSS is the VMM process's maximum resident set (guest RAM is
# 32 MiB, of which the guest touches well under 1 MiB, so this is almost all VMM overhead).
# QEMU runs as: qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,auto-kernel-cmdline=off
#   -bios /usr/share/qemu/qboot.rom -enable-kvm -kernel guest.elf -nographic -serial stdio ...
# with the virtio-mmio transport given on the command line as the guest expects it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
VDISK=${CARGO_TARGET_DIR:-$PWD/target}/release/vdisk
RUNS=${1:-10}
work=$(mktemp -d /var/tmp/vdisk-boot-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

as --64 -o "$work/guest.o" vmm/tests/guest/guest.s
ld --no-warn-rwx-segments -T vmm/tests/guest/guest.ld -o "$work/guest.elf" "$work/guest.o"
python3 -c "
d = bytearray(1 << 20)
for i in range(4096): d[i] = (i * 7 + i // 256) & 255
open('$work/disk.raw', 'wb').write(d)"

# measure.py RUNS -- CMD...: median times to first byte, to 'done', to exit, and peak RSS.
cat > "$work/measure.py" <<'EOF'
import os, resource, select, statistics, subprocess, sys, time
runs = int(sys.argv[1])
cmd = sys.argv[3:]
first, done, exits, rss = [], [], [], []
for _ in range(runs):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    out, t_first, t_done = b"", None, None
    fd = p.stdout.fileno()
    while True:
        r, _, _ = select.select([fd], [], [], 30)
        if not r:
            break
        chunk = os.read(fd, 4096)
        now = time.monotonic()
        if not chunk:
            break
        if t_first is None:
            t_first = now
        out += chunk
        if b"done\n" in out and t_done is None:
            t_done = now
            break
    if t_done is None:
        sys.exit("no report from %r: %r" % (cmd, out))
    # Let a VMM that ends by itself do so; stop one that does not.
    try:
        p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    t_exit = time.monotonic()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    first.append(t_first - t0)
    done.append(t_done - t0)
    exits.append(t_exit - t0 if p.returncode == 0 else float("nan"))
    rss.append(peak)
med = lambda v: statistics.median(v)
print("%.1f %.1f %.1f %.1f" % (med(first) * 1000, med(done) * 1000, med(exits) * 1000, max(rss) / 1024))
EOF

vdisk_cmd=("$VDISK" boot --kernel "$work/guest.elf" --memory 32M --append console=ttyS0
  --disk "$work/disk.raw,format=raw" --serial stdio)
read -r v_first v_done v_exit v_rss < <(python3 "$work/measure.py" "$RUNS" -- "${vdisk_cmd[@]}")

q_first=n/a q_done=n/a q_rss=n/a
if command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 --version | grep -q 'version 10\.'; then
  # The last of microvm's 24 virtio-mmio transports gets the first device.
  qemu_cmd=(qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,auto-kernel-cmdline=off
    -global virtio-mmio.force-legacy=false -bios /usr/share/qemu/qboot.rom -enable-kvm -m 32M
    -kernel "$work/guest.elf" -append "console=ttyS0 virtio_mmio.device=4K@0xfeb02e00:12"
    -nographic -serial stdio -monitor none -no-reboot
    -drive "id=d0,file=$work/disk.raw,format=raw,if=none,cache=writeback"
    -device virtio-blk-device,drive=d0,serial=vdisk0)
  read -r q_first q_done _ q_rss < <(python3 "$work/measure.py" "$RUNS" -- "${qemu_cmd[@]}")
else
  echo "(qemu-system-x86_64 10 is not installed: vdisk only)"
fi

ratio() { awk -v v="$1" -v q="$2" 'BEGIN { if (q == "n/a") print "n/a"; else printf "%.2f", v / q }'; }
printf '%-28s %12s %12s %8s\n' "median of $RUNS runs" "vdisk boot" "qemu microvm" "ratio"
printf '%-28s %10s ms %10s ms %8s\n' "first serial byte" "$v_first" "$q_first" "$(ratio "$v_first" "$q_first")"
printf '%-28s %10s ms %10s ms %8s\n' "report done" "$v_done" "$q_done" "$(ratio "$v_done" "$q_done")"
printf '%-28s %10s ms %12s %8s\n' "process exit (guest reset)" "$v_exit" "n/a" ""
printf '%-28s %9s MiB %9s MiB %8s\n' "peak RSS (32 MiB guest)" "$v_rss" "$q_rss" "$(ratio "$v_rss" "$q_rss")"
