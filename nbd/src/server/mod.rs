//! The NBD server: an accept loop, one thread per connection for the handshake and for reading
//! requests, and a small pool of worker threads per connection that execute requests and send
//! their replies (possibly out of order).
//!
//! ```text
//!  Listener ──accept──> connection thread ──handshake.rs──> Negotiated
//!                            │
//!                            └─ transmission.rs: read request ──queue──> workers (commands.rs)
//!                                                                         │
//!                                   ReplySink (one lock, whole replies) <─┘
//! ```
//!
//! All connections to an export share its `Arc<dyn BlockDev>`, so a flush on one connection
//! covers writes completed on every other: `NBD_FLAG_CAN_MULTI_CONN` is advertised unless the
//! server is limited to one connection.

mod commands;
mod export;
mod handshake;
mod reply;
mod transmission;

pub use export::{Context, Export};

use std::io;
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use crate::transport::{Halves, Listener, Socket};

/// Server-wide settings.
#[derive(Debug, Clone)]
struct Settings {
    handshake_limit: Option<Duration>,
    max_connections: Option<usize>,
    workers: usize,
    persistent: bool,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsConfig>,
    tls_required: bool,
}

/// An NBD server for one or more exports.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = vdisk_formats::open("disk.qcow2".as_ref(), Default::default())?;
/// use vdisk_nbd::{Export, Server};
/// let server = Server::new(vec![Export::new("", dev)]);
/// let listener = std::os::unix::net::UnixListener::bind("/tmp/nbd.sock")?;
/// server.serve(listener)?; // runs until shut down
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    exports: Vec<Arc<Export>>,
    settings: Settings,
    /// Connections currently open, and whether any ever reached transmission.
    active: Mutex<(usize, bool)>,
    changed: Condvar,
    shutdown: AtomicBool,
    listeners: Mutex<Vec<RawFd>>,
}

impl Server {
    /// A server for `exports`, with defaults: no TLS, a 10 s handshake limit, unlimited
    /// connections (so multi-conn is advertised), 4 workers per connection, persistent.
    pub fn new(exports: Vec<Export>) -> Server {
        Server {
            shared: Arc::new(Shared {
                exports: exports.into_iter().map(Arc::new).collect(),
                settings: Settings {
                    handshake_limit: Some(Duration::from_secs(10)),
                    max_connections: None,
                    workers: 4,
                    persistent: true,
                    #[cfg(feature = "tls")]
                    tls: None,
                    tls_required: false,
                },
                active: Mutex::new((0, false)),
                changed: Condvar::new(),
                shutdown: AtomicBool::new(false),
                listeners: Mutex::new(Vec::new()),
            }),
        }
    }

    fn settings_mut(&mut self) -> &mut Settings {
        &mut Arc::get_mut(&mut self.shared)
            .expect("configure the server before cloning or serving it")
            .settings
    }

    /// Seconds a client may take to finish the handshake (`None`: no limit). Slower clients are
    /// disconnected, so idle sockets cannot pin threads (qemu-nbd's `--handshake-limit`).
    pub fn handshake_limit(mut self, limit: Option<Duration>) -> Server {
        self.settings_mut().handshake_limit = limit;
        self
    }

    /// At most `n` simultaneous connections (qemu-nbd's `--shared`); further clients wait in the
    /// listen backlog. With `Some(1)` the export does not advertise multi-conn.
    pub fn max_connections(mut self, n: Option<usize>) -> Server {
        self.settings_mut().max_connections = n.map(|n| n.max(1));
        self
    }

    /// Worker threads per connection: how many requests of one connection run at once.
    pub fn workers(mut self, n: usize) -> Server {
        self.settings_mut().workers = n.max(1);
        self
    }

    /// With `false`, [`Server::serve`] returns once the last client that reached transmission
    /// has disconnected (qemu-nbd without `--persistent`).
    pub fn persistent(mut self, on: bool) -> Server {
        self.settings_mut().persistent = on;
        self
    }

