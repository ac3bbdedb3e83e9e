//! Backing chains: resolving a backing file name, choosing its format, and guarding against loops
//! and runaway depth.
//!
//! A backing name is resolved against the directory of the image that names it (as QEMU does).
//! Names with a protocol prefix (`json:`, `nbd:`, `http://` ...) are refused: an image must not make
//! vdisk open anything but a local file. Which local files an image may make vdisk open is the
//! [`BackingPolicy`] of the open: all of them as QEMU does ([`BackingPolicy::Follow`]), only those
//! whose format the image records ([`BackingPolicy::RequireFormat`]), or none
//! ([`BackingPolicy::Refuse`]).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::Format;
use crate::luks::Passphrase;

/// Deepest backing chain vdisk opens.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// Which files named inside an image (backing files, external data files) opening it may open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Open them as QEMU does, probing the format of a backing file the image does not name.
    #[default]
    Follow,
    /// Refuse a backing file whose format the image does not record (no backing format header
    /// extension): probing it could read a raw file as an image with backing files of its own.
    RequireFormat,
    /// Refuse every image that names a backing file or an external data file: opening an
    /// untrusted image then reads no other file. (To open such an image without its backing
    /// file, use [`crate::OpenOptions::no_backing`]; an external data file is refused even then,
    /// since reads need it. Describing an image for `info` opens neither.)
    Refuse,
}

impl BackingPolicy {
    /// The policies by the names the command line uses.
    pub const NAMES: [(&'static str, BackingPolicy); 3] = [
        ("follow", BackingPolicy::Follow),
        ("require-format", BackingPolicy::RequireFormat),
        ("refuse", BackingPolicy::Refuse),
    ];

    /// Parses `follow`, `require-format` or `refuse`.
    pub fn from_name(name: &str) -> Result<BackingPolicy> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
            .ok_or_else(|| {
                Error::argument(format!(
                    "unknown backing policy '{name}' (follow, require-format or refuse)"
                ))
            })
    }

    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, p)| *p == self)
            .map(|(n, _)| *n)
            .expect("every policy has a name")
    }

    /// Checks that `image` may open the backing file it names `name`, whose format it records as
    /// `format` (the backing format header extension).
    pub fn check_backing(self, image: &Path, name: &str, format: Option<&str>) -> Result<()> {
        let refused = |why: &str| {
            Err(Error::unsupported(
                image,
                format!(
                    "backing file '{name}' refused: {why} (backing policy {})",
                    self.name()
                ),
            ))
        };
        match (self, format) {
            (BackingPolicy::Follow, _) | (BackingPolicy::RequireFormat, Some(_)) => Ok(()),
            (BackingPolicy::RequireFormat, None) => refused(
                "the image does not record the backing file's format, and probing it is unsafe",
            ),
            (BackingPolicy::Refuse, _) => refused("images may not name backing files"),
        }
    }

    /// Checks that `image` may open the external data file it names `name` (always raw, so only
    /// [`BackingPolicy::Refuse`] refuses it).
    pub fn check_data_file(self, image: &Path, name: &str) -> Result<()> {
        if self == BackingPolicy::Refuse {
            return Err(Error::unsupported(
                image,
                format!(
                    "external data file '{name}' refused: images may not name other files \
                     (backing policy refuse)"
                ),
            ));
        }
        Ok(())
    }
}

/// State carried down a chain while it is opened.
#[derive(Debug, Default, Clone)]
pub struct ChainCtx {
    /// Canonical paths of the images opened so far, top first.
    pub seen: Vec<PathBuf>,
    /// What the images of the chain may open.
    pub policy: BackingPolicy,
    /// Passphrases of encrypted images of the chain by depth (0: the top image), as QEMU takes
    /// `encrypt.key-secret` and `backing.encrypt.key-secret`.
    pub secrets: Vec<Option<Passphrase>>,
}

impl ChainCtx {
    /// An empty chain opened under `policy`.
    pub fn new(policy: BackingPolicy) -> ChainCtx {
        ChainCtx {
            seen: Vec::new(),
            policy,
            secrets: Vec::new(),
        }
    }

    /// The passphrase given for the image entered last.
    pub fn secret(&self) -> Option<Passphrase> {
        let depth = self.seen.len().checked_sub(1)?;
        self.secrets.get(depth).cloned().flatten()
    }

