//! `--object TYPE,id=ID,...` definitions, as the QEMU tools take them: `secret` (passphrases of
//! encrypted images) and `tls-creds-x509` (certificates for the NBD server).
//!
//! ```text
//!   --object secret,id=sec0,data=letmein            --object secret,id=sec0,file=pass.txt
//!   --object tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server,verify-peer=off
//! ```

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::options::parse_lists;

/// Which side of a TLS connection credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Client,
    Server,
}

/// One defined object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Secret {
        id: String,
        data: Vec<u8>,
    },
    /// qemu's x509 credentials directory: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`
    /// (client side: `client-cert.pem`, `client-key.pem`).
    TlsCredsX509 {
        id: String,
        dir: PathBuf,
        endpoint: Endpoint,
        /// Require and check the peer's certificate (qemu's default: on).
        verify_peer: bool,
    },
}

impl Object {
    fn id(&self) -> &str {
        match self {
            Object::Secret { id, .. } | Object::TlsCredsX509 { id, .. } => id,
        }
    }
}

/// All objects of a command line, looked up by id.
#[derive(Debug, Clone, Default)]
pub struct Objects(Vec<Object>);

impl Objects {
    /// Parses every `--object` argument; ids must be unique.
    pub fn parse(defs: &[String]) -> Result<Objects> {
        let mut objects: Vec<Object> = Vec::new();
        for def in defs {
            let object = parse_one(def)?;
            if objects.iter().any(|o| o.id() == object.id()) {
                bail!("attempt to add duplicate object '{}'", object.id());
            }
            objects.push(object);
        }
        Ok(Objects(objects))
    }

    /// The bytes of secret `id`.
    pub fn secret(&self, id: &str) -> Result<&[u8]> {
        match self.0.iter().find(|o| o.id() == id) {
            Some(Object::Secret { data, .. }) => Ok(data),
            Some(_) => bail!("Object with id '{id}' is not a secret"),
            None => bail!("No secret with id '{id}'"),
        }
    }

    /// The x509 credentials `id`, which must be for `endpoint`.
    pub fn tls_creds(&self, id: &str, endpoint: Endpoint) -> Result<(&Path, bool)> {
        match self.0.iter().find(|o| o.id() == id) {
            Some(Object::TlsCredsX509 {
                dir,
                endpoint: e,
                verify_peer,
                ..
            }) => {
                if *e != endpoint {
                    let want = match endpoint {
                        Endpoint::Client => "client",
                        Endpoint::Server => "server",
                    };
                    bail!("Expecting TLS credentials with a {want} endpoint");
                }
                Ok((dir, *verify_peer))
            }
            Some(_) => bail!("Object with id '{id}' is not TLS credentials"),
            None => bail!("No TLS credentials with id '{id}'"),
        }
    }
}

