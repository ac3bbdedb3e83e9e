//! Unit tests of the qcow2 encryption glue: hostile header extensions, sector splitting,
//! amend options.

use super::*;

fn header_with(method: u32, ext_data: Option<Vec<u8>>) -> Header {
    let mut h = crate::qcow2::header::tests::sample();
    h.crypt_method = method;
    if let Some(data) = ext_data {
        h.extensions.push(super::super::header::Extension {
            kind: ext::CRYPTO,
            data,
        });
    }
    h
}

fn area(offset: u64, length: u64) -> Vec<u8> {
    CryptoArea { offset, length }.encode()
}

#[test]
fn hostile_extensions_are_refused_with_clear_errors() {
    let p = Path::new("t.qcow2");
    let len = 0x40_0000;
    let err = |h: Header| crypto_area(p, &h, len).unwrap_err().to_string();
    assert!(err(header_with(2, None)).contains("Missing CRYPTO header"));
    assert!(err(header_with(2, Some(vec![0; 8]))).contains("size 8, but expected size 16"));
    assert!(err(header_with(2, Some(area(0x1_0001, 4096)))).contains("not a multiple"));
    assert!(err(header_with(2, Some(area(0, 4096)))).contains("overlaps the qcow2 header"));
    assert!(err(header_with(2, Some(area(0x1_0000, 0)))).contains("too small"));
    assert!(err(header_with(2, Some(area(0x1_0000, u64::MAX)))).contains("past the end"));
    assert!(err(header_with(2, Some(area(len, 4096)))).contains("past the end"));
    assert!(err(header_with(0, Some(area(0x1_0000, 4096)))).contains("only expected"));
    assert!(err(header_with(1, None)).contains("legacy qcow2 AES"));
    assert!(err(header_with(3, None)).contains("Unsupported encryption method: 3"));
    let ok = crypto_area(p, &header_with(2, Some(area(0x1_0000, 4096))), len).unwrap();
    assert_eq!(
        ok,
        Some(CryptoArea {
            offset: 0x1_0000,
            length: 4096
        })
    );
    assert_eq!(crypto_area(p, &header_with(0, None), len).unwrap(), None);
}

#[test]
fn requests_split_into_partial_and_whole_sectors() {
    let split = |host: u64, len: usize| {
        let mut v = Vec::new();
        sector_pieces(host, len, |pos, r, whole| {
            v.push((pos, r, whole));
            Ok(())
        })
        .unwrap();
        v
    };
    assert_eq!(split(1024, 1536), [(1024, 0..1536, true)]);
    assert_eq!(split(1000, 10), [(1000, 0..10, false)]);
    assert_eq!(
        split(1000, 2000),
        [
            (1000, 0..24, false),
            (1024, 24..1560, true),
            (2560, 1560..2000, false)
        ]
    );
    assert_eq!(split(512, 100), [(512, 0..100, false)]);
    assert!(split(7, 0).is_empty());
}

#[test]
fn amend_pairs_take_the_encrypt_prefix() {
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut resolve = |id: &str| Ok(Passphrase::from(id));
    let a = amend_pairs(
        &pairs(&[
            ("encrypt.state", "active"),
            ("encrypt.new-secret", "s1"),
            ("encrypt.keyslot", "3"),
        ]),
        &mut resolve,
    )
    .unwrap();
    assert_eq!(a.keyslot, Some(3));
    assert_eq!(a.new_secret, Some(Passphrase::from("s1")));
    let e = amend_pairs(&pairs(&[("encrypt.new-secret", "s1")]), &mut resolve).unwrap_err();
    assert_eq!(e.to_string(), "Parameter 'encrypt.state' is required");
    assert!(amend_pairs(&pairs(&[("compat", "1.1")]), &mut resolve).is_err());
}
