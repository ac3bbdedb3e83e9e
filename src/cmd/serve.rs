//! `vdisk serve`: export an image over NBD with qemu-nbd's options, or as a file through FUSE.

use std::net::{TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use vdisk_nbd::{Export, Listener, Server, TlsConfig};

use crate::daemon::{self, Event, Stderr};
use crate::export::ImageArgs;
use crate::image_args::ImageRef;
use crate::numbers::parse_int;
use crate::objects::{Endpoint, Objects};

/// Export a disk image over NBD (like qemu-nbd), or as a regular file through FUSE.
///
/// Serves FILE on a Unix socket (-k) or on TCP (-p/-b). Unlike qemu-nbd, which binds 0.0.0.0,
/// `vdisk serve` listens on 127.0.0.1 unless -b says otherwise. Without -t the server exits
/// when the last client disconnects. SIGTERM or SIGINT end it cleanly: the image is flushed and
/// the socket removed. The same binary run as `qemu-nbd` (a link of that name) takes
/// qemu-nbd's full command line, with -c, -d and -L.
///
/// Examples:
///
///   vdisk serve -k /tmp/disk.sock -t disk.qcow2
///
///   vdisk serve -p 10809 -b 0.0.0.0 -x disk -r --fork --pid-file /run/nbd.pid disk.qcow2
///
///   vdisk serve -s -k /tmp/scratch.sock base.qcow2       (writes go to a throw-away overlay)
///
///   vdisk serve --tls-creds /etc/pki/vdisk -p 10809 disk.raw
///
///   vdisk serve --fuse /tmp/disk.img disk.qcow2          (then: losetup -P -f /tmp/disk.img)
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub image: ImageArgs,

    /// Export the image as a regular file through FUSE instead of NBD: FILE is an existing file
    /// (replaced by the image while served) or a directory (the image appears as DIR/disk)
    #[arg(long = "fuse", value_name = "FILE", conflicts_with_all = ["socket", "port", "bind", "tls_creds"])]
    pub fuse: Option<PathBuf>,

    /// The image to export
    #[arg(value_name = "FILE")]
    pub file: String,
}

/// qemu-nbd's connection and general options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// TCP port to listen on (default 10809)
    #[arg(
        short = 'p',
        long = "port",
        value_name = "PORT",
        allow_hyphen_values = true
    )]
    pub port: Option<String>,

    /// Address to listen on (vdisk serve: 127.0.0.1 by default; as qemu-nbd: 0.0.0.0)
    #[arg(short = 'b', long = "bind", value_name = "IFACE")]
    pub bind: Option<String>,

    /// Listen on this Unix socket instead of TCP
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Serve at most NUM clients at once (default 1; 0 means no limit). With more than one,
    /// clients are told they may use several connections (multi-conn)
    #[arg(
        short = 'e',
        long = "shared",
        value_name = "NUM",
        allow_hyphen_values = true
    )]
    pub shared: Option<String>,

    /// Keep running after the last client disconnects
    #[arg(short = 't', long = "persistent")]
    pub persistent: bool,

    /// Stay in the foreground (with -c) and print what happens
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,

    /// Export name (default: the empty name)
    #[arg(short = 'x', long = "export-name", value_name = "NAME")]
    pub export_name: Option<String>,

    /// Human-readable description of the export
    #[arg(short = 'D', long = "description", value_name = "TEXT")]
    pub description: Option<String>,

    /// Hang up on clients that take longer than N seconds to finish the handshake (default 10;
    /// 0 means no limit)
    #[arg(long = "handshake-limit", value_name = "N", allow_hyphen_values = true)]
    pub handshake_limit: Option<String>,

    /// Offer the qemu:allocation-depth metadata context
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,

    /// Expose a persistent dirty bitmap (not supported: refused)
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    pub bitmap: Vec<String>,

    /// Require TLS: the id of a tls-creds-x509 --object, or a directory holding
    /// server-cert.pem, server-key.pem and ca-cert.pem (clients must then present a
    /// certificate signed by ca-cert.pem, as with qemu's default verify-peer=on)
    #[arg(long = "tls-creds", value_name = "ID|DIR")]
    pub tls_creds: Option<String>,

    /// Authorization object for TLS clients (not supported: refused)
    #[arg(long = "tls-authz", value_name = "ID")]
    pub tls_authz: Option<String>,

    /// Host name to check the server certificate against (-L only)
    #[arg(long = "tls-hostname", value_name = "HOSTNAME")]
    pub tls_hostname: Option<String>,

    /// Tracing options (accepted and ignored)
    #[arg(short = 'T', long = "trace", value_name = "OPTS")]
    pub trace: Vec<String>,

    /// Go to the background once the server is running; errors before that are printed and
    /// make the command fail
    #[arg(long = "fork")]
    pub fork: bool,

    /// Write the server's process id to this file (removed when the server exits)
    #[arg(long = "pid-file", value_name = "PATH")]
    pub pid_file: Option<PathBuf>,

    /// SELinux label of the listening socket (not supported: refused)
    #[arg(long = "selinux-label", value_name = "LABEL")]
    pub selinux_label: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    match &args.fuse {
        Some(target) => serve_fuse(&args.server, &args.image, &args.file, target),
        None => serve(&args.server, &args.image, &args.file, "127.0.0.1"),
    }
}

