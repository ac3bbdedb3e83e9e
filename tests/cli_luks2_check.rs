//! `vdisk check` of a LUKS2 image made by cryptsetup: a damaged header copy is a corruption
//! (exit 2), `-r all` rewrites it from the good copy, and cryptsetup then unlocks the image from
//! that rewritten copy alone. LUKS1 keeps qemu-img's answer (no checks, exit 63).
//!
//! cryptsetup repairs a damaged copy itself whenever it opens an image it may write, so it is
//! run only once vdisk has repaired the image.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// The binary header of the primary copy is at 0, the secondary's at 16 KiB (cryptsetup's
/// default metadata size); both are covered by their checksums.
const PRIMARY: u64 = 0;
const SECONDARY: u64 = 16 << 10;

fn have_cryptsetup() -> bool {
    let found = Command::new("cryptsetup")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipped: cryptsetup is not installed");
    }
    found
}

/// Runs cryptsetup with `passphrase` on stdin; returns whether it succeeded.
fn cryptsetup(args: &[&str], passphrase: &str) -> bool {
    use std::io::Write;
    let mut child = Command::new("cryptsetup")
        .args(args)
        .arg("--key-file=-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(passphrase.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

/// Flips one byte of the padding of the binary header at `header`: the checksum no longer
/// matches.
fn damage(path: &Path, header: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0xff], header + 300).unwrap();
}

fn check(path: &Path, extra: &[&str]) -> Outcome {
    let opts = format!("driver=luks,key-secret=s0,file.filename={}", path.display());
    let mut args = vec!["check", "--object", "secret,id=s0,data=pw"];
    args.extend(extra);
    args.extend(["--image-opts", &opts]);
    vdisk(&args)
}

#[test]
fn a_damaged_luks2_header_copy_is_found_and_repaired() {
    if !have_cryptsetup() {
        return;
    }
    let dir = temp_dir();
    let img = dir.path().join("l2.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let s = img.to_str().unwrap();
    let format = [
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        s,
    ];
    assert!(cryptsetup(&format, "pw"), "cryptsetup luksFormat failed");
    let clean = check(&img, &[]);
    assert_eq!(clean.code, Some(0), "{clean:#?}");
    assert!(clean.stdout.contains("No errors were found"), "{clean:#?}");

    damage(&img, PRIMARY);
    let found = check(&img, &[]);
    assert_eq!(found.code, Some(2), "{found:#?}");
    assert!(
        found.stderr.contains("primary LUKS2 header is damaged"),
        "{found:#?}"
    );
    assert!(
        found.stdout.contains("1 errors were found on the image"),
        "{found:#?}"
    );
    let json = check(&img, &["--output=json"]);
    assert_eq!(json.code, Some(2));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&json.stdout).unwrap()["corruptions"],
        1
    );
    // Repairing leaks only leaves it.
    assert_eq!(check(&img, &["-r", "leaks"]).code, Some(2));

    let repaired = check(&img, &["-r", "all"]);
    assert_eq!(repaired.code, Some(0), "{repaired:#?}");
    assert!(repaired.stdout.contains("1 corruptions"), "{repaired:#?}");
    assert_eq!(check(&img, &[]).code, Some(0));

    // Only the copy vdisk rewrote is left intact: cryptsetup must unlock from it.
    damage(&img, SECONDARY);
    assert!(
        cryptsetup(&["open", "--test-passphrase", s], "pw"),
        "cryptsetup cannot unlock the image from the primary header vdisk rewrote"
    );
}

#[test]
fn luks1_has_no_checks_as_in_qemu_img() {
    let dir = temp_dir();
    let img = dir.path().join("l1.luks");
    let s = img.to_str().unwrap();
    let secret = ["--object", "secret,id=s0,data=pw"];
    let create = [
        &["create", "-q", "-f", "luks"][..],
        &secret,
        &["-o", "key-secret=s0,iter-time=10", s, "4M"],
    ];
    qemu_img(create.concat()).ok();
    let opts = format!("driver=luks,key-secret=s0,file.filename={s}");
    let args = [&["check"][..], &secret, &["--image-opts", &opts]].concat();
    let (ours, theirs) = both(&args);
    assert_eq!(ours.code, Some(63), "{ours:#?}");
    assert_eq!(ours.code, theirs.code);
}
