//! LUKS1 against qemu-img and qemu-io: images either side makes read and write identically in
//! the other, `info` agrees, and key slots added by one unlock in the other.

mod common;
mod luks_common;

use std::process::Command;

use luks_common::*;
use vdisk_formats::luks::{KeyslotState, Luks, LuksAmend, LuksVersion};
use vdisk_formats::{
    open, BlockDev, ErrorKind, FormatSpecific, OpenOptions, Passphrase, ZeroFlags,
};

/// Writes at odd offsets through vdisk, checks qemu sees the same bytes, and the reverse.
fn round_trip(path: &std::path::Path) {
    let dev = vdisk_open(path, PW, false);
    let size = dev.size() as usize;
    let mut expect = qemu_read_all(path, PW);
    assert_eq!(
        vdisk_read_all(&*dev),
        expect,
        "vdisk and qemu read the same plaintext"
    );
    for (i, (off, len)) in [
        (0, 4096),
        (513, 3000),
        (65536 - 7, 20000),
        (size - 100, 100),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(len, i as u32 + 1);
        dev.write_at(&data, off as u64).unwrap();
        expect[off..off + len].copy_from_slice(&data);
    }
    dev.write_zeroes(200_000, 70_000, ZeroFlags::default())
        .unwrap();
    expect[200_000..270_000].fill(0);
    dev.flush().unwrap();
    drop(dev);
    assert_eq!(
        qemu_read_all(path, PW),
        expect,
        "qemu reads what vdisk wrote"
    );
    qemu_io(
        path,
        PW,
        &["write -P 0x5a 1000 3000", "write -P 0xa5 131072 65536"],
    );
    expect[1000..4000].fill(0x5a);
    expect[131072..196608].fill(0xa5);
    let dev = vdisk_open(path, PW, true);
    assert_eq!(vdisk_read_all(&*dev), expect, "vdisk reads what qemu wrote");
}

#[test]
fn qemu_made_images_read_and_write_identically_in_vdisk() {
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("default.luks");
    qemu_default_image(&default);
    round_trip(&default);
    // qemu-img create takes seconds whatever the options: create the variants in parallel.
    let variants = [
        "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha512",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain",
    ];
    let paths: Vec<_> = (0..variants.len())
        .map(|i| dir.path().join(format!("q{i}.luks")))
        .collect();
    std::thread::scope(|s| {
        for (p, o) in paths.iter().zip(variants) {
            s.spawn(move || qemu_create(p, 1 << 20, o));
        }
    });
    for p in &paths {
        round_trip(p);
    }
}

#[test]
fn vdisk_made_images_are_read_by_qemu_with_the_same_info() {
    let dir = tempfile::tempdir().unwrap();
    for (i, extra) in [
        vec![],
        vec![("cipher-alg", "aes-128"), ("hash-alg", "sha1")],
        vec![
            ("cipher-mode", "cbc"),
            ("ivgen-alg", "essiv"),
            ("hash-alg", "sha512"),
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("v{i}.luks"));
        let mut pairs = extra.clone();
        pairs.push(("iter-time", "1"));
        vdisk_create(&path, 1 << 20, &pairs);
        round_trip(&path);

        let out = run_ok(
            Command::new("qemu-img")
                .args(["info", "--output=json"])
                .args(qemu_luks_args(&path, PW)),
        );
        let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let qd = &q["format-specific"]["data"];
        let dev = vdisk_open(&path, PW, true);
        let info = dev.info().unwrap();
        assert_eq!(info.format, "luks");
        assert_eq!(info.encrypted, Some(true));
        assert_eq!(q["virtual-size"], info.virtual_size);
        let Some(FormatSpecific::Luks(l)) = info.format_specific else {
            panic!("no LUKS info")
        };
        assert_eq!(qd["cipher-alg"], l.cipher_alg);
        assert_eq!(qd["cipher-mode"], l.cipher_mode);
        assert_eq!(qd["ivgen-alg"], l.ivgen_alg);
        assert_eq!(qd["hash-alg"], l.hash_alg);
        assert_eq!(qd["uuid"], l.uuid);
        assert_eq!(qd["payload-offset"], l.payload_offset);
        assert_eq!(qd["master-key-iters"], l.master_key_iters);
        assert_eq!(qd["detached-header"], false);
        if let Some(h) = &l.ivgen_hash_alg {
            assert_eq!(qd["ivgen-hash-alg"], *h);
        }
        for (s, qs) in l.slots.iter().zip(qd["slots"].as_array().unwrap()) {
            assert_eq!(qs["active"], s.active);
            assert_eq!(qs["key-offset"], s.key_offset);
            assert_eq!(qs.get("iters").and_then(|v| v.as_u64()), s.iters);
        }
        assert_eq!(info.children[0].info.format, "file");
    }
}

