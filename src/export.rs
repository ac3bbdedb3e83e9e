//! Opening an image to export it (`vdisk serve`, `vdisk connect`, `qemu-nbd`): qemu-nbd's block
//! device options, read and applied in one place.
//!
//! ```text
//!   FILE or --image-opts ──open──> image ──-s──> temporary qcow2 overlay (backing: image)
//!                                         └──> Tuned (-o, --cache, --discard, --detect-zeroes)
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use vdisk_formats::{BlockDev, CreateOptions, Format, OpenOptions};

use crate::errors::describe;
use crate::image_args::{ImageRef, SnapshotCopy};
use crate::numbers::parse_u64;
use crate::objects::Objects;
use crate::tuned::{DetectZeroes, Flushing, Policy, Tuned};

/// qemu-nbd's "Block device options".
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ImageArgs {
    /// Image format (raw, qcow2); probed when not given
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    pub format: Option<String>,

    /// Export read-only: writes are refused
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,

    /// Leave FILE untouched: writes go to a temporary qcow2 overlay (in $TMPDIR, backed by FILE)
    /// that disappears when the export ends
    #[arg(short = 's', long = "snapshot")]
    pub snapshot: bool,

    /// Export an internal snapshot of FILE read-only: snapshot.id=ID, snapshot.name=NAME, or an
    /// id or name (vdisk reads it from a temporary reverted copy of the image)
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT_PARAM")]
    pub load_snapshot: Option<String>,

    /// Export the image from this byte offset on
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    pub offset: Option<String>,

    /// Same as --cache=none
    #[arg(short = 'n', long = "nocache")]
    pub nocache: bool,

    /// Cache mode: writeback (default) and none flush when the client asks; writethrough and
    /// directsync flush after every write; unsafe ignores flushes until the export ends
    #[arg(long = "cache", value_name = "MODE")]
    pub cache: Option<String>,

    /// AIO mode: threads, native or io_uring (accepted; vdisk always uses threads)
    #[arg(long = "aio", value_name = "MODE")]
    pub aio: Option<String>,

    /// Discard mode: ignore (default, as qemu-nbd: trims succeed and change nothing) or unmap
    /// (trims release space in the image)
    #[arg(long = "discard", value_name = "MODE")]
    pub discard: Option<String>,

    /// Turn written zero buffers into zero writes: off (default), on, or unmap (also release
    /// the space; needs --discard=unmap)
    #[arg(long = "detect-zeroes", value_name = "MODE")]
    pub detect_zeroes: Option<String>,

    /// FILE is a set of image options: driver=FMT,file.filename=PATH[,key-secret=ID]
    #[arg(long = "image-opts")]
    pub image_opts: bool,

    /// Define an object: secret,id=ID,data=TEXT|file=PATH or
    /// tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=off]
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
}

/// What is being exported.
#[derive(Debug)]
pub struct Opened {
    /// The device to serve, with every policy applied.
    pub dev: Arc<dyn BlockDev>,
    /// The image file, for messages and `/sys/block/nbdN/backend`.
    pub path: PathBuf,
    pub read_only: bool,
}

impl ImageArgs {
    /// Checks the option values, with qemu-nbd's messages, before anything is opened.
    pub fn policy(&self) -> Result<Policy> {
        if self.nocache && self.cache.is_some() {
            bail!("-n and --cache can only be specified once");
        }
        let cache = if self.nocache {
            "none"
        } else {
            self.cache.as_deref().unwrap_or("writeback")
        };
        let flushing = match cache {
            "writeback" | "none" => Flushing::OnRequest,
            "writethrough" | "directsync" => Flushing::EveryWrite,
            "unsafe" => Flushing::Never,
            other => bail!("Invalid cache mode `{other}'"),
        };
        if let Some(aio) = &self.aio {
            if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
                bail!("Invalid aio mode '{aio}'");
            }
        }
        let unmap = match self.discard.as_deref().unwrap_or("ignore") {
            "ignore" | "off" => false,
            "unmap" | "on" => true,
            other => bail!("Invalid discard mode `{other}'"),
        };
        let detect_zeroes = match self.detect_zeroes.as_deref().unwrap_or("off") {
            "off" => DetectZeroes::Off,
            "on" => DetectZeroes::On,
            "unmap" => DetectZeroes::Unmap,
            other => bail!(
                "Failed to parse detect_zeroes mode: Parameter 'detect-zeroes' does not accept value '{other}'"
            ),
        };
        if detect_zeroes == DetectZeroes::Unmap && !unmap {
            bail!("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
        }
        let offset = match &self.offset {
            None => 0,
            Some(text) => parse_u64(text).map_err(|_| anyhow!("Invalid offset '{text}'"))?,
        };
        Ok(Policy {
            offset,
            flushing,
            unmap,
            detect_zeroes,
        })
    }

