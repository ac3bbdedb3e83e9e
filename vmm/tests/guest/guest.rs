//! What the tests know of the tiny guest in this directory (`guest.s`, `guest.ld`): how to
//! build it, what it reads, writes and reports. Shared, through `#[path]`, by the VMM's own
//! boot tests (`vmm/tests/boot_guest.rs`) and the `vdisk boot` tests (`tests/cli_boot.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The size of the disk image the guest is given.
pub const IMAGE_SIZE: usize = 1 << 20;

/// Assembles and links the guest into `dir`; `pvh` chooses whether it carries the PVH note
/// (without it, it is entered through the 64-bit Linux boot protocol).
pub fn build_guest(dir: &Path, pvh: bool) -> PathBuf {
    // This file is compiled into the tests of the vmm crate and of the root package.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = ["tests/guest", "vmm/tests/guest"]
        .map(|d| manifest.join(d))
        .into_iter()
        .find(|d| d.join("guest.s").exists())
        .expect("the guest sources");
    let obj = dir.join("guest.o");
    let elf = dir.join(if pvh { "guest-pvh.elf" } else { "guest-64.elf" });
    let mut asm = Command::new("as");
    asm.arg("--64");
    if !pvh {
        asm.args(["--defsym", "NO_PVH=1"]);
    }
    run(asm.arg("-o").arg(&obj).arg(src.join("guest.s")), "as");
    run(
        Command::new("ld")
            .arg("--no-warn-rwx-segments")
            .arg("-T")
            .arg(src.join("guest.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
        "ld",
    );
    elf
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image the guest reads: every byte of sectors 0-7 differs from its neighbours, the rest
/// is zero.
pub fn pattern() -> Vec<u8> {
    let mut data = vec![0u8; IMAGE_SIZE];
    for (i, b) in data.iter_mut().enumerate().take(4096) {
        *b = (i * 7 + i / 256) as u8;
    }
    data
}

/// What the guest writes to sectors 8-9.
pub fn written() -> Vec<u8> {
    (0..256u32)
        .flat_map(|k| k.wrapping_mul(0x9e37_79b9).to_le_bytes())
        .collect()
}

/// The image after the guest ran.
pub fn expected_image() -> Vec<u8> {
    let mut data = pattern();
    data[8 * 512..10 * 512].copy_from_slice(&written());
    data
}

fn dword_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .fold(0, u32::wrapping_add)
}

/// The serial report of a guest entered in `mode` (`pvh` or `64`) that found the disk, read the
/// pattern, wrote, flushed and verified.
pub fn expected_report(mode: &str) -> String {
    format!(
        "vdisk-guest: mode={mode} dev=d0000000 cap=00000800\n\
         read={:08x} isr=1\n\
         id=vdisk0\n\
         write=0 flush=0 verify={:08x}\n\
         done\n",
        dword_sum(&pattern()[..4096]),
        dword_sum(&written()),
    )
}
