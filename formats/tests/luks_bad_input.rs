//! Damaged and hostile LUKS headers give clear errors: no panic, no long KDF run, no large
//! allocation. Each named limit has a case here.

mod common;
mod luks_common;

use std::path::Path;
use std::time::{Duration, Instant};

use luks_common::*;
use vdisk_formats::luks::af_split::AF_STRIPES;
use vdisk_formats::luks::kdf::{MAX_ARGON2_MEMORY_KIB, MAX_PBKDF2_ITERATIONS};
use vdisk_formats::luks::luks1::MAX_KEY_BYTES;
use vdisk_formats::luks::luks2::header::{build_copy, parse_bin, MAX_HDR_SIZE};
use vdisk_formats::luks::luks2::json::{MAX_KEYSLOTS, MAX_KEYSLOTS_SIZE, MAX_KEY_SIZE};
use vdisk_formats::luks::{KeyslotState, Luks, LuksAmend, LuksVersion};
use vdisk_formats::{BlockDev, ErrorKind, FormatSpecific, Passphrase};

fn open_err(path: &Path) -> vdisk_formats::Error {
    let start = Instant::now();
    let e = Luks::open(path, true, &Passphrase::from(PW)).expect_err("must be refused");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "refusing took {:?}",
        start.elapsed()
    );
    e
}

fn v1_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("v1.luks");
    vdisk_create(&p, 1 << 20, &cheap(LuksVersion::V1));
    p
}

fn v2_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    vdisk_create(&p, 1 << 20, &cheap(LuksVersion::V2));
    p
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

fn expect(e: &vdisk_formats::Error, kind: ErrorKind, words: &str) {
    assert_eq!(e.kind(), kind, "{e}");
    assert!(e.to_string().contains(words), "'{words}' not in: {e}");
    assert!(!e.to_string().contains(PW), "passphrase in error: {e}");
}

#[test]
fn luks1_damaged_headers_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let slot = |i: usize| 208 + 48 * i;
    let cases: Vec<(usize, Vec<u8>, ErrorKind, &str)> = vec![
        (0, b"XUKS".to_vec(), ErrorKind::InvalidImage, "bad magic"),
        (8, b"serpent\0".to_vec(), ErrorKind::Unsupported, "serpent"),
        (
            72,
            b"whirlpool\0".to_vec(),
            ErrorKind::Unsupported,
            "whirlpool",
        ),
        (
            108,
            1000u32.to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "at most 64",
        ),
        (
            104,
            0u32.to_be_bytes().to_vec(),
            ErrorKind::Unsupported,
            "detached",
        ),
        (
            slot(0),
            0x1234u32.to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "invalid state",
        ),
        (
            slot(0) + 4,
            u32::MAX.to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "out of range",
        ),
        (
            164,
            0u32.to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "out of range",
        ),
        (
            slot(3) + 44,
            (AF_STRIPES - 1).to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "stripes",
        ),
        (
            slot(2) + 40,
            8u32.to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "overlapping",
        ),
        (
            slot(7) + 40,
            4000u32.to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "outside",
        ),
        (
            slot(1) + 40,
            1u32.to_be_bytes().to_vec(),
            ErrorKind::Corrupt,
            "outside",
        ),
        (
            40,
            [b'x'; 32].to_vec(),
            ErrorKind::Corrupt,
            "NUL-terminated",
        ),
    ];
    assert_eq!(MAX_KEY_BYTES, 64);
    for (at, bytes, kind, words) in cases {
        let p = v1_image(dir.path());
        patch(&p, at, &bytes);
        expect(&open_err(&p), kind, words);
    }
    // A file cut inside the header or inside key material.
    let p = v1_image(dir.path());
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(300)
        .unwrap();
    expect(&open_err(&p), ErrorKind::InvalidImage, "too small");
    let p = v1_image(dir.path());
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(100_000)
        .unwrap();
    expect(&open_err(&p), ErrorKind::Corrupt, "outside");
}

#[test]
fn luks1_iteration_limit_is_a_named_constant() {
    let dir = tempfile::tempdir().unwrap();
    let p = v1_image(dir.path());
    patch(&p, 208 + 4, &(MAX_PBKDF2_ITERATIONS + 1).to_be_bytes());
    expect(
        &open_err(&p),
        ErrorKind::Corrupt,
        &MAX_PBKDF2_ITERATIONS.to_string(),
    );
}