fn parse_one(def: &str) -> Result<Object> {
    let (kind, rest) = def.split_once(',').unwrap_or((def, ""));
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    let pairs = if rest.is_empty() {
        Vec::new()
    } else {
        parse_lists(&[rest.to_string()])?.pairs
    };
    let get = |key: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let id = get("id")
        .ok_or_else(|| anyhow!("Parameter 'id' is missing"))?
        .to_string();
    let allowed: &[&str] = match kind {
        "secret" => &["id", "data", "file", "format"],
        "tls-creds-x509" => &["id", "dir", "endpoint", "verify-peer", "sanity-check"],
        "tls-creds-psk" | "tls-creds-anon" | "authz-simple" | "authz-list" => {
            bail!("object type '{kind}' is not supported by vdisk")
        }
        _ => bail!("invalid object type: {kind}"),
    };
    if let Some((key, _)) = pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        bail!("Property '{kind}.{key}' not found");
    }
    match kind {
        "secret" => {
            let raw = match (get("data"), get("file")) {
                (Some(d), None) => d.as_bytes().to_vec(),
                (None, Some(f)) => {
                    std::fs::read(f).with_context(|| format!("Unable to read {f}"))?
                }
                (Some(_), Some(_)) => bail!("'data' and 'file' are mutually exclusive"),
                (None, None) => bail!("Either 'data' or 'file' must be provided"),
            };
            let data = match get("format").unwrap_or("raw") {
                "raw" => raw,
                "base64" => decode_base64(&raw)
                    .ok_or_else(|| anyhow!("Unable to decode base64 data of secret '{id}'"))?,
                other => bail!("Invalid parameter value for 'format': '{other}'"),
            };
            Ok(Object::Secret { id, data })
        }
        _ => {
            let dir = get("dir").ok_or_else(|| anyhow!("Parameter 'dir' is missing"))?;
            let endpoint = match get("endpoint").unwrap_or("client") {
                "client" => Endpoint::Client,
                "server" => Endpoint::Server,
                other => bail!("Invalid parameter value for 'endpoint': '{other}'"),
            };
            let verify_peer = match get("verify-peer").unwrap_or("on") {
                "on" | "yes" | "true" | "y" => true,
                "off" | "no" | "false" | "n" => false,
                other => bail!("Parameter 'verify-peer' expects 'on' or 'off', not '{other}'"),
            };
            Ok(Object::TlsCredsX509 {
                id,
                dir: std::path::absolute(dir)?,
                endpoint,
                verify_peer,
            })
        }
    }
}

/// Standard base64 (RFC 4648 section 4) with padding; whitespace is ignored.
fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if clean.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for (n, quad) in clean.chunks(4).enumerate() {
        let last = n == clean.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut acc = 0u32;
        for &c in &quad[..4 - pad] {
            acc = (acc << 6) | value(c)?;
        }
        acc <<= 6 * pad as u32;
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(defs: &[&str]) -> Result<Objects> {
        Objects::parse(&defs.iter().map(|d| d.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn secrets_come_from_data_or_base64() {
        let o = parse(&[
            "secret,id=a,data=let,,me",
            "secret,id=b,data=aGVsbG8=,format=base64",
        ])
        .unwrap();
        assert_eq!(o.secret("a").unwrap(), b"let,me");
        assert_eq!(o.secret("b").unwrap(), b"hello");
        assert_eq!(
            o.secret("c").unwrap_err().to_string(),
            "No secret with id 'c'"
        );
    }

    #[test]
    fn tls_creds_default_to_client_and_verify_peer() {
        let o = parse(&[
            "tls-creds-x509,id=t,dir=/etc/pki",
            "tls-creds-x509,id=s,dir=/x,endpoint=server,verify-peer=off",
        ])
        .unwrap();
        assert!(o.tls_creds("t", Endpoint::Server).is_err());
        assert_eq!(
            o.tls_creds("t", Endpoint::Client).unwrap(),
            (Path::new("/etc/pki"), true)
        );
        assert_eq!(
            o.tls_creds("s", Endpoint::Server).unwrap(),
            (Path::new("/x"), false)
        );
        assert!(o.secret("s").is_err());
    }

    #[test]
    fn bad_definitions_are_refused() {
        for bad in [
            "secret,data=x",
            "frobnicator,id=x",
            "secret,id=x",
            "secret,id=x,data=1,colour=red",
            "tls-creds-x509,id=t",
        ] {
            assert!(parse(&[bad]).is_err(), "{bad}");
        }
        assert!(parse(&["secret,id=x,data=1", "secret,id=x,data=2"]).is_err());
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(decode_base64(b"").unwrap(), b"");
        assert_eq!(decode_base64(b"YQ==").unwrap(), b"a");
        assert_eq!(decode_base64(b"YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64(b"YWJj\n").unwrap(), b"abc");
        assert!(decode_base64(b"YQ=a").is_none());
        assert!(decode_base64(b"Y").is_none());
    }
}
