//! The backing-file policy of this run: which files named inside an image (backing files,
//! external data files) opening it may open. Set by `--backing-policy`, or by the environment
//! variable [`ENV`] for scripts that run vdisk as `qemu-img` or `qemu-nbd`; QEMU's behaviour
//! (follow them all) otherwise.

use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use vdisk_formats::BackingPolicy;

/// The environment variable that sets the policy when `--backing-policy` does not.
pub const ENV: &str = "VDISK_BACKING_POLICY";

static POLICY: OnceLock<BackingPolicy> = OnceLock::new();

/// Fixes the policy of this run from `--backing-policy` (`option`), else from [`ENV`]. Called
/// once, before any image is opened; a bad name in the environment is an error.
pub fn init(option: Option<&str>) -> Result<()> {
    let policy = match option {
        Some(name) => parse(name, "--backing-policy")?,
        None => match std::env::var(ENV) {
            Ok(name) if !name.is_empty() => parse(&name, ENV)?,
            _ => BackingPolicy::Follow,
        },
    };
    let _ = POLICY.set(policy);
    Ok(())
}

/// The policy every image of this run is opened under.
pub fn get() -> BackingPolicy {
    POLICY.get().copied().unwrap_or_default()
}

fn parse(name: &str, source: &str) -> Result<BackingPolicy> {
    BackingPolicy::from_name(name).map_err(|e| anyhow!("{source}: {e}"))
}