#[test]
fn vdisk_layout_matches_qemu_for_the_same_options() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.luks");
    let v = dir.path().join("v.luks");
    qemu_default_image(&q);
    vdisk_create(&v, 1 << 20, &[("iter-time", "1")]);
    assert_eq!(
        std::fs::metadata(&q).unwrap().len(),
        std::fs::metadata(&v).unwrap().len()
    );
    let head = |p: &std::path::Path| {
        let b = std::fs::read(p).unwrap();
        // magic..payload offset and key size; then slot states, offsets and stripes.
        let mut k = b[..112].to_vec();
        for s in 0..8 {
            let at = 208 + 48 * s;
            k.extend_from_slice(&b[at + 40..at + 48]);
        }
        k
    };
    assert_eq!(head(&q), head(&v));
}

#[test]
fn wrong_or_missing_passphrase_gives_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.luks");
    qemu_default_image(&path);
    let e = Luks::open(&path, true, &Passphrase::from("wrong")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let msg = e.to_string();
    assert!(
        msg.contains("Invalid password, cannot unlock any keyslot"),
        "{msg}"
    );
    assert!(
        !msg.contains("wrong"),
        "the passphrase must not appear: {msg}"
    );
    let e = open(&path, OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.to_string()
            .ends_with("Parameter 'key-secret' is required for cipher"),
        "{e}"
    );
    // `info` needs no passphrase: the header alone describes the image, as the unlocked one does.
    let unlocked = Luks::open(&path, true, &Passphrase::from(PW)).unwrap();
    assert_eq!(
        vdisk_formats::describe(&path, None).unwrap(),
        unlocked.info().unwrap()
    );
}

fn amend(
    dev: &Luks,
    state: KeyslotState,
    slot: Option<u32>,
    old: Option<&str>,
    new: Option<&str>,
    force: bool,
) -> vdisk_formats::Result<()> {
    dev.amend(
        &LuksAmend {
            state,
            keyslot: slot,
            old_secret: old.map(Passphrase::from),
            new_secret: new.map(Passphrase::from),
            iter_time_ms: Some(1),
        },
        force,
    )
}

#[test]
fn key_slots_added_by_either_side_unlock_in_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.luks");
    qemu_default_image(&path);
    let before = qemu_read_all(&path, PW);

    // vdisk adds slot 3; qemu opens with it.
    let dev = Luks::open(&path, false, &Passphrase::from(PW)).unwrap();
    amend(
        &dev,
        KeyslotState::Active,
        Some(3),
        None,
        Some("second"),
        false,
    )
    .unwrap();
    let e = amend(
        &dev,
        KeyslotState::Active,
        Some(3),
        None,
        Some("third"),
        false,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("Refusing to overwrite active keyslot 3"),
        "{e}"
    );
    drop(dev);
    assert_eq!(qemu_read_all(&path, "second"), before);

    // qemu adds a slot; vdisk opens with it.
    run_ok(
        Command::new("qemu-img")
            .args(["amend", "--object", &format!("secret,id=s0,data={PW}")])
            .args(["--object", "secret,id=s1,data=qemu-added"])
            .args(["-o", "state=active,new-secret=s1,iter-time=1"])
            .arg("--image-opts")
            .arg(format!(
                "driver=luks,key-secret=s0,file.filename={}",
                path.display()
            )),
    );
    let dev = vdisk_open(&path, "qemu-added", true);
    assert_eq!(vdisk_read_all(&*dev), before);
    drop(dev);

    // Erasing by old secret; the last slot needs force.
    let dev = Luks::open(&path, false, &Passphrase::from("second")).unwrap();
    amend(&dev, KeyslotState::Inactive, None, Some(PW), None, false).unwrap();
    amend(
        &dev,
        KeyslotState::Inactive,
        None,
        Some("qemu-added"),
        None,
        false,
    )
    .unwrap();
    let e = amend(&dev, KeyslotState::Inactive, Some(3), None, None, false).unwrap_err();
    assert!(e.to_string().contains("only active keyslot"), "{e}");
    let e = amend(&dev, KeyslotState::Inactive, Some(5), None, None, false).unwrap_err();
    assert!(e.to_string().contains("already erased"), "{e}");
    drop(dev);
    assert!(Luks::open(&path, true, &Passphrase::from(PW)).is_err());
    assert_eq!(qemu_read_all(&path, "second"), before);
    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .args(qemu_luks_args(&path, "second")),
    );
    let q: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let active: Vec<bool> = q["format-specific"]["data"]["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["active"].as_bool().unwrap())
        .collect();
    assert_eq!(
        active,
        [false, false, false, true, false, false, false, false]
    );
}

#[test]
fn cheap_create_options_are_respected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.luks");
    vdisk_create(&path, 1 << 20, &cheap(LuksVersion::V1));
    let dev = vdisk_open(&path, PW, true);
    let Some(FormatSpecific::Luks(l)) = dev.info().unwrap().format_specific else {
        panic!()
    };
    assert_eq!(l.slots[0].iters, Some(1000));
    assert_eq!(l.master_key_iters, 1000);
}
