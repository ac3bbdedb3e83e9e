//! `qemu-nbd -L`: the client half of an NBD handshake that lists a server's exports and prints
//! them as qemu-nbd 10.0 does.
//!
//! The steps are those of qemu's client (NBD spec, "Option types"): agree on extended headers
//! (or else structured replies), `NBD_OPT_LIST` for the names and descriptions, then for each
//! export `NBD_OPT_INFO` (size, flags, block sizes) and `NBD_OPT_LIST_META_CONTEXT` with no
//! query (every context), and `NBD_OPT_ABORT`. With TLS credentials, `NBD_OPT_STARTTLS` comes
//! first and the rest runs encrypted. The `vdisk_nbd` crate is server-only, so this small client
//! lives here; it reads only the replies these options can produce.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

/// What the server said about one export.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub flags: u16,
    /// `(min, preferred, max)`, when the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: Option<(u32, u32, u32)>,
    pub contexts: Vec<String>,
    /// Extended headers (64-bit transactions) were agreed.
    pub extended: bool,
}

/// Transmission flag bits and qemu-nbd's names for them, in bit order.
const FLAG_NAMES: &[(u16, &str)] = &[
    (1 << 1, "readonly"),
    (1 << 2, "flush"),
    (1 << 3, "fua"),
    (1 << 4, "rotational"),
    (1 << 5, "trim"),
    (1 << 6, "zeroes"),
    (1 << 7, "df"),
    (1 << 8, "multi"),
    (1 << 9, "resize"),
    (1 << 10, "cache"),
    (1 << 11, "fast-zero"),
    (1 << 12, "block-status-payload"),
];
const FLAG_HAS_FLAGS: u16 = 1;

/// The listing exactly as `qemu-nbd -L` prints it.
pub fn render(exports: &[ExportInfo]) -> String {
    let mut out = format!("exports available: {}\n", exports.len());
    for e in exports {
        out.push_str(&format!(" export: '{}'\n", e.name));
        if !e.description.is_empty() {
            out.push_str(&format!("  description: {}\n", e.description));
        }
        if e.flags & FLAG_HAS_FLAGS != 0 {
            out.push_str(&format!("  size:  {}\n", e.size));
            out.push_str(&format!("  flags: 0x{:x} (", e.flags));
            for (bit, name) in FLAG_NAMES {
                if e.flags & bit != 0 {
                    out.push_str(&format!(" {name}"));
                }
            }
            out.push_str(" )\n");
        }
        if let Some((min, opt, max)) = e.block_sizes {
            out.push_str(&format!(
                "  min block: {min}\n  opt block: {opt}\n  max block: {max}\n"
            ));
        }
        let size = if e.extended { "64-bit" } else { "32-bit" };
        out.push_str(&format!("  transaction size: {size}\n"));
        if !e.contexts.is_empty() {
            out.push_str(&format!(
                "  available meta contexts: {}\n",
                e.contexts.len()
            ));
            for c in &e.contexts {
                out.push_str(&format!("   {c}\n"));
            }
        }
    }
    out
}

/// One option reply: its type and payload.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

struct Client<S> {
    sock: S,
}

impl<S: Read + Write> Client<S> {
    fn send_option(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.sock.write_all(&msg)
    }

    fn read_reply(&mut self, option: u32) -> Result<OptReply> {
        let mut head = [0u8; 20];
        self.sock.read_exact(&mut head)?;
        let magic = u64::from_be_bytes(head[0..8].try_into().unwrap());
        let echoed = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        if magic != REPLY_MAGIC {
            bail!("Unexpected option reply magic 0x{magic:x}");
        }
        if echoed != option {
            bail!("Unexpected option reply for option {echoed} (expected {option})");
        }
        if len > 64 << 20 {
            bail!("Option reply of {len} bytes is too long");
        }
        let mut data = vec![0u8; len as usize];
        self.sock.read_exact(&mut data)?;
        Ok(OptReply { kind, data })
    }

    /// Sends an option that is answered by a single ACK; `Ok(false)` when the server refused it.
    fn simple_option(&mut self, option: u32) -> Result<bool> {
        self.send_option(option, &[])?;
        let reply = self.read_reply(option)?;
        Ok(reply.kind == REP_ACK)
    }

