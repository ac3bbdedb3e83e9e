//! qcow2 with `encrypt.format=luks` against qemu-img 10 and qemu-io: images either side makes read
//! identically in the other, vdisk's writes (unaligned, allocating, over existing clusters, over a
//! backing file, with extended L2 entries) are what qemu reads, `check` is clean both ways, `info`
//! agrees, key slots added by one unlock in the other, and bad passphrases and hostile headers
//! give one clear error.
//!
//! qemu-img create spends seconds benchmarking the KDF whatever `iter-time` says, so the
//! qemu-made images are created once, in parallel, and copied by the tests that need them.

mod common;
mod luks_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use common::{run, run_ok, Json};
use luks_common::{pattern, vdisk_read_all as read_all};
use vdisk_formats::luks::{KeyslotState, LuksAmend};
use vdisk_formats::qcow2::{self, Qcow2};
use vdisk_formats::{
    open_with_secret, BlockDev, CreateOptions, ErrorKind, Format, FormatSpecific, OpenOptions,
    Passphrase, ZeroFlags,
};

const PW: &str = "qcow2 secret";

/// `--object secret` and `--image-opts` arguments that open `path` (qcow2) with `pw`.
fn qemu_opts(path: &Path, pw: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!("secret,id=s0,data={pw}"),
        "--image-opts".into(),
        format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=s0",
            path.display()
        ),
    ]
}

fn qemu_img() -> Command {
    let mut cmd = Command::new("qemu-img");
    cmd.env("LC_ALL", "C");
    cmd
}

/// `qemu-img create -f qcow2` of an encrypted image with extra `-o` options. The KDF runs for
/// 1 ms in QEMU, which is still long for vdisk's unoptimised test build.
fn qemu_create(path: &Path, size: u64, extra: &str) {
    let mut o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1".to_string();
    if !extra.is_empty() {
        o = format!("{o},{extra}");
    }
    run_ok(
        qemu_img()
            .args(["create", "-q", "-f", "qcow2", "--object"])
            .arg(format!("secret,id=s0,data={PW}"))
            .args(["-o", &o])
            .arg(path)
            .arg(size.to_string()),
    );
}

/// The guest contents as qemu-img decrypts them.
fn qemu_read_all(path: &Path) -> Vec<u8> {
    let out = path.with_extension("qemu-plain");
    run_ok(
        qemu_img()
            .arg("convert")
            .args(qemu_opts(path, PW))
            .args(["-O", "raw"])
            .arg(&out),
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Runs qemu-io commands on an encrypted image.
fn qemu_io(path: &Path, cmds: &[&str]) {
    luks_common::qemu_io_with(qemu_opts(path, PW), cmds);
}

/// `qemu-img check` (with the secret) must find nothing at all.
fn qemu_check_clean(path: &Path) {
    qemu_check_clean_with(path, PW)
}

fn qemu_check_clean_with(path: &Path, pw: &str) {
    let out = run(qemu_img()
        .args(["check", "--output=json"])
        .args(qemu_opts(path, pw)));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}\n{text}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report = Json::parse(&text);
    for key in ["corruptions", "leaks", "check-errors"] {
        let n = report.get(key).map_or(0, Json::as_u64);
        assert_eq!(n, 0, "qemu-img check {}: {key}\n{text}", path.display());
    }
}

/// `qemu-img compare` of a raw file and the encrypted image: identical.
fn qemu_compare(raw: &Path, img: &Path) {
    let out = run(qemu_img()
        .args(["compare", "--object"])
        .arg(format!("secret,id=s0,data={PW}"))
        .args(["--image-opts"])
        .arg(format!("driver=raw,file.filename={}", raw.display()))
        .arg(format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=s0",
            img.display()
        )));
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        raw.display(),
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Create options from `-o` pairs, with the test passphrase resolved as the CLI does it.
fn vdisk_options(size: u64, pairs: &[(&str, &str)]) -> CreateOptions {
    let mut all = vec![
        ("encrypt.format", "luks"),
        ("encrypt.key-secret", "s0"),
        ("encrypt.iter-time", "10"),
    ];
    all.extend_from_slice(pairs);
    let pairs: Vec<(String, String)> = all
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut o = CreateOptions::from_pairs(Format::Qcow2, Some(size), &pairs).unwrap();
    let CreateOptions::Qcow2(q) = &mut o else {
        unreachable!()
    };
    let e = q
        .encrypt
        .as_mut()
        .expect("encrypt.* options make an encrypted image");
    assert_eq!(e.key_secret.as_deref(), Some("s0"));
    e.passphrase = Some(Passphrase::from(PW));
    o
}

fn vdisk_create(path: &Path, size: u64, pairs: &[(&str, &str)]) {
    vdisk_formats::create(path, &vdisk_options(size, pairs))
        .unwrap_or_else(|e| panic!("vdisk create {}: {e}", path.display()));
}

fn vdisk_open(path: &Path, read_only: bool) -> Arc<dyn BlockDev> {
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only,
        ..Default::default()
    };
    open_with_secret(path, opts, Some(&Passphrase::from(PW)))
        .unwrap_or_else(|e| panic!("vdisk open {}: {e}", path.display()))
}

