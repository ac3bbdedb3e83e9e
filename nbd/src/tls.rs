//! TLS for `NBD_OPT_STARTTLS` (section "TLS support"), server side, with X.509 certificates.
//!
//! rustls keeps one state object per connection, but the server reads requests on one thread
//! while workers write replies on others. The connection is therefore split into a reading half
//! and a writing half sharing the rustls state under a mutex: the reader receives raw records
//! without holding the lock and only takes it to decrypt; the writer encrypts and sends under it.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use crate::transport::{Halves, Socket};

/// Errors loading TLS credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(String),
}

/// Server credentials: a certificate chain, its private key, and optionally the CA that client
/// certificates must be signed by.
#[derive(Clone)]
pub struct TlsConfig {
    inner: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads PEM files: `cert` (the server certificate, then any intermediates), `key` (PKCS#8,
    /// PKCS#1 or SEC1), and with `client_ca` every client must present a certificate signed by
    /// one of the CA certificates in that file.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<TlsConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates(cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| TlsError::Pem {
            path: key.to_path_buf(),
            what: format!("no usable private key: {e}"),
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(ca)? {
                    roots.add(c)?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Verifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        Ok(TlsConfig {
            inner: Arc::new(builder.with_single_cert(chain, key)?),
        })
    }

    /// Loads credentials laid out as qemu's `tls-creds-x509` directory: `server-cert.pem`,
    /// `server-key.pem`, and with `verify_peer` the client CA `ca-cert.pem`.
    pub fn from_dir(dir: &Path, verify_peer: bool) -> Result<TlsConfig, TlsError> {
        let ca = dir.join("ca-cert.pem");
        TlsConfig::from_pem_files(
            &dir.join("server-cert.pem"),
            &dir.join("server-key.pem"),
            verify_peer.then_some(ca.as_path()),
        )
    }

    /// Uses a ready rustls configuration.
    pub fn from_rustls(config: Arc<ServerConfig>) -> TlsConfig {
        TlsConfig { inner: config }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Runs the TLS handshake on `socket` (right after the STARTTLS ACK) and returns the encrypted
/// halves. A failed handshake is an error: the session must end.
pub(crate) fn accept(config: &TlsConfig, socket: &Socket) -> io::Result<Halves> {
    let mut conn = ServerConnection::new(config.inner.clone()).map_err(io::Error::other)?;
    let mut s = socket;
    while conn.is_handshaking() {
        conn.complete_io(&mut s)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut s)?;
    }
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        socket: socket.try_clone()?,
    });
    Ok(Halves {
        reader: Box::new(TlsReader {
            shared: shared.clone(),
            raw: socket.try_clone()?,
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        }),
        writer: Box::new(TlsWriter { shared }),
    })
}

struct Shared {
    conn: Mutex<ServerConnection>,
    socket: Socket,
}

impl Shared {
    /// Sends whatever rustls has queued (records, alerts, tickets). Called with the lock held.
    fn drain(&self, conn: &mut ServerConnection) -> io::Result<()> {
        let mut s = &self.socket;
        while conn.wants_write() {
            conn.write_tls(&mut s)?;
        }
        Ok(())
    }
}

struct TlsReader {
    shared: Arc<Shared>,
    raw: Socket,
    /// Received records not yet given to rustls: `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    let mut pending = &self.buf[self.start..self.end];
                    let n = conn.read_tls(&mut pending)?;
                    if n == 0 {
                        return Err(io::Error::other("TLS record buffer is full"));
                    }
                    self.start += n;
                    let processed = conn.process_new_packets();
                    // Send alerts, key updates and the like even when processing failed.
                    let drained = self.shared.drain(&mut conn);
                    processed.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    drained?;
                    continue;
                }
            }
            // Wait for more records without holding the lock, so replies can still be sent.
            let n = (&self.raw).read(&mut self.buf)?;
            if n == 0 {
                return Ok(0);
            }
            self.start = 0;
            self.end = n;
        }
    }
}

struct TlsWriter {
    shared: Arc<Shared>,
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        let n = conn.writer().write(buf)?;
        self.shared.drain(&mut conn)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.writer().flush()?;
        self.shared.drain(&mut conn)
    }
}

impl Drop for TlsWriter {
    /// Ends the TLS session cleanly (close_notify) before the socket is closed, as the spec asks
    /// on disconnect.
    fn drop(&mut self) {
        let mut conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.send_close_notify();
        let _ = self.shared.drain(&mut conn);
    }
}