    fn list(&mut self) -> Result<Vec<(String, String)>> {
        self.send_option(OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let reply = self.read_reply(OPT_LIST)?;
            match reply.kind {
                REP_ACK => return Ok(names),
                REP_SERVER => {
                    let d = &reply.data;
                    let len = be32(d, 0)? as usize;
                    let name = d
                        .get(4..4 + len)
                        .ok_or_else(|| anyhow!("Truncated NBD_REP_SERVER reply"))?;
                    names.push((lossy(name), lossy(&d[4 + len..])));
                }
                k if k == REP_ERR_BIT | 5 => bail!(
                    "TLS negotiation required before option 3 (list)\n\
                     Did you forget a valid tls-creds?\n\
                     server reported: {}",
                    lossy(&reply.data)
                ),
                k if k & REP_ERR_BIT != 0 => bail!("{}", refusal("NBD_OPT_LIST", &reply)),
                k => bail!("Unexpected reply type {k} to NBD_OPT_LIST"),
            }
        }
    }

    fn info(&mut self, export: &mut ExportInfo) -> Result<()> {
        let mut data = name_field(&export.name);
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_INFO, &data)?;
        loop {
            let reply = self.read_reply(OPT_INFO)?;
            match reply.kind {
                REP_ACK => return Ok(()),
                REP_INFO => {
                    let d = &reply.data;
                    match u16::from_be_bytes([byte(d, 0)?, byte(d, 1)?]) {
                        INFO_EXPORT => {
                            export.size = be64(d, 2)?;
                            export.flags = u16::from_be_bytes([byte(d, 10)?, byte(d, 11)?]);
                        }
                        INFO_DESCRIPTION if export.description.is_empty() => {
                            export.description = lossy(&d[2..]);
                        }
                        INFO_BLOCK_SIZE => {
                            export.block_sizes = Some((be32(d, 2)?, be32(d, 6)?, be32(d, 10)?));
                        }
                        _ => {}
                    }
                }
                k if k & REP_ERR_BIT != 0 => bail!("{}", refusal("NBD_OPT_INFO", &reply)),
                k => bail!("Unexpected reply type {k} to NBD_OPT_INFO"),
            }
        }
    }

    fn meta_contexts(&mut self, export: &mut ExportInfo) -> Result<()> {
        let mut data = name_field(&export.name);
        data.extend_from_slice(&0u32.to_be_bytes());
        self.send_option(OPT_LIST_META_CONTEXT, &data)?;
        loop {
            let reply = self.read_reply(OPT_LIST_META_CONTEXT)?;
            match reply.kind {
                REP_ACK => return Ok(()),
                REP_META_CONTEXT if reply.data.len() >= 4 => {
                    export.contexts.push(lossy(&reply.data[4..]));
                }
                // A server without metadata contexts: nothing to list.
                k if k & REP_ERR_BIT != 0 => return Ok(()),
                k => bail!("Unexpected reply type {k} to NBD_OPT_LIST_META_CONTEXT"),
            }
        }
    }
}

/// Client TLS credentials: qemu's x509 directory layout (`ca-cert.pem`, and `client-cert.pem`
/// with `client-key.pem` when the server checks clients), and the name the server's certificate
/// must carry.
pub struct ClientTls<'a> {
    pub dir: &'a Path,
    pub hostname: &'a str,
}

impl ClientTls<'_> {
    fn connection(&self) -> Result<ClientConnection> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let ca = self.dir.join("ca-cert.pem");
        for cert in CertificateDer::pem_file_iter(&ca)
            .with_context(|| format!("Unable to read '{}'", ca.display()))?
        {
            roots.add(cert.with_context(|| format!("'{}'", ca.display()))?)?;
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let cert = self.dir.join("client-cert.pem");
        let config = if cert.exists() {
            let chain = CertificateDer::pem_file_iter(&cert)?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("'{}'", cert.display()))?;
            let key_file = self.dir.join("client-key.pem");
            let key = PrivateKeyDer::from_pem_file(&key_file)
                .with_context(|| format!("'{}'", key_file.display()))?;
            builder.with_client_auth_cert(chain, key)?
        } else {
            builder.with_no_client_auth()
        };
        let name = ServerName::try_from(self.hostname.to_string())
            .map_err(|_| anyhow!("Invalid TLS hostname '{}'", self.hostname))?;
        Ok(ClientConnection::new(Arc::new(config), name)?)
    }
}

