//! Which program the user thinks they are running.
//!
//! Installed as `qemu-img` (a symlink or hard link to the vdisk binary), vdisk answers as qemu-img
//! does: its messages start `qemu-img:`, its `--help` and `--version` are shaped like qemu-img's,
//! and the command is the first argument. Under any other name it is `vdisk`.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::OnceLock;

/// The personality vdisk runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personality {
    Vdisk,
    QemuImg,
    QemuNbd,
}

static PERSONALITY: OnceLock<Personality> = OnceLock::new();

/// The personality for the program name in `argv[0]` (its file name decides, not its directory).
pub fn personality_of(argv0: &OsStr) -> Personality {
    match Path::new(argv0).file_name().and_then(OsStr::to_str) {
        Some("qemu-img") => Personality::QemuImg,
        Some("qemu-nbd") => Personality::QemuNbd,
        _ => Personality::Vdisk,
    }
}

/// Fixes the personality for the rest of the run; the first call wins.
pub fn set(p: Personality) {
    let _ = PERSONALITY.set(p);
}

pub fn personality() -> Personality {
    *PERSONALITY.get().unwrap_or(&Personality::Vdisk)
}

/// The name messages start with: `vdisk`, `qemu-img` or `qemu-nbd`.
pub fn name() -> &'static str {
    match personality() {
        Personality::Vdisk => "vdisk",
        Personality::QemuImg => "qemu-img",
        Personality::QemuNbd => "qemu-nbd",
    }
}

/// Lets a closed stdout (`vdisk map ... | head`) end the process quietly, as it ends a C
/// program, instead of failing a `println!`. Only for commands that print and hold no sockets.
pub fn die_on_sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE has no memory-safety preconditions;
    // no handler is installed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_name_of_argv0_picks_the_personality() {
        for (argv0, p) in [
            ("qemu-img", Personality::QemuImg),
            ("/usr/local/bin/qemu-img", Personality::QemuImg),
            ("./vdisk", Personality::Vdisk),
            ("qemu-img-wrapper", Personality::Vdisk),
            ("/usr/bin/qemu-nbd", Personality::QemuNbd),
            ("/opt/qemu-img/vdisk", Personality::Vdisk),
        ] {
            assert_eq!(personality_of(OsStr::new(argv0)), p, "{argv0}");
        }
    }
}