#[test]
fn luks2_hostile_metadata_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, ErrorKind, String)> = vec![
        (
            Box::new(|v| v["keyslots"]["0"]["kdf"]["memory"] = (MAX_ARGON2_MEMORY_KIB + 1).into()),
            ErrorKind::InvalidImage,
            MAX_ARGON2_MEMORY_KIB.to_string(),
        ),
        (
            Box::new(|v| v["keyslots"]["0"]["kdf"]["time"] = u32::MAX.into()),
            ErrorKind::InvalidImage,
            "Argon2 cost".into(),
        ),
        (
            Box::new(|v| {
                v["keyslots"]["0"]["kdf"] = serde_json::json!({"type": "pbkdf2",
                    "hash": "sha256", "iterations": MAX_PBKDF2_ITERATIONS + 1,
                    "salt": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="})
            }),
            ErrorKind::InvalidImage,
            MAX_PBKDF2_ITERATIONS.to_string(),
        ),
        (
            Box::new(|v| v["digests"]["0"]["iterations"] = u32::MAX.into()),
            ErrorKind::InvalidImage,
            "out of range".into(),
        ),
        (
            Box::new(|v| v["keyslots"]["0"]["key_size"] = (MAX_KEY_SIZE + 1).into()),
            ErrorKind::InvalidImage,
            "key size".into(),
        ),
        (
            Box::new(|v| {
                let s = v["keyslots"]["0"].clone();
                v["keyslots"][MAX_KEYSLOTS.to_string()] = s;
            }),
            ErrorKind::InvalidImage,
            "not below".into(),
        ),
        (
            Box::new(|v| {
                v["config"]["keyslots_size"] = (MAX_KEYSLOTS_SIZE + 4096).to_string().into()
            }),
            ErrorKind::InvalidImage,
            "keyslots_size".into(),
        ),
        (
            Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = "4096".into()),
            ErrorKind::InvalidImage,
            "not inside the keyslots area".into(),
        ),
        (
            Box::new(|v| v["keyslots"]["0"]["af"]["stripes"] = 3999.into()),
            ErrorKind::Unsupported,
            "stripes".into(),
        ),
        (
            Box::new(|v| v["segments"]["0"]["sector_size"] = 3000.into()),
            ErrorKind::InvalidImage,
            "sector size".into(),
        ),
        (
            Box::new(|v| v["segments"]["0"]["offset"] = "0".into()),
            ErrorKind::Unsupported,
            "detached".into(),
        ),
        (
            Box::new(|v| v["digests"]["0"]["keyslots"] = serde_json::json!(["0", "9"])),
            ErrorKind::InvalidImage,
            "missing keyslot".into(),
        ),
        (
            Box::new(|v| v["segments"]["0"]["encryption"] = "serpent-xts-plain64".into()),
            ErrorKind::Unsupported,
            "serpent".into(),
        ),
        (
            Box::new(|v| {
                v["config"]["requirements"] =
                    serde_json::json!({"mandatory": ["online-reencrypt-v2"]})
            }),
            ErrorKind::Unsupported,
            "reencryption".into(),
        ),
        (
            Box::new(|v| {
                v["segments"]["0"]["integrity"] = serde_json::json!({"type": "hmac(sha256)",
                    "journal_encryption": "none", "journal_integrity": "none"})
            }),
            ErrorKind::Unsupported,
            "integrity".into(),
        ),
        (
            Box::new(|v| v["keyslots"]["0"]["type"] = "reencrypt".into()),
            ErrorKind::Unsupported,
            "reencryption".into(),
        ),
        (
            Box::new(|v| v["config"]["json_size"] = "4096".into()),
            ErrorKind::InvalidImage,
            "json_size".into(),
        ),
    ];
    for (i, (edit, kind, words)) in cases.into_iter().enumerate() {
        let p = v2_image(dir.path(), &format!("e{i}.img"));
        edit_json(&p, edit);
        expect(&open_err(&p), kind, &words);
    }
}