/// Writes through vdisk and into `expect`.
fn write(dev: &dyn BlockDev, expect: &mut [u8], off: usize, len: usize, seed: u32) {
    let data = pattern(len, seed);
    dev.write_at(&data, off as u64)
        .unwrap_or_else(|e| panic!("write {off:#x}+{len:#x}: {e}"));
    expect[off..off + len].copy_from_slice(&data);
}

/// A set of writes that exercise every write path: unaligned heads and tails inside and across
/// clusters and subclusters, allocating and in-place, write-zeroes and discard.
fn exercise(dev: &dyn BlockDev, expect: &mut [u8]) {
    let size = expect.len();
    let writes = [
        (0, 4096),
        (513, 3000),
        (65536 - 7, 20000),
        (70_000, 1),
        (100_000, 200_000),
        (65536 * 5 + 1024, 2048),
        (65536 * 5 + 100, 50),
        (size - 100, 100),
        (size / 2 - 777, 65536 * 3),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        write(dev, expect, off, len, i as u32 + 1);
    }
    dev.write_zeroes(200_000, 70_000, ZeroFlags::default())
        .unwrap();
    expect[200_000..270_000].fill(0);
    dev.write_zeroes(
        65536 * 8,
        65536 * 2,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .unwrap();
    expect[65536 * 8..65536 * 10].fill(0);
    // Rewrite part of what was written: in place now.
    write(dev, expect, 1000, 10_000, 99);
    dev.flush().unwrap();
}

/// The qemu-made images, created once: default options, AES-128-CBC-ESSIV, extended L2 entries,
/// an external data file (used by one test only, in place).
struct Templates {
    _dir: tempfile::TempDir,
    default: PathBuf,
    cbc: PathBuf,
    ext_l2: PathBuf,
    data_file: PathBuf,
}

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let (default, cbc, ext_l2) = (p("default.qcow2"), p("cbc.qcow2"), p("ext.qcow2"));
        let data_file = p("df.qcow2");
        std::thread::scope(|s| {
            s.spawn(|| qemu_create(&default, 4 << 20, ""));
            s.spawn(|| {
                let o = "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,\
                         encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,\
                         encrypt.hash-alg=sha1";
                qemu_create(&cbc, 2 << 20, o)
            });
            s.spawn(|| qemu_create(&ext_l2, 4 << 20, "extended_l2=on"));
            s.spawn(|| {
                let o = format!("data_file={}", p("df.raw").display());
                qemu_create(&data_file, 2 << 20, &o)
            });
        });
        Templates {
            _dir: dir,
            default,
            cbc,
            ext_l2,
            data_file,
        }
    })
}

fn copy_template(from: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    to
}