/// Checks the options shared by every mode; returns the TLS configuration, if any.
fn check(
    server: &ServerArgs,
    image: &ImageArgs,
    file: &str,
    objects: &Objects,
) -> Result<Option<TlsConfig>> {
    image.policy()?;
    if let Some(name) = server.bitmap.first() {
        if !has_bitmap(image, file, name) {
            bail!("Bitmap '{name}' is not found");
        }
        bail!(
            "Bitmap '{name}' cannot be exported: vdisk serve has no qemu:dirty-bitmap context \
             (`vdisk bitmap` and `vdisk convert --bitmaps` work with dirty bitmaps)"
        );
    }
    if server.selinux_label.is_some() {
        bail!("SELinux support not enabled in this binary");
    }
    for (what, text) in [
        ("export name", &server.export_name),
        ("export description", &server.description),
    ] {
        if let Some(t) = text.as_ref().filter(|t| t.len() > 4096) {
            bail!("{what} '{t}' too long");
        }
    }
    match &server.tls_creds {
        None => {
            if server.tls_authz.is_some() {
                bail!("--tls-authz is not permitted without --tls-creds");
            }
            if server.tls_hostname.is_some() {
                bail!("--tls-hostname is not permitted without --tls-creds");
            }
            Ok(None)
        }
        Some(creds) => {
            if server.tls_hostname.is_some() {
                bail!("TLS hostname is only supported with export list");
            }
            if server.tls_authz.is_some() {
                bail!("--tls-authz is not supported by vdisk");
            }
            tls_config(creds, objects).map(Some)
        }
    }
}

/// `--tls-creds ID` (an object) or `--tls-creds DIR`.
fn tls_config(creds: &str, objects: &Objects) -> Result<TlsConfig> {
    let (dir, verify_peer) = match objects.tls_creds(creds, Endpoint::Server) {
        Ok((dir, verify)) => (dir.to_path_buf(), verify),
        Err(_) if Path::new(creds).is_dir() => (PathBuf::from(creds), true),
        Err(e) => return Err(e).context("Failed to get TLS creds"),
    };
    TlsConfig::from_dir(&dir, verify_peer).map_err(|e| anyhow!("Failed to get TLS creds: {e}"))
}

/// Reads `-e`: `None` for no limit.
fn shared_limit(server: &ServerArgs) -> Result<Option<usize>> {
    let Some(text) = &server.shared else {
        return Ok(Some(1));
    };
    match parse_int(text) {
        Ok(0) => Ok(None),
        Ok(n) if n > 0 && n <= i64::from(i32::MAX) => Ok(Some(n as usize)),
        _ => bail!("Invalid shared device number '{text}'"),
    }
}

fn handshake_limit(server: &ServerArgs) -> Result<Option<Duration>> {
    let Some(text) = &server.handshake_limit else {
        return Ok(Some(Duration::from_secs(10)));
    };
    match parse_int(text) {
        Ok(0) => Ok(None),
        Ok(n) if n > 0 && n <= i64::from(i32::MAX) => Ok(Some(Duration::from_secs(n as u64))),
        _ => bail!("Invalid handshake limit '{text}'"),
    }
}

/// Where to listen.
#[derive(Debug)]
enum Address {
    Unix(PathBuf),
    Tcp(String, u16),
}

impl Address {
    fn from_args(server: &ServerArgs, default_bind: &str) -> Result<Address> {
        if let Some(path) = &server.socket {
            return Ok(Address::Unix(std::path::absolute(path)?));
        }
        let port = match &server.port {
            None => 10809,
            Some(p) => p.parse().map_err(|_| anyhow!("Invalid port '{p}'"))?,
        };
        Ok(Address::Tcp(
            server
                .bind
                .clone()
                .unwrap_or_else(|| default_bind.to_string()),
            port,
        ))
    }

    fn bind(&self) -> Result<Vec<Listener>> {
        match self {
            Address::Unix(path) => {
                let l = UnixListener::bind(path)
                    .with_context(|| format!("Failed to bind socket to {}", path.display()))?;
                Ok(vec![l.into()])
            }
            Address::Tcp(host, port) => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .with_context(|| format!("address resolution failed for {host}:{port}"))?
                    .collect();
                let mut listeners = Vec::new();
                for a in &addrs {
                    let l = TcpListener::bind(a)
                        .with_context(|| format!("Failed to bind socket to {a}"))?;
                    listeners.push(l.into());
                }
                Ok(listeners)
            }
        }
    }
}