#[test]
fn luks2_overlapping_keyslot_areas_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = v2_image(dir.path(), "o.img");
    let dev = Luks::open(&p, false, &Passphrase::from(PW)).unwrap();
    dev.amend(
        &LuksAmend {
            state: KeyslotState::Active,
            keyslot: None,
            old_secret: None,
            new_secret: Some(Passphrase::from("two")),
            iter_time_ms: Some(1),
        },
        false,
    )
    .unwrap();
    drop(dev);
    edit_json(&p, |v| {
        let off = v["keyslots"]["0"]["area"]["offset"].clone();
        v["keyslots"]["1"]["area"]["offset"] = off;
    });
    expect(&open_err(&p), ErrorKind::InvalidImage, "overlapping");
}

#[test]
fn luks2_json_area_limits() {
    let dir = tempfile::tempdir().unwrap();
    // A JSON area without its terminating NUL, in both copies.
    let p = v2_image(dir.path(), "nul.img");
    let file = std::fs::read(&p).unwrap();
    let bin = parse_bin(&file[..4096], 0).unwrap();
    let end = 4096 + file[4096..].iter().position(|&c| c == 0).unwrap();
    let mut json = String::from_utf8(file[4096..end].to_vec()).unwrap();
    json.push_str(&" ".repeat(bin.hdr_size as usize - 4096 - json.len()));
    let mut file = file;
    for off in [0, bin.hdr_size] {
        // The text fills the whole area: no room for the NUL.
        let copy = build_copy(&bin, &json, off, &[1; 64]);
        let start = off as usize;
        file[start..start + copy.len()].copy_from_slice(&copy);
    }
    std::fs::write(&p, &file).unwrap();
    expect(&open_err(&p), ErrorKind::InvalidImage, "not NUL-terminated");

    // A header size far beyond the largest LUKS2 header: refused without reading it.
    let p = v2_image(dir.path(), "big.img");
    patch(&p, 8, &(1u64 << 40).to_be_bytes());
    patch(&p, 16384 + 8, &(MAX_HDR_SIZE * 2).to_be_bytes());
    expect(
        &open_err(&p),
        ErrorKind::InvalidImage,
        "not a LUKS2 header size",
    );
}

#[test]
fn luks2_damaged_copy_is_reported_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let p = v2_image(dir.path(), "d.img");
    let plain = pattern(8192, 3);
    vdisk_open(&p, PW, false).write_at(&plain, 0).unwrap();
    patch(&p, 4096 + 10, b"#");
    let dev = Luks::open(&p, false, &Passphrase::from(PW)).unwrap();
    let damaged = dev.volume().damaged_header().expect("damage reported");
    assert!(
        damaged.contains("primary") && damaged.contains("checksum"),
        "{damaged}"
    );
    let Some(FormatSpecific::Luks(info)) = dev.info().unwrap().format_specific else {
        panic!()
    };
    assert_eq!(
        info.luks2.unwrap().damaged_header.as_deref(),
        Some(&*damaged)
    );
    assert!(dev.repair().unwrap());
    assert!(!dev.repair().unwrap());
    drop(dev);
    let dev = Luks::open(&p, true, &Passphrase::from(PW)).unwrap();
    assert_eq!(dev.volume().damaged_header(), None);
    let mut back = vec![0u8; plain.len()];
    dev.read_at(&mut back, 0).unwrap();
    assert_eq!(back, plain);
    luks_dump(&p);
    assert!(cryptsetup_accepts(&p, PW, &[]));

    // Both copies destroyed.
    patch(&p, 4096 + 10, b"#");
    patch(&p, 16384 + 4096 + 10, b"#");
    expect(
        &open_err(&p),
        ErrorKind::InvalidImage,
        "no valid LUKS2 header",
    );
}

#[test]
fn luks2_tokens_are_named_when_the_passphrase_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let p = v2_image(dir.path(), "t.img");
    edit_json(&p, |v| {
        v["tokens"]["0"] = serde_json::json!({"type": "systemd-tpm2", "keyslots": ["0"]})
    });
    let e = Luks::open(&p, true, &Passphrase::from("wrong")).unwrap_err();
    expect(&e, ErrorKind::InvalidArgument, "systemd-tpm2");
    // The token does not stop the passphrase from working, and survives key slot changes.
    let dev = Luks::open(&p, false, &Passphrase::from(PW)).unwrap();
    let Some(FormatSpecific::Luks(info)) = dev.info().unwrap().format_specific else {
        panic!()
    };
    assert_eq!(info.luks2.unwrap().tokens, ["systemd-tpm2"]);
}