#[test]
fn qemu_made_images_read_and_write_identically_in_vdisk() {
    let t = templates();
    let dir = tempfile::tempdir().unwrap();
    for (i, tpl) in [&t.default, &t.cbc, &t.ext_l2].into_iter().enumerate() {
        let path = copy_template(tpl, dir.path(), &format!("q{i}.qcow2"));
        qemu_io(
            &path,
            &[
                "write -P 0x11 0 65536",
                "write -P 0x22 70000 3000",
                "write -P 0x33 1048576 1048576",
                "write -z 1200000 65536",
            ],
        );
        let mut expect = qemu_read_all(&path);
        let dev = vdisk_open(&path, false);
        assert_eq!(
            read_all(&*dev),
            expect,
            "{}: vdisk reads what qemu wrote",
            path.display()
        );
        exercise(&*dev, &mut expect);
        drop(dev);
        assert_eq!(
            qemu_read_all(&path),
            expect,
            "{}: qemu reads vdisk's writes",
            path.display()
        );
        qemu_check_clean(&path);
        let report = Qcow2::check(&path, None).unwrap();
        assert_eq!(report.exit_code(), 0, "vdisk check of {}", path.display());
        // And back: qemu writes over vdisk's clusters.
        qemu_io(
            &path,
            &["write -P 0x44 512 1024", "write -P 0x55 150000 70000"],
        );
        expect[512..1536].fill(0x44);
        expect[150_000..220_000].fill(0x55);
        assert_eq!(read_all(&*vdisk_open(&path, true)), expect);
    }
}

#[test]
fn vdisk_made_images_are_read_and_checked_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let variants: [&[(&str, &str)]; 6] = [
        &[],
        // Preallocated clusters decrypt to noise in QEMU too; both must see the same noise.
        &[("preallocation", "metadata")],
        &[("extended_l2", "on")],
        &[("cluster_size", "4096")],
        &[("compat", "0.10"), ("cluster_size", "512")],
        &[
            ("encrypt.cipher-alg", "aes-256"),
            ("encrypt.cipher-mode", "cbc"),
            ("encrypt.ivgen-alg", "plain"),
            ("encrypt.hash-alg", "sha512"),
        ],
    ];
    for (i, pairs) in variants.into_iter().enumerate() {
        let path = dir.path().join(format!("v{i}.qcow2"));
        let size = 4 << 20;
        vdisk_create(&path, size, pairs);
        qemu_check_clean(&path);
        let dev = vdisk_open(&path, false);
        let mut expect = qemu_read_all(&path);
        if pairs.is_empty() {
            assert_eq!(expect, vec![0u8; size as usize]);
        }
        assert_eq!(read_all(&*dev), expect, "{pairs:?}");
        exercise(&*dev, &mut expect);
        drop(dev);
        let raw = dir.path().join(format!("v{i}.raw"));
        std::fs::write(&raw, &expect).unwrap();
        qemu_compare(&raw, &path);
        qemu_check_clean(&path);
        qemu_io(&path, &["write -P 0x66 3000 5000"]);
        expect[3000..8000].fill(0x66);
        assert_eq!(read_all(&*vdisk_open(&path, true)), expect, "{pairs:?}");
    }
}