    /// Whether any option that only makes sense for one exported image was given (qemu-nbd
    /// refuses them in list mode).
    pub fn any_per_device(&self) -> bool {
        self.format.is_some()
            || self.read_only
            || self.load_snapshot.is_some()
            || self.offset.is_some()
            || self.nocache
            || self.cache.is_some()
            || self.aio.is_some()
            || self.discard.is_some()
    }

    /// Opens `file` with every option applied; `objects` holds the secret of an encrypted image
    /// (`--image-opts ...,key-secret=ID`).
    pub fn open(&self, file: &str, objects: &Objects) -> Result<Opened> {
        let policy = self.policy()?;
        if self.image_opts && self.format.is_some() {
            // qemu-nbd's wording (qemu-img says --format).
            bail!("--image-opts and -f are mutually exclusive");
        }
        let image =
            ImageRef::parse(file, self.format.as_deref(), self.image_opts)?.with_secret(objects)?;
        // -l exports the snapshot read-only, as qemu-nbd does.
        let read_only = self.read_only || self.load_snapshot.is_some();
        let dev = self.open_device(&image, read_only).map_err(|e| {
            // qemu-nbd words a failed open "Failed to blk_new_open 'X': ..." where qemu-img
            // says "Could not open 'X': ...".
            let text = format!("{e:#}");
            let ours = format!("Could not open '{}': ", image.display);
            match text.strip_prefix(&ours) {
                Some(why) => anyhow!("Failed to blk_new_open '{}': {why}", image.display),
                None => e,
            }
        })?;
        Ok(Opened {
            dev: Tuned::wrap(dev, policy)?,
            path: image.path,
            read_only,
        })
    }

    /// The device `open` exports, before the policy wraps it.
    fn open_device(&self, image: &ImageRef, read_only: bool) -> Result<Arc<dyn BlockDev>> {
        Ok(if let Some(spec) = &self.load_snapshot {
            if self.snapshot {
                bail!("-s and -l cannot be used together");
            }
            // A reverted copy of the image, unlinked as soon as it is open: nothing is left
            // behind however the process ends.
            let copy = SnapshotCopy::new(image, spec)?;
            copy.image.open(true, false)?
        } else {
            let format = image.format_or_probe(read_only)?;
            if self.snapshot {
                open_overlay(image, format, read_only)?
            } else {
                image.open_as(format, read_only, false)?
            }
        })
    }
}

/// `-s`: a new qcow2 file in the temporary directory whose backing file is the image, opened and
/// unlinked at once, so nothing is left behind however the process ends. The image itself is
/// only read (an encrypted one could not be unlocked as a backing file, so it is refused).
fn open_overlay(image: &ImageRef, format: Format, read_only: bool) -> Result<Arc<dyn BlockDev>> {
    if image.secret.is_some() {
        bail!("-s is not supported for encrypted images");
    }
    let base = std::path::absolute(&image.path)?;
    let dir = std::env::temp_dir();
    let overlay = (0..100)
        .map(|n| dir.join(format!("vdisk-snapshot-{}-{n}.qcow2", std::process::id())))
        .find(|p| {
            std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(p)
                .is_ok()
        })
        .ok_or_else(|| anyhow!("cannot create a temporary file in '{}'", dir.display()))?;
    let created = (|| {
        let create = vdisk_formats::qcow2::CreateOptions {
            backing_file: Some(base.to_string_lossy().into_owned()),
            backing_format: Some(format.name().to_string()),
            ..Default::default()
        };
        vdisk_formats::create(&overlay, &CreateOptions::Qcow2(create))?;
        vdisk_formats::open(
            &overlay,
            OpenOptions {
                format: Some(Format::Qcow2),
                read_only,
                no_backing: false,
                backing_policy: crate::backing_policy::get(),
            },
        )
    })();
    let _ = std::fs::remove_file(&overlay);
    created.map_err(|e| {
        anyhow!(
            "Could not create the temporary overlay for '{}': {}",
            image.display,
            describe(&e)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_options_are_checked_like_qemu_nbd() {
        let err = |a: ImageArgs| a.policy().unwrap_err().to_string();
        let base = ImageArgs::default();
        assert!(!base.policy().unwrap().unmap);
        assert_eq!(
            err(ImageArgs {
                cache: Some("fast".into()),
                ..base.clone()
            }),
            "Invalid cache mode `fast'"
        );
        assert_eq!(
            err(ImageArgs {
                detect_zeroes: Some("unmap".into()),
                ..base.clone()
            }),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        );
        assert_eq!(
            err(ImageArgs {
                nocache: true,
                cache: Some("none".into()),
                ..base.clone()
            }),
            "-n and --cache can only be specified once"
        );
        let p = ImageArgs {
            cache: Some("unsafe".into()),
            discard: Some("unmap".into()),
            offset: Some("0x1000".into()),
            ..base
        }
        .policy()
        .unwrap();
        assert_eq!(p.flushing, Flushing::Never);
        assert!(p.unmap);
        assert_eq!(p.offset, 4096);
    }
}
