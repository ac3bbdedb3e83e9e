//! LUKS1 and LUKS2 against cryptsetup (on plain files, no device-mapper): headers either side
//! makes open in the other with the right passphrase only, key slots added by either unlock in
//! the other, and data vdisk writes into a LUKS2 image decrypts with the volume key cryptsetup
//! dumps and an independent AES-XTS (Python's `cryptography`).

mod common;
mod luks_common;

use std::path::Path;

use luks_common::*;
use vdisk_formats::luks::{KeyslotState, Luks, LuksAmend, LuksVersion};
use vdisk_formats::{BlockDev, ErrorKind, FormatSpecific, Passphrase};

/// `cryptsetup luksFormat` on a new 20 MiB file with cheap KDF settings.
fn cryptsetup_format(path: &Path, args: &[&str]) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let p = path.to_str().unwrap();
    let mut all = vec!["luksFormat", "-q", "--batch-mode"];
    all.extend_from_slice(args);
    all.push(p);
    let out = cryptsetup_with_key(&all, PW);
    assert!(
        out.status.success(),
        "luksFormat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const LUKS1: &[&str] = &["--type", "luks1", "--pbkdf-force-iterations", "1000"];

fn luks2(kdf: &'static str, sector: &'static str) -> Vec<&'static str> {
    let mut v = vec!["--type", "luks2", "--pbkdf", kdf, "--sector-size", sector];
    if kdf == "pbkdf2" {
        v.extend(["--pbkdf-force-iterations", "1000"]);
    } else {
        v.extend(["--pbkdf-force-iterations", "4", "--pbkdf-memory", "32"]);
        v.extend(["--pbkdf-parallel", "1"]);
    }
    v
}

#[test]
fn cryptsetup_made_headers_open_with_the_right_passphrase_only() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("luks1", LUKS1.to_vec()),
        ("luks1-cbc", {
            let mut v = LUKS1.to_vec();
            v.extend([
                "--cipher",
                "aes-cbc-essiv:sha256",
                "--key-size",
                "256",
                "--hash",
                "sha1",
            ]);
            v
        }),
        ("argon2id-512", luks2("argon2id", "512")),
        ("argon2i-4096", luks2("argon2i", "4096")),
        ("pbkdf2-4096", luks2("pbkdf2", "4096")),
    ];
    for (name, args) in cases {
        let path = dir.path().join(format!("{name}.img"));
        cryptsetup_format(&path, &args);
        let dev = Luks::open(&path, true, &Passphrase::from(PW))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let header = if name.starts_with("luks1") {
            4096 * 512
        } else {
            16 << 20
        };
        assert_eq!(dev.size(), (20 << 20) - header, "{name}");
        let e = Luks::open(&path, true, &Passphrase::from("nope")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{name}");
        assert!(e.to_string().contains("Invalid password"), "{name}: {e}");
    }
}

/// Writes through vdisk and decrypts the file with cryptsetup's volume key and Python.
fn check_against_python(path: &Path, sector: usize) {
    let dev = vdisk_open(path, PW, false);
    let data = pattern(256 << 10, 7);
    let at = 3 << 20;
    dev.write_at(&data, at).unwrap();
    dev.write_at(b"unaligned", 100_003).unwrap();
    dev.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, at).unwrap();
    assert_eq!(back, data);
    drop(dev);
    let key = dump_volume_key(path, PW);
    assert_eq!(key.len(), 64);
    let file = std::fs::read(path).unwrap();
    let payload = 16 << 20;
    let cipher = &file[payload + at as usize..payload + at as usize + data.len()];
    let plain = python_xts_decrypt(&key, cipher, sector, at / 512);
    assert_eq!(
        plain, data,
        "Python decrypts what vdisk wrote ({sector}-byte sectors)"
    );
    let s = 100_003 / sector * sector;
    let plain = python_xts_decrypt(
        &key,
        &file[payload + s..payload + s + sector],
        sector,
        (s / 512) as u64,
    );
    assert_eq!(&plain[100_003 - s..100_003 - s + 9], b"unaligned");
}

#[test]
fn data_vdisk_writes_to_luks2_decrypts_with_the_dumped_volume_key() {
    let dir = tempfile::tempdir().unwrap();
    for sector in ["512", "4096"] {
        let path = dir.path().join(format!("c{sector}.img"));
        cryptsetup_format(&path, &luks2("argon2id", sector));
        check_against_python(&path, sector.parse().unwrap());
    }
}