#[test]
fn the_header_goes_where_qemu_puts_it_and_info_agrees() {
    let t = templates();
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    vdisk_create(&ours, 4 << 20, &[]);
    let header = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let h = qcow2::header::Header::parse(p, &bytes, bytes.len() as u64).unwrap();
        (
            h.crypt_method,
            h.crypto_area().map(|a| (a.offset, a.length)),
            bytes.len(),
        )
    };
    assert_eq!(
        header(&ours),
        header(&t.default),
        "crypt method, FDE extension, file length"
    );
    let first_cluster = |p: &Path| std::fs::read(p).unwrap()[..65536].to_vec();
    assert!(
        first_cluster(&ours) == first_cluster(&t.default),
        "the header cluster is byte for byte qemu-img's"
    );
    for path in [&ours, &t.default, &t.cbc] {
        let out = run_ok(qemu_img().args(["info", "--output=json"]).arg(path));
        let q = Json::parse(&String::from_utf8_lossy(&out.stdout));
        let dev = vdisk_open(path, true);
        let info = dev.info().unwrap();
        assert_eq!(info.encrypted, Some(true));
        assert_eq!(q.get("encrypted"), Some(&Json::Bool(true)));
        let Some(FormatSpecific::Qcow2(q2)) = &info.format_specific else {
            panic!("qcow2 info")
        };
        let e = q2.encrypt.as_ref().expect("encrypt info");
        let qe = q
            .get("format-specific")
            .and_then(|f| f.get("data"))
            .and_then(|d| d.get("encrypt"))
            .expect("qemu prints encrypt");
        let s = |j: &Json, k: &str| match j.get(k) {
            Some(Json::Str(s)) => s.clone(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(s(qe, "format"), "luks");
        assert_eq!(s(qe, "cipher-alg"), e.cipher_alg);
        assert_eq!(s(qe, "cipher-mode"), e.cipher_mode);
        assert_eq!(s(qe, "ivgen-alg"), e.ivgen_alg);
        assert_eq!(
            qe.get("ivgen-hash-alg").map(|_| s(qe, "ivgen-hash-alg")),
            e.ivgen_hash_alg
        );
        assert_eq!(s(qe, "hash-alg"), e.hash_alg);
        assert_eq!(s(qe, "uuid"), e.uuid);
        assert_eq!(qe.get("detached-header"), Some(&Json::Bool(false)));
        assert_eq!(qe.get("payload-offset").unwrap().as_u64(), e.payload_offset);
        assert_eq!(
            qe.get("master-key-iters").unwrap().as_u64(),
            e.master_key_iters
        );
        let slots = qe.get("slots").unwrap().as_array();
        assert_eq!(slots.len(), e.slots.len());
        for (qs, es) in slots.iter().zip(&e.slots) {
            assert_eq!(qs.get("active"), Some(&Json::Bool(es.active)));
            assert_eq!(qs.get("iters").map(Json::as_u64), es.iters);
            assert_eq!(qs.get("key-offset").unwrap().as_u64(), es.key_offset);
            assert_eq!(
                qs.get("stripes").map(Json::as_u64),
                es.stripes.map(u64::from)
            );
        }
        // No host offsets for encrypted data (qemu-img map shows none either).
        let ext = dev.extent(0, dev.size()).unwrap();
        assert_eq!(ext.host_offset, None);
        // Described from the header alone, with no passphrase, it is the same.
        assert_eq!(vdisk_formats::describe(path, None).unwrap(), info);
    }
}

#[test]
fn an_encrypted_overlay_over_a_plain_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let base_data = pattern(2 << 20, 7);
    std::fs::write(&base, &base_data).unwrap();
    for ext_l2 in ["off", "on"] {
        overlay_round_trip(dir.path(), &base_data, ext_l2);
    }
}

fn overlay_round_trip(dir: &Path, base_data: &[u8], ext_l2: &str) {
    let top = dir.join(format!("top-{ext_l2}.qcow2"));
    vdisk_create(
        &top,
        2 << 20,
        &[
            ("backing_file", "base.raw"),
            ("backing_fmt", "raw"),
            ("extended_l2", ext_l2),
        ],
    );
    let dev = vdisk_open(&top, false);
    let mut expect = base_data.to_vec();
    assert_eq!(
        read_all(&*dev),
        expect,
        "unallocated clusters show the backing file"
    );
    // Partial clusters: the rest of each new cluster is copied from the backing file.
    write(&*dev, &mut expect, 100, 1000, 1);
    write(&*dev, &mut expect, 65536 * 3 - 10, 30, 2);
    write(&*dev, &mut expect, 300_001, 77_777, 3);
    write(&*dev, &mut expect, 300_500, 100, 4);
    dev.write_zeroes(65536 * 10, 65536, ZeroFlags::default())
        .unwrap();
    expect[65536 * 10..65536 * 11].fill(0);
    dev.discard(65536 * 12, 65536 * 2).unwrap();
    expect[65536 * 12..65536 * 14].fill(0);
    dev.flush().unwrap();
    drop(dev);
    assert_eq!(qemu_read_all(&top), expect);
    qemu_check_clean(&top);
    assert_eq!(read_all(&*vdisk_open(&top, true)), expect);
}