    /// Offers STARTTLS with `config`; with `required`, every option other than STARTTLS and ABORT
    /// is refused with `NBD_REP_ERR_TLS_REQD` until TLS is up (the spec's FORCEDTLS mode).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: crate::tls::TlsConfig, required: bool) -> Server {
        let s = self.settings_mut();
        s.tls = Some(config);
        s.tls_required = required;
        self
    }

    /// The exports, in the order given.
    pub fn exports(&self) -> impl Iterator<Item = &Export> {
        self.shared.exports.iter().map(|e| &**e)
    }

    /// Accepts connections on `listener` and serves each on its own thread, until
    /// [`Server::shutdown`] (or, when not persistent, until the last client leaves).
    pub fn serve(&self, listener: impl Into<Listener>) -> io::Result<()> {
        let listener = listener.into();
        let fd = listener.raw_fd();
        self.shared.listeners.lock().unwrap().push(fd);
        let result = self.accept_loop(&listener);
        self.shared.listeners.lock().unwrap().retain(|&l| l != fd);
        result
    }

    fn accept_loop(&self, listener: &Listener) -> io::Result<()> {
        loop {
            if self.shared.shutdown.load(Ordering::SeqCst) {
                return Ok(());
            }
            if let Some(max) = self.shared.settings.max_connections {
                let mut a = self.shared.active.lock().unwrap();
                while a.0 >= max && !self.shared.shutdown.load(Ordering::SeqCst) {
                    a = self.shared.changed.wait(a).unwrap();
                }
            }
            let socket = match listener.accept() {
                Ok(s) => s,
                Err(_) if self.shared.shutdown.load(Ordering::SeqCst) => return Ok(()),
                Err(e) if is_transient_accept_error(&e) => {
                    log::warn!("accept: {e}");
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.shared.active.lock().unwrap().0 += 1;
            let server = self.clone();
            let spawned = thread::Builder::new()
                .name("nbd-conn".into())
                .spawn(move || {
                    if let Err(e) = server.serve_connection(socket) {
                        log::info!("connection ended: {e}");
                    }
                    server.connection_closed();
                });
            if let Err(e) = spawned {
                log::warn!("cannot start a connection thread: {e}");
                self.connection_closed();
            }
        }
    }

    fn connection_closed(&self) {
        let mut a = self.shared.active.lock().unwrap();
        a.0 -= 1;
        let idle = a.0 == 0 && a.1;
        drop(a);
        self.shared.changed.notify_all();
        if idle && !self.shared.settings.persistent {
            self.shutdown();
        }
    }

    /// Runs the handshake and the transmission phase of one connection on the calling thread.
    /// Returns when the client disconnects; protocol violations end the connection with an
    /// error and never affect other connections.
    pub fn serve_connection(&self, socket: impl Into<Socket>) -> io::Result<()> {
        let socket = socket.into();
        socket.set_nodelay()?;
        let mut halves = Halves::plain(&socket)?;
        let watchdog = self.handshake_watchdog(&socket)?;
        let negotiated = handshake::negotiate(&self.shared, &socket, &mut halves);
        drop(watchdog);
        let Some(neg) = negotiated? else {
            let _ = socket.shutdown(Shutdown::Both);
            return Ok(());
        };
        self.shared.active.lock().unwrap().1 = true;
        transmission::run(&self.shared, neg, halves, &socket)
    }

    /// Serves the transmission phase of export `name` on `socket` without any handshake, with
    /// simple replies: what the kernel's NBD client expects on the sockets handed to it.
    /// The flags the client must be told are [`Server::kernel_flags`].
    pub fn serve_transmission(&self, name: &str, socket: impl Into<Socket>) -> io::Result<()> {
        let socket = socket.into();
        let export = self.find(name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no export named {name:?}"))
        })?;
        let neg = handshake::Negotiated {
            flags: export.flags(false, self.multi_conn()),
            export,
            mode: crate::proto::ReplyMode::Simple,
            contexts: Vec::new(),
        };
        let halves = Halves::plain(&socket)?;
        transmission::run(&self.shared, neg, halves, &socket)
    }

    /// Transmission flags of export `name` for a client without structured replies (the kernel).
    pub fn kernel_flags(&self, name: &str) -> Option<crate::proto::TransmissionFlags> {
        Some(self.find(name)?.flags(false, self.multi_conn()))
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.shared.find(name)
    }

    fn multi_conn(&self) -> bool {
        self.shared.multi_conn()
    }

    /// Stops accepting connections; [`Server::serve`] returns. Open connections finish normally.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        for &fd in self.shared.listeners.lock().unwrap().iter() {
            // SAFETY: `fd` is the descriptor of a listener that `serve` is still using (it is
            // removed from the list before `serve` returns and drops it); shutdown() on it only
            // wakes the thread blocked in accept(), it does not close the descriptor.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    /// Number of open connections.
    pub fn connections(&self) -> usize {
        self.shared.active.lock().unwrap().0
    }

    /// Hangs up on a client that has not finished the handshake in time.
    fn handshake_watchdog(&self, socket: &Socket) -> io::Result<Option<mpsc::Sender<()>>> {
        let Some(limit) = self.shared.settings.handshake_limit else {
            return Ok(None);
        };
        let (done, wait) = mpsc::channel::<()>();
        let sock = socket.try_clone()?;
        thread::Builder::new()
            .name("nbd-handshake-limit".into())
            .spawn(move || {
                if wait.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
                    log::info!("handshake not finished within {limit:?}: disconnecting");
                    let _ = sock.shutdown(Shutdown::Both);
                }
            })?;
        Ok(Some(done))
    }
}

impl Shared {
    /// The export a client means by `name`; `""` is the first export.
    fn find(&self, name: &str) -> Option<Arc<Export>> {
        if name.is_empty() {
            return self.exports.first().cloned();
        }
        self.exports.iter().find(|e| e.name() == name).cloned()
    }

    fn multi_conn(&self) -> bool {
        self.settings.max_connections != Some(1)
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EINTR | libc::EMFILE | libc::ENFILE | libc::ENOBUFS)
            | Some(libc::ENOMEM)
    )
}
