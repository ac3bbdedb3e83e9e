//! The binary run as `qemu-nbd` (through a link of that name): qemu-nbd 10.0's command line,
//! serving with `vdisk serve`'s server, attaching with `vdisk connect`, and listing with `-L`.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use crate::cmd::connect;
use crate::cmd::serve::{self, ServerArgs};
use crate::errors::os_message;
use crate::export::ImageArgs;
use crate::nbd_list::{self, ClientTls};
use crate::objects::{Endpoint, Objects};

/// QEMU Disk Network Block Device Utility (vdisk): serve FILE, list a server's exports (-L),
/// or attach FILE to /dev/nbdN (-c) and detach it (-d DEV)
#[derive(Parser, Debug)]
#[command(name = "qemu-nbd", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    server: ServerArgs,

    #[command(flatten)]
    image: ImageArgs,

    /// Connect FILE to the local NBD device DEV
    #[arg(short = 'c', long = "connect", value_name = "DEV")]
    connect: Option<PathBuf>,

    /// Disconnect the specified device
    #[arg(short = 'd', long = "disconnect")]
    disconnect: bool,

    /// List exports available from another NBD server (-k, or -b and -p, say where)
    #[arg(short = 'L', long = "list")]
    list: bool,

    /// The image (or, with -d, the device)
    #[arg(value_name = "FILE")]
    files: Vec<String>,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qemu-nbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if cli.list {
        return list(&cli);
    }
    let [file] = cli.files.as_slice() else {
        bail!("Invalid number of arguments\nTry `qemu-nbd --help' for more information.");
    };
    if cli.disconnect {
        return connect::disconnect(file.as_ref());
    }
    if let Some(dev) = &cli.connect {
        if cli.server.tls_creds.is_some() {
            bail!("TLS is not supported with a host device");
        }
        return connect::connect(dev, &cli.image, file, cli.server.verbose);
    }
    serve::serve(&cli.server, &cli.image, file, "0.0.0.0")
}

/// `-L`: list the exports of the server at -k, or -b (default 0.0.0.0) and -p.
fn list(cli: &Cli) -> Result<()> {
    let s = &cli.server;
    if !cli.files.is_empty() {
        bail!("List mode is incompatible with a file name");
    }
    if s.export_name.is_some()
        || s.description.is_some()
        || cli.connect.is_some()
        || cli.disconnect
        || !s.bitmap.is_empty()
        || s.allocation_depth
        || cli.image.any_per_device()
    {
        bail!("List mode is incompatible with per-device settings");
    }
    if s.fork {
        bail!("List mode is incompatible with forking");
    }
    let host = s.bind.as_deref().unwrap_or("0.0.0.0");
    let objects = Objects::parse(&cli.image.object)?;
    let creds = match &s.tls_creds {
        None => {
            if s.tls_hostname.is_some() {
                bail!("--tls-hostname is not permitted without --tls-creds");
            }
            None
        }
        Some(id) => Some(
            objects
                .tls_creds(id, Endpoint::Client)
                .context("Failed to get TLS creds")?
                .0
                .to_path_buf(),
        ),
    };
    // qemu checks the server's certificate against --tls-hostname, else the -b address.
    let tls = creds.as_deref().map(|dir| ClientTls {
        dir,
        hostname: s.tls_hostname.as_deref().unwrap_or(host),
    });
    let exports = match &s.socket {
        Some(path) => {
            let sock = UnixStream::connect(path).map_err(|e| {
                anyhow!(
                    "Failed to connect to '{}': {}",
                    path.display(),
                    os_message(&e)
                )
            })?;
            nbd_list::list_exports(sock, tls.as_ref())?
        }
        None => {
            let port = s.port.as_deref().unwrap_or("10809");
            let addr = format!("{host}:{port}");
            let sock = TcpStream::connect(&addr)
                .map_err(|e| anyhow!("Failed to connect to '{addr}': {}", os_message(&e)))?;
            nbd_list::list_exports(sock, tls.as_ref())?
        }
    };
    print!("{}", nbd_list::render(&exports));
    Ok(())
}