#[test]
fn concurrent_partial_sector_writes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2");
    vdisk_create(&path, 1 << 20, &[("extended_l2", "on")]);
    let dev = vdisk_open(&path, false);
    // Eight threads write interleaved 100-byte pieces, so every sector is patched by several at
    // once, over unallocated, newly allocated and allocated clusters.
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let dev = &dev;
            s.spawn(move || {
                for round in 0..3u32 {
                    for k in 0..40u64 {
                        let off = (k * 8 + u64::from(t)) * 100 + u64::from(round) * 70_000;
                        dev.write_at(&[t as u8 + 1; 100], off).unwrap();
                    }
                }
            });
        }
    });
    let mut expect = vec![0u8; 1 << 20];
    for t in 0..8u64 {
        for round in 0..3u64 {
            for k in 0..40u64 {
                let off = ((k * 8 + t) * 100 + round * 70_000) as usize;
                expect[off..off + 100].fill(t as u8 + 1);
            }
        }
    }
    assert_eq!(read_all(&*dev), expect);
    dev.flush().unwrap();
    drop(dev);
    assert_eq!(qemu_read_all(&path), expect);
}

#[test]
fn key_slots_added_by_either_side_unlock_in_the_other() {
    let t = templates();
    let dir = tempfile::tempdir().unwrap();
    let path = copy_template(&t.default, dir.path(), "k.qcow2");
    qemu_io(&path, &["write -P 0x77 0 100000"]);
    let expect = qemu_read_all(&path);
    // vdisk adds slot 3 with a new passphrase; qemu opens the image with it.
    let amend = qcow2::amend_pairs(
        &[
            ("encrypt.state".into(), "active".into()),
            ("encrypt.new-secret".into(), "s1".into()),
            ("encrypt.keyslot".into(), "3".into()),
            ("encrypt.iter-time".into(), "10".into()),
        ],
        &mut |id| {
            assert_eq!(id, "s1");
            Ok(Passphrase::from("second"))
        },
    )
    .unwrap();
    qcow2::amend_encryption(&path, &Passphrase::from(PW), &amend, false).unwrap();
    let out = path.with_extension("second.raw");
    run_ok(
        qemu_img()
            .arg("convert")
            .args(qemu_opts(&path, "second"))
            .args(["-O", "raw"])
            .arg(&out),
    );
    assert_eq!(std::fs::read(&out).unwrap(), expect);
    // vdisk erases slot 0; the first passphrase no longer opens the image in qemu.
    let erase = LuksAmend {
        state: KeyslotState::Inactive,
        keyslot: Some(0),
        old_secret: None,
        new_secret: None,
        iter_time_ms: None,
    };
    qcow2::amend_encryption(&path, &Passphrase::from("second"), &erase, false).unwrap();
    let refused = run(qemu_img()
        .arg("convert")
        .args(qemu_opts(&path, PW))
        .args(["-O", "raw"])
        .arg(&out));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Invalid password"));
    // qemu adds slot 5; vdisk opens with it.
    run_ok(
        qemu_img()
            .arg("amend")
            .args(["--object", "secret,id=s0,data=second"])
            .args(["--object", "secret,id=s1,data=third"])
            .arg("--image-opts")
            .arg(format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=s0",
                path.display()
            ))
            .args([
                "-o",
                "encrypt.state=active,encrypt.new-secret=s1,encrypt.keyslot=5,encrypt.iter-time=1",
            ]),
    );
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: true,
        ..Default::default()
    };
    let dev = open_with_secret(&path, opts, Some(&Passphrase::from("third"))).unwrap();
    assert_eq!(read_all(&*dev), expect);
    let Some(FormatSpecific::Qcow2(q)) = dev.info().unwrap().format_specific else {
        panic!()
    };
    let active: Vec<bool> = q.encrypt.unwrap().slots.iter().map(|s| s.active).collect();
    assert_eq!(
        active,
        [false, false, false, true, false, true, false, false]
    );
    qemu_check_clean_with(&path, "third");
}

