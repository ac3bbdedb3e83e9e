//! `vdisk mount`: mount a file system inside an image, held by a background process.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use anyhow::{anyhow, bail, Context, Result};
use vdisk_formats::BlockDev;
use vdisk_nbd::fuse::{FuseMount, FuseOptions};
use vdisk_nbd::kernel::{self, ConnectOptions, Device};
use vdisk_nbd::{Export, Server};

use crate::daemon::{self, Event, Stderr};
use crate::errors::describe;
use crate::export::ImageArgs;
use crate::mounts::{self, MountState};
use crate::objects::Objects;

/// Mount a file system that lives inside a disk image.
///
/// Uses /dev/nbdN when the kernel has the nbd module; otherwise the image is exported as a
/// file through FUSE (in a private temporary directory) and attached to a loop device with
/// `losetup -P`. Partition N (-P) or the whole disk is then mounted at DIR, and a background
/// process keeps serving the image until `vdisk umount DIR` (or SIGTERM to that process),
/// which unmounts, detaches, flushes the image and ends the process, in that order.
/// Needs root.
///
/// Examples:
///
///   vdisk mount -P 1 disk.qcow2 /mnt/disk
///
///   vdisk mount --read-only -o noload -P 2 -f raw disk.img /mnt/disk
///
///   vdisk mount --object secret,id=s0,file=pass.txt --image-opts \
///       driver=luks,key-secret=s0,file.filename=disk.luks /mnt/disk
///
///   vdisk umount /mnt/disk
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Mount partition N (1-based, as in /dev/loop0pN); the whole disk when not given
    #[arg(short = 'P', long = "partition", value_name = "N")]
    partition: Option<u32>,

    /// Mount read-only; the image is opened read-only too
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,

    /// Format of the image (raw, qcow2, luks); probed when not given
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,

    /// IMAGE is a set of image options: driver=FMT,file.filename=PATH[,key-secret=ID]
    #[arg(long = "image-opts")]
    image_opts: bool,

    /// Define a secret for key-secret: secret,id=ID,data=TEXT or secret,id=ID,file=PATH
    #[arg(long = "object", value_name = "OBJDEF")]
    object: Vec<String>,

    /// Mount options, passed to mount(8) -o
    #[arg(short = 'o', long = "options", value_name = "OPTS")]
    options: Option<String>,

    /// File system type, passed to mount(8) -t; detected when not given
    #[arg(short = 't', long = "type", value_name = "FSTYPE")]
    fstype: Option<String>,

    /// The image holding the file system
    #[arg(value_name = "IMAGE")]
    image: String,

    /// Where to mount it (an existing directory)
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// What holds the image up while it is mounted.
enum Attachment {
    Fuse {
        mount: FuseMount,
        dir: PathBuf,
        loop_device: Option<PathBuf>,
    },
    Nbd(Device),
}

pub fn run(args: Args) -> Result<()> {
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        bail!("vdisk mount needs root (it attaches a block device and mounts it)");
    }
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("cannot use '{}' as mount point", args.dir.display()))?;
    if !dir.is_dir() {
        bail!("'{}' is not a directory", dir.display());
    }
    if let Some(old) = MountState::load(&dir)? {
        if mounts::process_running(old.pid) {
            bail!(
                "'{}' is already mounted by vdisk (process {})",
                dir.display(),
                old.pid
            );
        }
        MountState::remove(&dir)?;
    }
    let objects = Objects::parse(&args.object)?;
    let image_args = ImageArgs {
        format: args.format.clone(),
        read_only: args.read_only,
        discard: Some("unmap".into()),
        image_opts: args.image_opts,
        ..Default::default()
    };
    image_args.policy()?;
    let nbd = kernel::module_loaded();
    if !nbd && !Path::new("/dev/fuse").exists() {
        bail!("neither the nbd kernel module nor FUSE (/dev/fuse) is available");
    }
    let log = mounts::log_file(&dir)?;
    let child = daemon::fork()?;
    let (tx, events) = daemon::termination_events()?;
    let opened = image_args.open(&args.image, &objects)?;
    let (dev, image) = (opened.dev, std::path::absolute(opened.path)?);

    let attachment = attach(&dev, &image, nbd, args.read_only, tx)?;
    let source = match mount_fs(&args, &attachment, &dir) {
        Ok(source) => source,
        Err(e) => {
            let _ = detach(attachment, &dev);
            return Err(e);
        }
    };
    let state = MountState {
        dir: dir.clone(),
        pid: std::process::id() as i32,
        image: image.clone(),
        source,
        loop_device: match &attachment {
            Attachment::Fuse { loop_device, .. } => loop_device.clone(),
            Attachment::Nbd(_) => None,
        },
        fuse_dir: match &attachment {
            Attachment::Fuse { dir, .. } => Some(dir.clone()),
            Attachment::Nbd(_) => None,
        },
        nbd_device: match &attachment {
            Attachment::Nbd(d) => Some(d.path()),
            Attachment::Fuse { .. } => None,
        },
    };
    state.save()?;
    std::env::set_current_dir("/")?;
    child.ready(Stderr::File(&log))?;

    // Serve until told to stop; an unmount that fails (busy) keeps everything as it is.
    loop {
        let ended = match events.recv() {
            Ok(Event::Signal) => false,
            Ok(Event::Ended(r)) => {
                if let Err(e) = r {
                    eprintln!("vdisk mount: the image export ended: {e:#}");
                }
                true
            }
            Err(_) => true,
        };
        if mounts::is_mount_point(&dir) {
            if let Err(e) = unmount_dir(&dir) {
                eprintln!("vdisk mount: {e:#}");
                if !ended {
                    continue;
                }
            }
        }
        break;
    }
    match detach(attachment, &dev) {
        Ok(()) => MountState::remove(&dir),
        Err(e) => {
            eprintln!("vdisk mount: {e:#}");
            Err(e)
        }
    }
}