#[test]
fn vdisk_made_headers_pass_cryptsetup() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("v1", cheap(LuksVersion::V1)),
        ("v1-essiv", {
            let mut v = cheap(LuksVersion::V1);
            v.extend([
                ("cipher-mode", "cbc"),
                ("ivgen-alg", "essiv"),
                ("hash-alg", "sha1"),
            ]);
            v
        }),
        ("v2-512", cheap(LuksVersion::V2)),
        ("v2-4096", {
            let mut v = cheap(LuksVersion::V2);
            v.push(("sector_size", "4096"));
            v
        }),
        (
            "v2-pbkdf2",
            vec![
                ("luks_version", "2"),
                ("pbkdf", "pbkdf2"),
                ("pbkdf-force-iterations", "1000"),
                ("hash-alg", "sha512"),
            ],
        ),
        ("v2-argon2i", {
            let mut v = cheap(LuksVersion::V2);
            v.push(("pbkdf", "argon2i"));
            v
        }),
    ];
    for (name, pairs) in cases {
        let path = dir.path().join(format!("{name}.img"));
        vdisk_create(&path, 4 << 20, &pairs);
        let dump = luks_dump(&path);
        let version = if name.starts_with("v2") { "2" } else { "1" };
        assert!(
            dump.contains(&format!("Version:       \t{version}")),
            "{name}:\n{dump}"
        );
        assert!(
            cryptsetup_accepts(&path, PW, &[]),
            "{name}: cryptsetup refuses the passphrase"
        );
        assert!(!cryptsetup_accepts(&path, "nope", &[]), "{name}");
        if name == "v2-4096" {
            assert!(dump.contains("sector: 4096 [bytes]"), "{dump}");
            check_against_python(&path, 4096);
        }
    }
}

fn add(dev: &Luks, slot: Option<u32>, new: &str) {
    dev.amend(
        &LuksAmend {
            state: KeyslotState::Active,
            keyslot: slot,
            old_secret: None,
            new_secret: Some(Passphrase::from(new)),
            iter_time_ms: Some(1),
        },
        false,
    )
    .unwrap();
}

#[test]
fn key_slots_added_by_vdisk_or_cryptsetup_unlock_in_the_other() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [("l1", LUKS1.to_vec()), ("l2", luks2("argon2id", "512"))] {
        let path = dir.path().join(format!("{name}.img"));
        cryptsetup_format(&path, &args);
        let dev = Luks::open(&path, false, &Passphrase::from(PW)).unwrap();
        add(&dev, Some(5), "from-vdisk");
        drop(dev);
        assert!(
            cryptsetup_accepts(&path, "from-vdisk", &["--key-slot", "5"]),
            "{name}"
        );
        luks_dump(&path);

        let p = path.to_str().unwrap();
        let mut key_input = format!("{PW}\n");
        key_input.push_str("from-cryptsetup");
        let out = std::process::Command::new("cryptsetup")
            .args([
                "luksAddKey",
                "-q",
                "--pbkdf-force-iterations",
                "1000",
                "--pbkdf",
                "pbkdf2",
            ])
            .args(["--key-slot", "2", p])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                let mut stdin = c.stdin.take().unwrap();
                stdin.write_all(key_input.as_bytes())?;
                drop(stdin);
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = Luks::open(&path, false, &Passphrase::from("from-cryptsetup"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Erasing the slot cryptsetup added leaves the other two working in cryptsetup.
        dev.amend(
            &LuksAmend {
                state: KeyslotState::Inactive,
                keyslot: Some(2),
                old_secret: None,
                new_secret: None,
                iter_time_ms: None,
            },
            false,
        )
        .unwrap();
        let Some(FormatSpecific::Luks(info)) = dev.info().unwrap().format_specific else {
            panic!()
        };
        let active = info.slots.iter().filter(|s| s.active).count();
        assert_eq!(active, 2, "{name}");
        drop(dev);
        assert!(!cryptsetup_accepts(&path, "from-cryptsetup", &[]), "{name}");
        assert!(cryptsetup_accepts(&path, "from-vdisk", &[]), "{name}");
        assert!(cryptsetup_accepts(&path, PW, &[]), "{name}");
    }
}

#[test]
fn luks2_iv_tweak_and_fixed_segment_size_follow_dm_crypt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.img");
    let mut pairs = cheap(LuksVersion::V2);
    pairs.push(("sector_size", "4096"));
    vdisk_create(&path, 4 << 20, &pairs);
    edit_json(&path, |v| {
        v["segments"]["0"]["iv_tweak"] = "24".into();
        v["segments"]["0"]["size"] = (2u64 << 20).to_string().into();
    });
    let out = luks_dump(&path);
    assert!(out.contains("length: 2097152 [bytes]"), "{out}");
    let dev = vdisk_open(&path, PW, false);
    assert_eq!(dev.size(), 2 << 20);
    let data = pattern(8192, 9);
    dev.write_at(&data, 8192).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let key = dump_volume_key(&path, PW);
    let file = std::fs::read(&path).unwrap();
    let at = (16 << 20) + 8192;
    let plain = python_xts_decrypt(&key, &file[at..at + 8192], 4096, 8192 / 512 + 24);
    assert_eq!(
        plain, data,
        "IV = 512-byte units from the segment start + iv_tweak"
    );

    edit_json(&path, |v| {
        v["segments"]["0"]["size"] = (8u64 << 20).to_string().into()
    });
    let e = Luks::open(&path, true, &Passphrase::from(PW)).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
}