#[test]
fn wrong_or_missing_passphrases_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.qcow2");
    vdisk_create(&path, 1 << 20, &[]);
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: true,
        ..Default::default()
    };
    let err = open_with_secret(&path, opts, Some(&Passphrase::from("wrong"))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        err.to_string()
            .ends_with("Invalid password, cannot unlock any keyslot"),
        "{err}"
    );
    for res in [
        vdisk_formats::open(&path, opts),
        open_with_secret(&path, opts, None),
    ] {
        let err = res.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.to_string()
                .ends_with("Parameter 'encrypt.key-secret' is required for cipher"),
            "{err}"
        );
    }
    // Opened for its metadata only, the image describes itself but its data cannot be read.
    let dev = vdisk_open(&path, false);
    dev.write_at(&pattern(4096, 9), 8192).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let meta = Qcow2::open_metadata(&path).unwrap();
    assert!(meta.is_encrypted());
    assert!(meta.encryption_info().is_some());
    let err = meta.read_at(&mut [0u8; 512], 8192).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        err.to_string()
            .ends_with("Parameter 'encrypt.key-secret' is required for cipher"),
        "{err}"
    );
    // qemu agrees about the wrong passphrase.
    let out = run(qemu_img()
        .arg("convert")
        .args(qemu_opts(&path, "wrong"))
        .args(["-O", "raw"])
        .arg(dir.path().join("x.raw")));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Invalid password, cannot unlock any keyslot"));
}

#[test]
fn hostile_encryption_header_extensions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.qcow2");
    vdisk_create(&good, 1 << 20, &[]);
    let bytes = std::fs::read(&good).unwrap();
    let h = qcow2::header::Header::parse(&good, &bytes, bytes.len() as u64).unwrap();
    let area = h.crypto_area().unwrap();
    // Where the extension's 16 bytes are in the header cluster.
    let at = bytes
        .windows(16)
        .position(|w| w == area.encode().as_slice())
        .unwrap();
    let len = bytes.len() as u64;
    let cases: [(u64, u64, &str); 5] = [
        (len + 65536, area.length, "past the end of the file"),
        (
            area.offset + 512,
            area.length,
            "is not a multiple of cluster size",
        ),
        (area.offset, 0, "too small for a LUKS header"),
        (area.offset, u64::MAX - 4096, "past the end of the file"),
        (0, area.length, "overlaps the qcow2 header"),
    ];
    for (i, (offset, length, msg)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.qcow2"));
        let mut b = bytes.clone();
        b[at..at + 8].copy_from_slice(&offset.to_be_bytes());
        b[at + 8..at + 16].copy_from_slice(&length.to_be_bytes());
        std::fs::write(&path, &b).unwrap();
        let opts = OpenOptions {
            format: Some(Format::Qcow2),
            read_only: true,
            ..Default::default()
        };
        let err = open_with_secret(&path, opts, Some(&Passphrase::from(PW))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidImage, "{err}");
        assert!(err.to_string().contains(msg), "case {i}: {err}");
    }
    // A header area that does not hold a LUKS header.
    let path = dir.path().join("nomagic.qcow2");
    let mut b = bytes.clone();
    let off = area.offset as usize;
    b[off..off + 6].fill(0);
    std::fs::write(&path, &b).unwrap();
    let err =
        open_with_secret(&path, OpenOptions::default(), Some(&Passphrase::from(PW))).unwrap_err();
    assert!(err.to_string().contains("not a LUKS image"), "{err}");
}