/// Runs the whole listing conversation on a connected socket, over TLS when `tls` is given.
pub fn list_exports<S: Read + Write>(sock: S, tls: Option<&ClientTls>) -> Result<Vec<ExportInfo>> {
    let mut c = Client { sock };
    c.greet()?;
    match tls {
        None => c.list_all(),
        Some(tls) => {
            c.send_option(OPT_STARTTLS, &[])?;
            let reply = c.read_reply(OPT_STARTTLS)?;
            if reply.kind != REP_ACK {
                bail!("{}", refusal("NBD_OPT_STARTTLS", &reply));
            }
            let mut stream = StreamOwned::new(tls.connection()?, c.sock);
            while stream.conn.is_handshaking() {
                stream
                    .conn
                    .complete_io(&mut stream.sock)
                    .context("TLS handshake failed")?;
            }
            Client { sock: stream }.list_all()
        }
    }
}

impl<S: Read + Write> Client<S> {
    /// The fixed-newstyle greeting and our flags.
    fn greet(&mut self) -> Result<()> {
        let mut greeting = [0u8; 18];
        self.sock.read_exact(&mut greeting)?;
        if u64::from_be_bytes(greeting[0..8].try_into().unwrap()) != NBD_MAGIC {
            bail!("Bad initial magic received");
        }
        if u64::from_be_bytes(greeting[8..16].try_into().unwrap()) != IHAVEOPT {
            bail!("Server does not support the newstyle handshake");
        }
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("Server does not support the fixed newstyle handshake");
        }
        let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        self.sock.write_all(&client_flags.to_be_bytes())?;
        Ok(())
    }

    /// Everything after the greeting (and TLS): header modes, the list, each export's details.
    fn list_all(mut self) -> Result<Vec<ExportInfo>> {
        let extended = self.simple_option(OPT_EXTENDED_HEADERS)?;
        let structured = extended || self.simple_option(OPT_STRUCTURED_REPLY)?;
        let mut exports: Vec<ExportInfo> = self
            .list()?
            .into_iter()
            .map(|(name, description)| ExportInfo {
                name,
                description,
                extended,
                ..Default::default()
            })
            .collect();
        for e in &mut exports {
            self.info(e)?;
            if structured {
                self.meta_contexts(e)?;
            }
        }
        // A courtesy before hanging up; the server's ACK is not awaited.
        let _ = self.send_option(OPT_ABORT, &[]);
        let _ = self.sock.flush();
        Ok(exports)
    }
}

fn name_field(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

fn refusal(option: &str, reply: &OptReply) -> String {
    let text = lossy(&reply.data);
    let what = match reply.kind & !REP_ERR_BIT {
        1 if option == "NBD_OPT_STARTTLS" => "the server does not offer TLS",
        1 => "unsupported",
        2 => "denied by policy",
        3 => "invalid",
        5 => "TLS is required",
        6 => "export unknown",
        7 => "server shutting down",
        _ => "refused",
    };
    if text.is_empty() {
        format!("Server refused {option}: {what}")
    } else {
        format!("Server refused {option}: {what}: {text}")
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn byte(d: &[u8], at: usize) -> Result<u8> {
    d.get(at)
        .copied()
        .ok_or_else(|| anyhow!("Truncated option reply"))
}

fn be32(d: &[u8], at: usize) -> Result<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_be_bytes(b.try_into().unwrap()))
        .ok_or_else(|| anyhow!("Truncated option reply"))
}

fn be64(d: &[u8], at: usize) -> Result<u64> {
    d.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        .ok_or_else(|| anyhow!("Truncated option reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_reads_like_qemu_nbd() {
        let e = ExportInfo {
            name: "myexp".into(),
            description: "my description".into(),
            size: 67108864,
            flags: 0x1ced,
            block_sizes: Some((1, 4096, 33554432)),
            contexts: vec!["base:allocation".into()],
            extended: true,
        };
        let expected = "exports available: 1\n export: 'myexp'\n  description: my description\n  size:  67108864\n  flags: 0x1ced ( flush fua trim zeroes df cache fast-zero block-status-payload )\n  min block: 1\n  opt block: 4096\n  max block: 33554432\n  transaction size: 64-bit\n  available meta contexts: 1\n   base:allocation\n";
        assert_eq!(render(&[e]), expected);
        assert_eq!(render(&[]), "exports available: 0\n");
    }
}
