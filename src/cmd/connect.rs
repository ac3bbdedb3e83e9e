//! `vdisk connect`: attach an image to /dev/nbdN through the kernel's NBD client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use vdisk_nbd::kernel::{self, ConnectOptions, KernelError};
use vdisk_nbd::{Export, Server};

use crate::daemon::{self, Event, Stderr};
use crate::export::ImageArgs;
use crate::objects::Objects;

/// Connect an image to a /dev/nbdN device (like qemu-nbd -c).
///
/// Serves the image to the kernel's NBD client over socket pairs, so the device reads and writes
/// the image. Goes to the background once the device is connected (-v stays in the
/// foreground); `vdisk disconnect /dev/nbdN` or SIGTERM ends it and flushes the image. Needs
/// root and the nbd kernel module (`modprobe nbd max_part=16`); without the module,
/// `vdisk mount` still mounts file systems from images, through FUSE and a loop device.
///
/// Examples:
///
///   vdisk connect /dev/nbd0 disk.qcow2
///
///   vdisk connect -r -f raw /dev/nbd1 disk.img
///
///   vdisk disconnect /dev/nbd0
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageArgs,

    /// Stay in the foreground and say when the device is connected
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,

    /// The device, /dev/nbdN
    #[arg(value_name = "DEVICE")]
    device: PathBuf,

    /// The image to attach
    #[arg(value_name = "FILE")]
    file: String,
}

pub fn run(args: Args) -> Result<()> {
    connect(&args.device, &args.image, &args.file, args.verbose)
}

/// The error for a kernel without the nbd module, pointing at what works without it.
pub fn kernel_error(e: KernelError) -> anyhow::Error {
    match e {
        KernelError::ModuleMissing => anyhow!(
            "{e}\n(to mount a file system from an image without the module, use \
             `vdisk mount [-P N] IMAGE DIR`)"
        ),
        other => anyhow!(other),
    }
}

/// Attaches `file` to `device` and serves it until the device is disconnected; in the
/// background unless `foreground`.
pub fn connect(device: &Path, image: &ImageArgs, file: &str, foreground: bool) -> Result<()> {
    let index = kernel::device_index(device)
        .ok_or_else(|| anyhow!("'{}' is not an NBD device (/dev/nbdN)", device.display()))?;
    if !kernel::module_loaded() {
        return Err(kernel_error(KernelError::ModuleMissing));
    }
    image.policy()?;
    let objects = Objects::parse(&image.object)?;
    let background = (!foreground).then(daemon::fork).transpose()?;
    let (tx, events) = daemon::termination_events()?;
    let opened = image.open(file, &objects)?;
    let server = Server::new(vec![
        Export::new("", opened.dev.clone()).read_only(opened.read_only)
    ]);
    let mut opts = ConnectOptions::new(0, Default::default());
    opts.index = Some(index);
    opts.backend = Some(opened.path.display().to_string());
    let mut dev = kernel::attach(&server, "", 1, opts).map_err(kernel_error)?;
    if foreground {
        eprintln!(
            "NBD device {} is now connected to {}",
            device.display(),
            opened.path.display()
        );
    }
    std::env::set_current_dir("/")?;
    if let Some(child) = background {
        child.ready(Stderr::Null)?;
    }
    std::thread::spawn(move || {
        while kernel::is_connected(index) {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = tx.send(Event::Ended(Ok(())));
    });
    if let Ok(Event::Signal) = events.recv() {
        kernel::disconnect(index).map_err(kernel_error)?;
    }
    dev.wait().map_err(kernel_error)?;
    opened
        .dev
        .flush()
        .map_err(|e| anyhow!("Failed to flush '{}': {e}", opened.path.display()))
}

/// `vdisk disconnect` / `qemu-nbd -d`: prints `DEVICE disconnected` as qemu-nbd does.
pub fn disconnect(device: &Path) -> Result<()> {
    let Some(index) = kernel::device_index(device) else {
        bail!("'{}' is not an NBD device (/dev/nbdN)", device.display());
    };
    kernel::disconnect(index).map_err(kernel_error)?;
    println!("{} disconnected", device.display());
    Ok(())
}