#[test]
fn compression_is_refused_and_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.qcow2");
    vdisk_create(&path, 1 << 20, &[]);
    let dev = vdisk_open(&path, false);
    let err = dev.compress_cluster(&vec![0u8; 65536]).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("Compression and encryption not supported at the same time"),
        "{err}"
    );
    let err = dev.write_compressed(0, &[1, 2, 3]).unwrap_err();
    assert!(
        err.to_string().contains("Compression and encryption"),
        "{err}"
    );
    assert_eq!(dev.capabilities().min_block, 512);
    let parse = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CreateOptions::from_pairs(Format::Qcow2, Some(1 << 20), &pairs)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        parse(&[("encrypt.key-secret", "s0")]),
        "Parameter 'encrypt.format' is missing"
    );
    assert_eq!(
        parse(&[("encrypt.format", "luks")]),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    assert!(parse(&[("encryption", "on")]).contains("legacy AES"));
    assert!(
        parse(&[("encrypt.format", "aes"), ("encrypt.key-secret", "s0")]).contains("legacy AES")
    );
    let bad_mode = parse(&[
        ("encrypt.format", "luks"),
        ("encrypt.key-secret", "s0"),
        ("encrypt.cipher-mode", "ecb"),
    ]);
    assert!(bad_mode.contains("ecb"), "{bad_mode}");
    // Without the passphrase resolved, creating fails with qemu's message.
    let CreateOptions::Qcow2(mut q) = vdisk_options(1 << 20, &[]) else {
        unreachable!()
    };
    q.encrypt.as_mut().unwrap().passphrase = None;
    let err =
        vdisk_formats::create(&dir.path().join("n.qcow2"), &CreateOptions::Qcow2(q)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
}

#[test]
fn writes_after_a_snapshot_re_encrypt_the_copied_clusters() {
    let t = templates();
    let dir = tempfile::tempdir().unwrap();
    let path = copy_template(&t.default, dir.path(), "s.qcow2");
    qemu_io(
        &path,
        &["write -P 0x21 0 300000", "write -P 0x43 1000000 70000"],
    );
    let before = qemu_read_all(&path);
    let snapshot = |op: &str| {
        run_ok(
            qemu_img()
                .args(["snapshot", op, "sn1"])
                .args(qemu_opts(&path, PW)),
        )
    };
    snapshot("-c");
    // Every cluster is shared with the snapshot: each write copies its cluster elsewhere.
    let dev = vdisk_open(&path, false);
    let mut expect = before.clone();
    write(&*dev, &mut expect, 10, 100, 1);
    write(&*dev, &mut expect, 65536 + 4096, 8192, 2);
    write(&*dev, &mut expect, 1_000_000 - 3, 7, 3);
    dev.flush().unwrap();
    drop(dev);
    assert_eq!(qemu_read_all(&path), expect);
    qemu_check_clean(&path);
    snapshot("-a");
    assert_eq!(
        read_all(&*vdisk_open(&path, true)),
        before,
        "the snapshot kept its data"
    );
}

#[test]
fn resizing_needs_the_passphrase_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    // A size inside a cluster: growing must zero the rest of the last cluster.
    let size = (1 << 20) + 4096;
    vdisk_create(&path, size, &[]);
    let dev = vdisk_open(&path, false);
    let mut expect = vec![0u8; size as usize];
    write(&*dev, &mut expect, size as usize - 3000, 3000, 5);
    write(&*dev, &mut expect, 1000, 100, 6);
    drop(dev);
    let pw = Passphrase::from(PW);
    let resize = |new: u64, shrink: bool, secret: Option<&Passphrase>| {
        let opts = vdisk_formats::ResizeOptions {
            format: Some(Format::Qcow2),
            shrink,
            ..Default::default()
        };
        vdisk_formats::resize_image(&path, new, opts, secret)
    };
    let err = resize(2 << 20, false, None).unwrap_err();
    assert!(err.to_string().contains("encrypt.key-secret"), "{err}");
    resize(2 << 20, false, Some(&pw)).unwrap();
    expect.resize(2 << 20, 0);
    assert_eq!(qemu_read_all(&path), expect);
    qemu_check_clean(&path);
    resize(512 << 10, true, Some(&pw)).unwrap();
    expect.truncate(512 << 10);
    assert_eq!(read_all(&*vdisk_open(&path, true)), expect);
    assert_eq!(qemu_read_all(&path), expect);
    qemu_check_clean(&path);
}

#[test]
fn an_external_data_file_is_decrypted_read_only() {
    let path = &templates().data_file;
    qemu_io(
        path,
        &["write -P 0x5a 1000 100000", "write -P 0xa5 1500000 4096"],
    );
    let expect = qemu_read_all(path);
    assert_eq!(read_all(&*vdisk_open(path, true)), expect);
}
