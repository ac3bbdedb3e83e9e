//! Known answers computed with Python's `cryptography` (OpenSSL) for the same keys, data and IVs.

use super::*;

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

fn key(n: usize) -> Vec<u8> {
    (0..n as u8).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Encrypts the pattern, checks the ciphertext digest, and checks decryption restores it.
fn check(spec: CipherSpec, len: usize, sector: usize, iv512: u64, want_sha256: &str) {
    let c = SectorCipher::new(spec, &key(spec.key_bytes)).unwrap();
    let plain = pattern(len);
    let mut data = plain.clone();
    c.encrypt_par(&mut data, sector, iv512);
    assert_eq!(hex(&HashAlg::Sha256.digest(&[&data])), want_sha256);
    c.decrypt_par(&mut data, sector, iv512);
    assert_eq!(data, plain);
    // Encrypting from the caller's buffer into another gives the same ciphertext, on one thread
    // or several.
    let mut copy = vec![0xeeu8; len];
    c.encrypt_copy_par(&plain, &mut copy, sector, iv512);
    assert_eq!(hex(&HashAlg::Sha256.digest(&[&copy])), want_sha256);
    c.encrypt_copy(&plain, &mut data, sector, iv512);
    assert_eq!(data, copy);
}

#[test]
fn xts_256_plain64_matches_openssl() {
    check(
        CipherSpec::AES_256_XTS_PLAIN64,
        1024,
        512,
        5,
        "1b1b92b4f8aff3c89429dfc890e0a1cfb324a1733b0ec3ed4f4bf8c869a4f673",
    );
}

#[test]
fn xts_4096_byte_sectors_count_ivs_in_512_byte_units() {
    let spec = CipherSpec::from_luks2("aes-xts-plain64", 32).unwrap();
    check(
        spec,
        8192,
        4096,
        8,
        "f4fccf0c7dd44283571306bc61eb6bee07dd30fb2db92d63a9b9e67af28ca87f",
    );
}

#[test]
fn cbc_essiv_sha256_matches_openssl() {
    let spec = CipherSpec::from_luks1("aes", "cbc-essiv:sha256", 32).unwrap();
    check(
        spec,
        1024,
        512,
        3,
        "dbcd09f0efffc57ec7af30925034b91d38d9fd31ff57ffd599afd9b7126d3f25",
    );
}

#[test]
fn cbc_plain64_keeps_high_sector_bits() {
    let spec = CipherSpec::from_luks1("aes", "cbc-plain64", 16).unwrap();
    check(
        spec,
        1024,
        512,
        1 << 40,
        "0e62fcecdec38f76ea99f974e1b8287b7e33eaa18d5dc47da8476999bc3971fd",
    );
}

#[test]
fn cbc_plain_truncates_sector_to_32_bits() {
    let spec = CipherSpec::from_luks1("aes", "cbc-plain", 16).unwrap();
    check(
        spec,
        1024,
        512,
        (1 << 32) + 7,
        "40ed240ff03595d54722d958a209c588d6abaf4e5231f8a1624ee61a5442349f",
    );
}

#[test]
fn large_requests_split_across_threads_give_the_same_result() {
    check(
        CipherSpec::AES_256_XTS_PLAIN64,
        4 << 20,
        4096,
        1000,
        "9a93576fc7318eb316afce9a41eb372c5917cce5fcfcff4a4e0946b1c3a4c5d4",
    );
}

#[test]
fn names_round_trip_through_luks_and_qemu_spellings() {
    let s = CipherSpec::from_qemu("aes-256", "cbc", "essiv", None).unwrap();
    assert_eq!(s.luks_cipher_mode(), "cbc-essiv:sha256");
    assert_eq!(s.luks2_encryption(), "aes-cbc-essiv:sha256");
    assert_eq!(s.qemu_cipher_alg(), "aes-256");
    assert_eq!(s.qemu_ivgen_hash_alg(), Some(HashAlg::Sha256));
    let x = CipherSpec::from_qemu("aes-128", "xts", "plain64", None).unwrap();
    assert_eq!(x.key_bytes, 32);
    assert_eq!(x.qemu_cipher_alg(), "aes-128");
}

#[test]
fn unsupported_ciphers_are_refused_with_their_name() {
    let e = CipherSpec::from_luks1("serpent", "xts-plain64", 64).unwrap_err();
    assert!(e.contains("serpent"), "{e}");
    assert!(CipherSpec::from_luks1("aes", "lrw-benbi", 48).is_err());
    assert!(CipherSpec::from_luks1("aes", "ecb", 32).is_err());
    assert!(CipherSpec::from_luks1("aes", "xts-plain64", 40).is_err());
    assert!(CipherSpec::from_luks1("aes", "cbc-essiv:sha1", 32).is_err());
    assert!(SectorCipher::new(CipherSpec::AES_256_XTS_PLAIN64, &[0; 32]).is_err());
}
