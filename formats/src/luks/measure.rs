//! The size of the LUKS header a new image would get, for `measure` (QEMU's
//! `qcrypto_block_calculate_payload_offset`): computed from the create options alone, with no
//! key derivation and no key material.
//!
//! QEMU measures any cipher its crypto library can create, including ones vdisk cannot encrypt
//! with (serpent, twofish, cast5, ECB and CTR modes): only the key length matters for the layout,
//! so they are measured here as well, with QEMU's checks and messages in QEMU's order.

use super::cipher::IV_UNIT;
use super::luks1;
use super::luks2::NEW_DATA_OFFSET;
use crate::error::{Error, Result};

/// Key length and block size in bytes of a cipher algorithm by QEMU's name; `None` for a name
/// QEMU does not know. `supported` is whether QEMU 10.0's crypto backend (gnutls) creates it.
fn cipher_algorithm(name: &str) -> Option<(usize, usize, bool)> {
    Some(match name {
        "aes-128" => (16, 16, true),
        "aes-192" => (24, 16, true),
        "aes-256" => (32, 16, true),
        "serpent-128" | "twofish-128" => (16, 16, true),
        "serpent-192" | "twofish-192" => (24, 16, true),
        "serpent-256" | "twofish-256" => (32, 16, true),
        "cast5-128" => (16, 8, true),
        "des" => (8, 8, false),
        "3des" => (24, 8, false),
        "sm4" => (16, 16, false),
        _ => return None,
    })
}

/// Digest length in bytes of a hash by QEMU's name.
fn hash_len(name: &str) -> Option<usize> {
    Some(match name {
        "md5" => 16,
        "sha1" | "ripemd160" => 20,
        "sha224" => 28,
        "sha256" | "sm3" => 32,
        "sha384" => 48,
        "sha512" => 64,
        _ => return None,
    })
}

fn bad_value(key: &str, value: &str) -> Error {
    Error::argument(format!("Parameter '{key}' does not accept value '{value}'"))
}

/// Bytes the header of a new LUKS image created with the `-o` pairs (names without `prefix`,
/// which is `"encrypt."` inside qcow2 and empty for a LUKS image; QEMU names the prefix only in
/// the missing `key-secret` message) takes before the payload.
/// `secret` looks up the secret `key-secret` names (failing with its message), as QEMU does
/// before it lays the header out; unknown option names are the caller's to refuse.
pub fn header_size(
    pairs: &[(String, String)],
    prefix: &str,
    secret: &mut dyn FnMut(&str) -> std::result::Result<(), String>,
) -> Result<u64> {
    let (mut alg, mut mode, mut ivgen) = ("aes-256", "xts", "plain64");
    let (mut ivhash, mut key_secret, mut version2) = ("sha256", None, false);
    for (key, value) in pairs {
        let v = value.as_str();
        match key.as_str() {
            "cipher-alg" if cipher_algorithm(v).is_none() => return Err(bad_value(key, v)),
            "cipher-alg" => alg = v,
            "cipher-mode" if !matches!(v, "ecb" | "cbc" | "xts" | "ctr") => {
                return Err(bad_value(key, v))
            }
            "cipher-mode" => mode = v,
            "ivgen-alg" if !matches!(v, "plain" | "plain64" | "essiv") => {
                return Err(bad_value(key, v))
            }
            "ivgen-alg" => ivgen = v,
            "ivgen-hash-alg" | "hash-alg" if hash_len(v).is_none() => {
                return Err(bad_value(key, v))
            }
            "ivgen-hash-alg" => ivhash = v,
            "key-secret" => key_secret = Some(v),
            "luks_version" => version2 = v == "2",
            _ => {}
        }
    }
    // QEMU takes the option for `create` only; its measure finds it left over.
    if pairs.iter().any(|(k, _)| k == "detached-header") {
        return Err(Error::argument("Parameter 'detached-header' is unexpected"));
    }
    let Some(id) = key_secret else {
        return Err(Error::argument(format!(
            "Parameter '{prefix}key-secret' is required for cipher"
        )));
    };
    secret(id).map_err(Error::argument)?;
    let (key_len, block, supported) = cipher_algorithm(alg).expect("checked above");
    if ivgen == "essiv" {
        let digest = hash_len(ivhash).expect("checked above");
        let family = match alg.split_once('-') {
            Some(("aes", _)) => "AES",
            Some(("serpent", _)) => "Serpent",
            Some(("twofish", _)) => "Twofish",
            _ => {
                return Err(Error::argument(format!(
                    "Cipher {alg} not supported with essiv"
                )))
            }
        };
        if !matches!(digest, 16 | 24 | 32) {
            return Err(Error::argument(format!(
                "No {family} cipher with key size {digest} available"
            )));
        }
    }
    if !supported {
        return Err(Error::argument(format!("Algorithm '{alg}' not supported")));
    }
    if mode == "xts" && block != 16 {
        return Err(Error::argument("Unsupported cipher mode xts"));
    }
    if version2 {
        return Ok(NEW_DATA_OFFSET);
    }
    let key_bytes = if mode == "xts" { key_len * 2 } else { key_len };
    Ok(u64::from(luks1::layout(key_bytes).1) * IV_UNIT as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measure(opts: &[(&str, &str)]) -> Result<u64> {
        let pairs: Vec<(String, String)> = opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        header_size(&pairs, "", &mut |_| Ok(()))
    }

    #[test]
    fn header_sizes_match_qemu_img_measure() {
        // qemu-img 10.0 `measure -O luks -o key-secret=s0,... --size 1M` minus 1 MiB.
        let s0 = ("key-secret", "s0");
        assert_eq!(measure(&[s0]).unwrap(), 2068480);
        assert_eq!(measure(&[s0, ("cipher-alg", "aes-128")]).unwrap(), 1052672);
        assert_eq!(measure(&[s0, ("cipher-alg", "aes-192")]).unwrap(), 1544192);
        assert_eq!(measure(&[s0, ("cipher-mode", "cbc")]).unwrap(), 1052672);
        assert_eq!(
            measure(&[s0, ("cipher-alg", "twofish-256")]).unwrap(),
            2068480
        );
        assert_eq!(
            measure(&[s0, ("cipher-alg", "cast5-128"), ("cipher-mode", "cbc")]).unwrap(),
            528384
        );
        let e = measure(&[("cipher-alg", "aes-128")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'key-secret' is required for cipher"
        );
    }
}
