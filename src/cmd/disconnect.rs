//! `vdisk disconnect`: detach a /dev/nbdN device attached by `vdisk connect`.

use std::path::PathBuf;

use anyhow::Result;

/// Disconnect a /dev/nbdN device (like qemu-nbd -d).
///
/// The process serving the device then flushes the image and exits.
///
/// Examples:
///
///   vdisk disconnect /dev/nbd0
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The device, /dev/nbdN
    #[arg(value_name = "DEVICE")]
    device: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    crate::cmd::connect::disconnect(&args.device)
}
