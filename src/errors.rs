//! Errors as qemu-img words them.
//!
//! The block layer's errors name their file in front (`disk.img: ...`); qemu-img names the file
//! once in an outer phrase (`Could not open 'disk.img': ...`) and gives OS errors as bare
//! `strerror` text. [`describe`] renders a block-layer error for such a phrase.

use std::fmt;

use vdisk_formats::Error;

/// A command-line mistake: printed with a `Try 'vdisk CMD --help' for more info` line after it,
/// as qemu-img does (`qemu-img` under that name).
#[derive(Debug)]
pub struct UsageError {
    pub command: &'static str,
    pub message: String,
}

impl UsageError {
    pub fn error(command: &'static str, message: impl Into<String>) -> anyhow::Error {
        UsageError {
            command,
            message: message.into(),
        }
        .into()
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {}

/// A failure with its own exit status: qemu-img's `compare` exits 2 on errors and 1 when the
/// images differ, `check` exits 2, 3 or 63. Without a message the command has already said
/// everything it had to.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: Option<String>,
}

impl Exit {
    /// Ends the command with `code` and nothing more on stderr.
    pub fn silently(code: u8) -> anyhow::Error {
        Exit {
            code,
            message: None,
        }
        .into()
    }

    /// Ends the command with `code` after printing `message` as an error.
    pub fn with(code: u8, message: impl Into<String>) -> anyhow::Error {
        Exit {
            code,
            message: Some(message.into()),
        }
        .into()
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message.as_deref().unwrap_or(""))
    }
}

impl std::error::Error for Exit {}

/// A suggestion for fixing what an error message reports, shown under vdisk's own name (as
/// `qemu-img` it prints exactly what qemu-img prints).
pub fn hint(message: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        (
            "requires explicit backing format",
            "name the backing file's format with -F FMT (e.g. -F qcow2; `vdisk info FILE` shows it)",
        ),
        (
            "Backing file specified without backing format",
            "name the backing file's format with -F FMT (the detected one is shown above)",
        ),
        (
            "Image is not in qcow2 format",
            "leave out -f to let vdisk detect the format, or check it with `vdisk info FILE`",
        ),
        (
            "Compression not supported for this file format",
            "compressed clusters need a qcow2 target: add -O qcow2",
        ),
        (
            "does not support checks",
            "only qcow2 images have metadata to check; `vdisk compare` checks contents",
        ),
        (
            "Parameter 'key-secret' is required for cipher",
            "give it with --object secret,id=s0,data=PASSPHRASE and \
             --image-opts driver=luks,key-secret=s0,file.filename=FILE",
        ),
        (
            "Parameter 'encrypt.key-secret' is required for cipher",
            "name a secret: --object secret,id=s0,data=PASSPHRASE, then -o encrypt.key-secret=s0 \
             to create, or --image-opts driver=qcow2,encrypt.key-secret=s0,file.filename=FILE",
        ),
        (
            "Invalid password",
            "the passphrase (the secret named by key-secret, or the one typed) opens no key slot \
             of the image",
        ),
        (
            "Image creation needs a size parameter",
            "give the size after the file name (e.g. 10G), or -b BACKING to take its size",
        ),
        (
            "output file is smaller than input file",
            "grow the target first (`vdisk resize TARGET SIZE`) or drop -n to create it",
        ),
        (
            "Must specify options (-o)",
            "e.g. -o compat=1.1 or -o lazy_refcounts=on; `vdisk amend -o help FILE` lists them",
        ),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| message.contains(needle))
        .map(|(_, hint)| *hint)
}

/// The message of a block-layer error without its leading file name; an OS error comes out as
/// `WHAT 'FILE': strerror`, as QEMU phrases them (`Could not open 'x': No such file or directory`).
pub fn describe(err: &Error) -> String {
    match err {
        Error::Io { path, what, source } => {
            format!("{what} '{}': {}", path.display(), os_message(source))
        }
        Error::Backing {
            backing, source, ..
        } => {
            // QEMU names neither file here; the cause names the backing file if it needs to.
            let why = describe(source);
            let prefix = format!("{}: ", backing.display());
            let why = why.strip_prefix(&prefix).unwrap_or(&why);
            format!("Could not open backing file: {why}")
        }
        Error::During { what, source } => format!("{what}: {}", describe(source)),
        _ => {
            let text = err.to_string();
            match file_of(err) {
                Some(path) => {
                    let prefix = format!("{}: ", path.display());
                    text.strip_prefix(&prefix).unwrap_or(&text).to_string()
                }
                None => text,
            }
        }
    }
}

/// The file a block-layer error names in front of its message.
fn file_of(err: &Error) -> Option<&std::path::Path> {
    match err {
        Error::InvalidImage { path, .. }
        | Error::Corrupt { path, .. }
        | Error::Unsupported { path, .. }
        | Error::OutOfRange { path, .. }
        | Error::ReadOnly { path }
        | Error::NoSpace { path, .. } => Some(path),
        _ => None,
    }
}

/// `strerror` text of an OS error: Rust's message without its ` (os error N)` tail.
pub fn os_message(err: &std::io::Error) -> String {
    let text = err.to_string();
    match err.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_read_like_strerror() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_message(&e), "No such file or directory");
    }

    #[test]
    fn file_errors_name_the_file_once() {
        let e = vdisk_formats::open(
            std::path::Path::new("/nonexistent/x.img"),
            Default::default(),
        )
        .unwrap_err();
        assert_eq!(
            describe(&e),
            "Could not open '/nonexistent/x.img': No such file or directory"
        );
    }
}
