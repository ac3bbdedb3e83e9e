//! Backing chains: resolving a backing file name, choosing its format, and guarding against loops
//! and runaway depth.
//!
//! A backing name is resolved against the directory of the image that names it (as QEMU does).
//! Names with a protocol prefix (`json:`, `nbd:`, `http://` ...) are refused: an image must not make
//! vdisk open anything but a local file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::Format;

/// Deepest backing chain vdisk opens.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// State carried down a chain while it is opened.
#[derive(Debug, Default, Clone)]
pub struct ChainCtx {
    /// Canonical paths of the images opened so far, top first.
    pub seen: Vec<PathBuf>,
}

impl ChainCtx {
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
}