/// Exports the image as a block device: /dev/nbdN when the kernel can, else FUSE + loop.
fn attach(
    dev: &Arc<dyn BlockDev>,
    image: &Path,
    nbd: bool,
    read_only: bool,
    tx: mpsc::Sender<Event>,
) -> Result<Attachment> {
    if nbd {
        let server = Server::new(vec![Export::new("", dev.clone()).read_only(read_only)]);
        let mut opts = ConnectOptions::new(0, Default::default());
        opts.backend = Some(image.display().to_string());
        let device = kernel::attach(&server, "", 1, opts)
            .map_err(|e| anyhow!("cannot attach a /dev/nbd device: {e}"))?;
        let index = device.index();
        std::thread::spawn(move || {
            while kernel::is_connected(index) {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let _ = tx.send(Event::Ended(Ok(())));
        });
        return Ok(Attachment::Nbd(device));
    }
    let dir = private_dir()?;
    let opts = FuseOptions {
        read_only,
        ..Default::default()
    };
    let mount = match vdisk_nbd::fuse::mount(&dir, dev.clone(), &opts) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            return Err(e).context("cannot export the image through FUSE");
        }
    };
    let file = mount.file().display().to_string();
    let mut losetup = vec!["-P", "-f", "--show"];
    if read_only {
        losetup.push("-r");
    }
    losetup.push(&file);
    let loop_device = mounts::tool("losetup", &losetup);
    let attachment = Attachment::Fuse {
        mount,
        dir,
        loop_device: loop_device.as_ref().ok().map(PathBuf::from),
    };
    match loop_device {
        Ok(_) => Ok(attachment),
        Err(e) => {
            let _ = detach(attachment, dev);
            Err(e)
        }
    }
}

/// A new directory only root can enter, for the FUSE file.
fn private_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    for n in 0..1000 {
        let dir = base.join(format!("vdisk-mount-{}-{n}", std::process::id()));
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create '{}'", dir.display())),
        }
    }
    bail!(
        "cannot create a temporary directory in '{}'",
        base.display()
    )
}

/// Mounts the partition (or whole disk) at `dir`; returns the device mounted.
fn mount_fs(args: &Args, attachment: &Attachment, dir: &Path) -> Result<PathBuf> {
    let disk = match attachment {
        Attachment::Fuse { loop_device, .. } => loop_device
            .clone()
            .ok_or_else(|| anyhow!("no loop device"))?,
        Attachment::Nbd(d) => d.path(),
    };
    let source = match args.partition {
        Some(0) => bail!("partitions are numbered from 1"),
        Some(n) => mounts::partition(&disk, n)?,
        None => disk,
    };
    let source_name = source.display().to_string();
    let dir_name = dir.display().to_string();
    let mut mount_args = Vec::new();
    if args.read_only {
        mount_args.push("-r");
    }
    if let Some(o) = &args.options {
        mount_args.extend(["-o", o.as_str()]);
    }
    if let Some(t) = &args.fstype {
        mount_args.extend(["-t", t.as_str()]);
    }
    mount_args.extend([source_name.as_str(), dir_name.as_str()]);
    mounts::tool("mount", &mount_args)?;
    Ok(source)
}

/// `umount DIR`, retried for a moment while the file system is busy.
fn unmount_dir(dir: &Path) -> Result<()> {
    let name = dir.display().to_string();
    let mut last = None;
    for _ in 0..10 {
        match mounts::tool("umount", &[&name]) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Err(last.unwrap())
}

/// Detaches the block device, ends the export and flushes the image, in that order.
fn detach(attachment: Attachment, dev: &Arc<dyn BlockDev>) -> Result<()> {
    match attachment {
        Attachment::Nbd(device) => {
            if kernel::is_connected(device.index()) {
                let path = device.path();
                device
                    .disconnect()
                    .map_err(|e| anyhow!("cannot disconnect {}: {e}", path.display()))?;
            }
        }
        Attachment::Fuse {
            mount,
            dir,
            loop_device,
        } => {
            if let Some(l) = loop_device {
                mounts::detach_loop(&l)?;
            }
            mount.unmount().context("cannot end the FUSE export")?;
            let _ = std::fs::remove_dir(dir);
        }
    }
    dev.flush()
        .map_err(|e| anyhow!("cannot flush the image: {}", describe(&e)))
}