/// The NBD server of `vdisk serve` and `qemu-nbd`; `default_bind` is the TCP address used
/// without -b.
pub fn serve(server: &ServerArgs, image: &ImageArgs, file: &str, default_bind: &str) -> Result<()> {
    let objects = Objects::parse(&image.object)?;
    let tls = check(server, image, file, &objects)?;
    let max_connections = shared_limit(server)?;
    let limit = handshake_limit(server)?;
    let address = Address::from_args(server, default_bind)?;
    let background = server.fork.then(daemon::fork).transpose()?;
    let (tx, events) = daemon::termination_events()?;

    let opened = image.open(file, &objects)?;
    let export = Export::new(
        server.export_name.clone().unwrap_or_default(),
        opened.dev.clone(),
    )
    .description(server.description.clone().unwrap_or_default())
    .read_only(opened.read_only)
    .allocation_depth(server.allocation_depth);
    let mut nbd = Server::new(vec![export])
        .max_connections(max_connections)
        .handshake_limit(limit)
        .persistent(server.persistent);
    if let Some(config) = tls {
        nbd = nbd.tls(config, true);
    }
    let listeners = address.bind()?;
    let mut threads = Vec::new();
    for listener in listeners {
        let nbd = nbd.clone();
        let tx = tx.clone();
        threads.push(std::thread::spawn(move || {
            let result = nbd.serve(listener).map_err(anyhow::Error::from);
            let _ = tx.send(Event::Ended(result));
        }));
    }
    let started = (|| {
        if let Some(pid_file) = &server.pid_file {
            daemon::write_pid_file(pid_file)?;
        }
        std::env::set_current_dir("/").context("Could not chdir to root directory")?;
        if let Some(child) = background {
            child.ready(Stderr::Original)?;
        }
        Ok(())
    })();
    let outcome = match started {
        Ok(()) => match events.recv() {
            Ok(Event::Ended(r)) => r,
            _ => Ok(()),
        },
        Err(e) => Err(e),
    };
    nbd.shutdown();
    for t in threads {
        let _ = t.join();
    }
    let flushed = opened
        .dev
        .flush()
        .map_err(|e| anyhow!("Failed to flush '{}': {e}", opened.path.display()));
    if let Address::Unix(path) = &address {
        let _ = std::fs::remove_file(path);
    }
    if let Some(pid_file) = &server.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    outcome.and(flushed)
}

/// `vdisk serve --fuse TARGET`: the image as a regular file until a signal or an unmount.
fn serve_fuse(server: &ServerArgs, image: &ImageArgs, file: &str, target: &Path) -> Result<()> {
    let objects = Objects::parse(&image.object)?;
    check(server, image, file, &objects)?;
    let target = std::path::absolute(target)?;
    let background = server.fork.then(daemon::fork).transpose()?;
    let (tx, events) = daemon::termination_events()?;
    let opened = image.open(file, &objects)?;
    let opts = vdisk_nbd::fuse::FuseOptions {
        read_only: opened.read_only,
        ..Default::default()
    };
    let mount = vdisk_nbd::fuse::mount(&target, opened.dev.clone(), &opts)
        .with_context(|| format!("cannot mount '{}' through FUSE", target.display()))?;
    let waiter = std::thread::spawn(move || {
        let r = mount.join().map_err(anyhow::Error::from);
        let _ = tx.send(Event::Ended(r));
    });
    if let Some(pid_file) = &server.pid_file {
        daemon::write_pid_file(pid_file)?;
    }
    std::env::set_current_dir("/").context("Could not chdir to root directory")?;
    if let Some(child) = background {
        child.ready(Stderr::Original)?;
    }
    // A signal unmounts (the waiter then reports the end); while the file is busy the unmount
    // fails and the export goes on, so no write in flight is lost.
    let outcome = loop {
        match events.recv() {
            Ok(Event::Signal) => {
                if let Err(e) = crate::mounts::unmount_fuse(&target) {
                    eprintln!("{}: {e:#}", crate::prog::name());
                }
            }
            Ok(Event::Ended(r)) => break r,
            Err(_) => break Ok(()),
        }
    };
    let _ = waiter.join();
    if let Some(pid_file) = &server.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    outcome.and(
        opened
            .dev
            .flush()
            .map_err(|e| anyhow!("Failed to flush '{}': {e}", opened.path.display())),
    )
}

/// Whether the qcow2 image `file` has a persistent dirty bitmap called `name`.
fn has_bitmap(image: &ImageArgs, file: &str, name: &str) -> bool {
    let Ok(image) = ImageRef::parse(file, image.format.as_deref(), image.image_opts) else {
        return false;
    };
    let info = vdisk_formats::describe(&image.path, None);
    match info.ok().and_then(|i| i.format_specific) {
        Some(vdisk_formats::FormatSpecific::Qcow2(q)) => {
            q.bitmaps.unwrap_or_default().iter().any(|b| b.name == name)
        }
        _ => false,
    }
}