    /// Records that `path` is being opened; fails on a loop or a chain that is too deep.
    pub fn enter(&mut self, path: &Path) -> Result<()> {
        let canonical =
            std::fs::canonicalize(path).map_err(|e| Error::io(path, "Could not open", e))?;
        if self.seen.contains(&canonical) {
            return Err(Error::invalid(
                path,
                "backing chain loop: the image is its own backing file",
            ));
        }
        if self.seen.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(
                path,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        self.seen.push(canonical);
        Ok(())
    }
}

/// Resolves the backing file name stored in `image` to a path.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::invalid(image, "empty backing file name"));
    }
    if has_protocol_prefix(name) {
        return Err(Error::unsupported(
            image,
            format!("backing file '{name}' uses a protocol prefix; only local files are allowed"),
        ));
    }
    let p = Path::new(name);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        image
            .parent()
            .map_or_else(|| p.to_path_buf(), |dir| dir.join(p))
    })
}

/// `json:{...}`, `nbd:...`, `file:...`, `http://...`: a word of letters, digits, `+`, `-`, `.`
/// followed by a colon, before any slash.
fn has_protocol_prefix(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => {
            let head = &name[..colon];
            !head.is_empty()
                && !head.contains('/')
                && head
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }
        None => false,
    }
}

/// The backing format: the one the header names, else the probed one.
pub fn backing_format(image: &Path, named: Option<&str>, backing: &Path) -> Result<Format> {
    match named {
        Some(name) => Format::from_name(name).map_err(|_| {
            Error::unsupported(image, format!("unknown backing file format '{name}'"))
        }),
        None => crate::image::probe(backing),
    }
}

/// The name shown as `full-backing-filename`: QEMU joins a relative name to the directory of the
/// image as the user named it.
pub fn full_name(image: &Path, name: &str) -> String {
    resolve_backing(image, name)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_image_directory() {
        let p = resolve_backing(Path::new("/a/b/top.qcow2"), "base.qcow2").unwrap();
        assert_eq!(p, Path::new("/a/b/base.qcow2"));
        let p = resolve_backing(Path::new("top.qcow2"), "base.qcow2").unwrap();
        assert_eq!(p, Path::new("base.qcow2"));
        let p = resolve_backing(Path::new("/a/top.qcow2"), "/c/base").unwrap();
        assert_eq!(p, Path::new("/c/base"));
    }

    #[test]
    fn protocol_names_are_refused() {
        for name in [
            "json:{\"file\":{}}",
            "nbd:localhost:10809",
            "http://x/y",
            "file:/etc/passwd",
        ] {
            assert!(
                resolve_backing(Path::new("/a/top"), name).is_err(),
                "{name}"
            );
        }
        assert!(resolve_backing(Path::new("/a/top"), "dir/with:colon").is_ok());
    }

    #[test]
    fn policies_refuse_what_they_say() {
        let top = Path::new("/a/top.qcow2");
        for (name, policy) in BackingPolicy::NAMES {
            assert_eq!(BackingPolicy::from_name(name).unwrap(), policy);
            assert_eq!(policy.name(), name);
        }
        assert!(BackingPolicy::from_name("probe").is_err());
        let follow = BackingPolicy::Follow;
        assert!(follow.check_backing(top, "/etc/passwd", None).is_ok());
        assert!(follow.check_data_file(top, "/etc/passwd").is_ok());
        let require = BackingPolicy::RequireFormat;
        assert!(require.check_backing(top, "base", Some("raw")).is_ok());
        let err = require.check_backing(top, "base", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/a/top.qcow2: backing file 'base' refused: the image does not record the backing \
             file's format, and probing it is unsafe (backing policy require-format)"
        );
        assert!(require.check_data_file(top, "data").is_ok());
        let refuse = BackingPolicy::Refuse;
        let err = refuse
            .check_backing(top, "base", Some("qcow2"))
            .unwrap_err();
        assert!(
            err.to_string().contains("backing file 'base' refused"),
            "{err}"
        );
        let err = refuse.check_data_file(top, "data").unwrap_err();
        assert!(
            err.to_string().contains("data file 'data' refused"),
            "{err}"
        );
    }
}
