//! The anti-forensic splitter of LUKS (LUKS1 on-disk format, "AF-Splitter"; LUKS2 keyslots with
//! `af.type = luks1`).
//!
//! A key of `n` bytes is stored as `stripes` blocks of `n` bytes. The first `stripes - 1` blocks
//! are random; the last is the key XORed with the running *diffusion* of the others, so losing
//! any one block (a wiped sector) loses the key:
//!
//! ```text
//!   d_0 = 0
//!   d_{i+1} = H(d_i ⊕ s_i)        for i < stripes - 1
//!   s_{stripes-1} = key ⊕ d_{stripes-1}
//! ```
//!
//! `H` hashes the block in digest-sized pieces: piece `j` becomes `hash(be32(j) ‖ piece_j)`,
//! truncated to the piece's length for the last one.

use zeroize::Zeroizing;

use super::hash::HashAlg;

/// The stripe count every LUKS implementation writes; cryptsetup and QEMU refuse other values.
pub const AF_STRIPES: u32 = 4000;

/// Replaces `block` by its diffusion.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    for (j, piece) in block.chunks_mut(hash.output_len()).enumerate() {
        let h = hash.digest(&[&(j as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&h[..n]);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Recovers a `key_len`-byte key from `stripes` blocks at the start of `material`.
///
/// `material` must hold at least `key_len * stripes` bytes (checked by the callers' layout
/// validation; a shorter slice panics).
pub fn merge(material: &[u8], key_len: usize, stripes: u32, hash: HashAlg) -> Zeroizing<Vec<u8>> {
    let stripes = stripes as usize;
    assert!(stripes >= 1 && material.len() >= key_len * stripes);
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    for s in material.chunks_exact(key_len).take(stripes - 1) {
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    xor_into(
        &mut d,
        &material[(stripes - 1) * key_len..stripes * key_len],
    );
    d
}

/// Splits `key` into `stripes` blocks; `random` fills the first `stripes - 1` of them.
pub fn split(
    key: &[u8],
    stripes: u32,
    hash: HashAlg,
    random: impl FnOnce(&mut [u8]) -> crate::Result<()>,
) -> crate::Result<Zeroizing<Vec<u8>>> {
    let n = key.len();
    let stripes = stripes as usize;
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random(&mut out[..n * (stripes - 1)])?;
    let mut d = Zeroizing::new(vec![0u8; n]);
    for s in out.chunks_exact(n).take(stripes - 1) {
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    xor_into(&mut d, key);
    out[n * (stripes - 1)..].copy_from_slice(&d);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back() {
        for (hash, len) in [
            (HashAlg::Sha1, 64),
            (HashAlg::Sha256, 32),
            (HashAlg::Sha512, 48),
        ] {
            let key: Vec<u8> = (0..len as u8).collect();
            let mut seed = 1u32;
            let m = split(&key, AF_STRIPES, hash, |b| {
                for x in b.iter_mut() {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    *x = (seed >> 16) as u8;
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(m.len(), len * AF_STRIPES as usize);
            assert_eq!(&merge(&m, len, AF_STRIPES, hash)[..], &key[..]);
        }
    }

    #[test]
    fn one_changed_stripe_loses_the_key() {
        let key = [7u8; 32];
        let mut m = split(&key, 16, HashAlg::Sha256, |b| {
            b.fill(0x5a);
            Ok(())
        })
        .unwrap();
        m[3 * 32] ^= 1;
        assert_ne!(&merge(&m, 32, 16, HashAlg::Sha256)[..], &key[..]);
    }
}
