#!/usr/bin/env bash
# Installs the test prerequisites (with apt, when run as root) and runs the whole test suite.
# The test peers are real programs: qemu-img 10.0.2 is the oracle, plus libnbd, nbdkit, fio,
# cryptsetup, e2fsprogs and fuse3.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo    || need+=(libnbd-bin)
have nbdkit     || need+=(nbdkit)
have fio        || need+=(fio)
have cryptsetup || need+=(cryptsetup-bin)
have mkfs.ext4  || need+=(e2fsprogs)
have sfdisk     || need+=(fdisk)
have fusermount3 || need+=(fuse3)
have busybox    || need+=(busybox-static)
have certtool   || need+=(gnutls-bin)
have nbdsh      || need+=(python3-libnbd)
have as         || need+=(binutils)
have iasl       || need+=(acpica-tools)
have strace     || need+=(strace)   # tests/cli_convert_offload.rs watches copy_file_range
[ -x /usr/bin/time ] || need+=(time)   # bench/bench.sh reads peak RSS from it
python3 -c "import cryptography" 2>/dev/null || need+=(python3-cryptography)

if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    # qemu-utils must stay at 10.0.2 (from bookworm-backports): never let a dependency downgrade it.
    apt-mark hold qemu-utils qemu-block-extra >/dev/null 2>&1 || true
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "missing test prerequisites (run as root to install): ${need[*]}" >&2
  fi
fi
if ! qemu-img --version | grep -q 'version 10\.'; then
  echo "qemu-img 10.x is required as the test oracle (found: $(qemu-img --version | head -1))" >&2
  exit 1
fi

cargo build --workspace --all-targets
cargo test --workspace
