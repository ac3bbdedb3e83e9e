//! Helpers shared by the LUKS integration tests: the peers (qemu-img, qemu-io, cryptsetup, a
//! Python AES-XTS) are the oracles.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

pub use crate::common::run_ok;
use vdisk_formats::luks::luks2::header::{build_copy, parse_bin};
use vdisk_formats::luks::{LuksCreateOptions, LuksVersion};
use vdisk_formats::{open_with_secret, BlockDev, CreateOptions, Format, OpenOptions, Passphrase};

pub const PW: &str = "correct horse";

/// `--object secret,...` and `--image-opts` arguments that open `path` as LUKS with `pw`.
pub fn qemu_luks_args(path: &Path, pw: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!("secret,id=s0,data={pw}"),
        "--image-opts".into(),
        format!("driver=luks,key-secret=s0,file.filename={}", path.display()),
    ]
}

/// Creates a LUKS1 image with qemu-img (`iter-time` 10 ms keeps it fast).
pub fn qemu_create(path: &Path, size: u64, extra: &str) {
    let mut o = "key-secret=s0,iter-time=1".to_string();
    if !extra.is_empty() {
        o = format!("{o},{extra}");
    }
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "luks", "--object"])
            .arg(format!("secret,id=s0,data={PW}"))
            .args(["-o", &o])
            .arg(path)
            .arg(size.to_string()),
    );
}

/// The plaintext of a LUKS image as qemu-img decrypts it.
pub fn qemu_read_all(path: &Path, pw: &str) -> Vec<u8> {
    let out = path.with_extension("qemu-plain");
    run_ok(
        Command::new("qemu-img")
            .arg("convert")
            .args(qemu_luks_args(path, pw))
            .args(["-O", "raw"])
            .arg(&out),
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// Runs qemu-io commands on a LUKS image.
pub fn qemu_io(path: &Path, pw: &str, cmds: &[&str]) {
    qemu_io_with(qemu_luks_args(path, pw), cmds);
}

/// Runs qemu-io commands on the image `image_args` name (`--object ... --image-opts ...`); none
/// may fail.
pub fn qemu_io_with(image_args: Vec<String>, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(image_args);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}"
    );
}

/// Opens a LUKS image with vdisk.
pub fn vdisk_open(path: &Path, pw: &str, read_only: bool) -> Arc<dyn BlockDev> {
    open_with_secret(
        path,
        OpenOptions {
            format: Some(Format::Luks),
            read_only,
            ..Default::default()
        },
        Some(&Passphrase::from(pw)),
    )
    .unwrap_or_else(|e| panic!("vdisk open {}: {e}", path.display()))
}

/// Creates a LUKS image with vdisk from `-o` style pairs plus the test passphrase.
pub fn vdisk_create(path: &Path, size: u64, pairs: &[(&str, &str)]) {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut o = LuksCreateOptions::from_pairs(Some(size), &pairs).unwrap();
    o.passphrase = Some(Passphrase::from(PW));
    vdisk_formats::create(path, &CreateOptions::Luks(o)).unwrap();
}

/// Cheap KDF settings for vdisk-made images.
pub fn cheap(version: LuksVersion) -> Vec<(&'static str, &'static str)> {
    match version {
        LuksVersion::V1 => vec![("pbkdf-force-iterations", "1000")],
        LuksVersion::V2 => vec![
            ("luks_version", "2"),
            ("pbkdf", "argon2id"),
            ("pbkdf-memory", "64"),
            ("pbkdf-parallel", "1"),
            ("pbkdf-force-iterations", "4"),
        ],
    }
}

/// Reads the whole device.
pub fn vdisk_read_all(dev: &dyn BlockDev) -> Vec<u8> {
    let mut buf = vec![0u8; dev.size() as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Runs cryptsetup with the passphrase on stdin (`--key-file -`).
pub fn cryptsetup_with_key(args: &[&str], key: &str) -> Output {
    let mut child = Command::new("cryptsetup")
        .env("LC_ALL", "C")
        .args(args)
        .args(["--key-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cryptsetup must be installed (apt-get install cryptsetup-bin)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `cryptsetup open --test-passphrase` succeeds with `key`.
pub fn cryptsetup_accepts(path: &Path, key: &str, extra: &[&str]) -> bool {
    let p = path.to_str().unwrap();
    let mut args = vec!["open", "--test-passphrase", p];
    args.extend_from_slice(extra);
    cryptsetup_with_key(&args, key).status.success()
}

/// `cryptsetup luksDump` output; panics when it fails.
pub fn luks_dump(path: &Path) -> String {
    let out = run_ok(Command::new("cryptsetup").arg("luksDump").arg(path));
    String::from_utf8(out.stdout).unwrap()
}

/// The volume key as `cryptsetup luksDump --dump-volume-key` prints it.
pub fn dump_volume_key(path: &Path, key: &str) -> Vec<u8> {
    let p = path.to_str().unwrap();
    let out = cryptsetup_with_key(&["luksDump", "--dump-volume-key", "-q", p], key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let start = text.find("MK dump:").expect("MK dump in luksDump output") + "MK dump:".len();
    let hex: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || c.is_whitespace())
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// A Python with the `cryptography` package, as the independent AES implementation.
pub fn python_with_cryptography() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import cryptography"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Decrypts `ciphertext` (whole `sector_size` sectors, the first with IV `iv512` counted in
/// 512-byte units) with Python's AES-XTS.
pub fn python_xts_decrypt(
    key: &[u8],
    ciphertext: &[u8],
    sector_size: usize,
    iv512: u64,
) -> Vec<u8> {
    let py = python_with_cryptography().expect(
        "python3 with the cryptography package is needed (apt-get install python3-cryptography)",
    );
    let script = r#"
import sys, struct
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key = bytes.fromhex(sys.argv[1]); ss = int(sys.argv[2]); iv = int(sys.argv[3])
data = sys.stdin.buffer.read(); out = bytearray()
for i in range(len(data) // ss):
    tweak = struct.pack('<Q', iv + i * (ss // 512)) + bytes(8)
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    out += d.update(data[i * ss:(i + 1) * ss]) + d.finalize()
sys.stdout.buffer.write(out)
"#;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut child = Command::new(py)
        .args([
            "-c",
            script,
            &hex,
            &sector_size.to_string(),
            &iv512.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = ciphertext.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&data).unwrap();
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// A copy of one default qemu-made LUKS1 image (1 MiB), created once per test binary: qemu-img
/// spends seconds benchmarking PBKDF2 on every create, whatever `iter-time` says.
pub fn qemu_default_image(dest: &Path) {
    static IMAGE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let src = IMAGE.get_or_init(|| {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("luks-qemu-default-{}.luks", std::process::id()));
        qemu_create(&p, 1 << 20, "");
        p
    });
    std::fs::copy(src, dest).unwrap();
}

/// Rewrites the JSON of both LUKS2 header copies (valid checksums) after `edit`.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut file = std::fs::read(path).unwrap();
    let bin = parse_bin(&file[..4096], 0).unwrap();
    let end = 4096 + file[4096..].iter().position(|&c| c == 0).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&file[4096..end]).unwrap();
    edit(&mut v);
    let json = serde_json::to_string(&v).unwrap();
    for off in [0, bin.hdr_size] {
        let copy = build_copy(&bin, &json, off, &[7; 64]);
        file[off as usize..off as usize + copy.len()].copy_from_slice(&copy);
    }
    std::fs::write(path, file).unwrap();
}
