//! The passphrase prompt, driven through a real pseudo-terminal (python3's `pty` module): vdisk
//! asks for the passphrase of an encrypted image when no secret names it and stdin is a
//! terminal, the typed passphrase is never echoed, the image opens, and a wrong passphrase gives
//! one clear error. Run as `qemu-img` it does not ask, as qemu-img does not.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const PASSPHRASE: &str = "correct-horse-7";

/// Runs `argv` on a new pseudo-terminal; once the prompt shows, types `answer` and Enter. Returns
/// everything the terminal showed (stdout and stderr both go there) and the exit status.
const DRIVER: &str = r#"
import os, pty, select, sys
answer = os.environ["ANSWER"].encode()
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out = b""
def more():
    ready, _, _ = select.select([fd], [], [], 120)
    if not ready:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
while b"passphrase for" not in out:
    chunk = more()
    if not chunk:
        break
    out += chunk
if b"passphrase for" in out:
    os.write(fd, answer + b"\n")
while True:
    chunk = more()
    if not chunk:
        break
    out += chunk
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// `program args...` on a terminal, answering the prompt with `answer`.
fn on_terminal(program: &Path, args: &[&str], answer: &str, dir: &Path) -> Outcome {
    let out = Command::new("python3")
        .args(["-c", DRIVER])
        .arg(program)
        .args(args)
        .env("ANSWER", answer)
        .env("LC_ALL", "C")
        .current_dir(dir)
        .output()
        .expect("python3 runs");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// raw.img with data, l.luks and e.qcow2 holding the same, encrypted with PASSPHRASE.
fn fixture(dir: &Path) {
    let raw = dir.join("raw.img");
    qemu_img(["create", "-q", "-f", "raw", s(&raw), "4M"]).ok();
    qemu_io("raw", &raw, &["write -P 0x5c 0 1M", "write -P 0x17 3M 4k"]);
    let secret = format!("secret,id=s0,data={PASSPHRASE}");
    for (format, opts, out) in [
        ("luks", "key-secret=s0,iter-time=10", "l.luks"),
        (
            "qcow2",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "e.qcow2",
        ),
    ] {
        let out = dir.join(out);
        let args = ["convert", "--object", &secret, "-O", format, "-o", opts];
        qemu_img([&args[..], &[s(&raw), s(&out)]].concat()).ok();
    }
}

#[test]
fn the_passphrase_typed_on_a_terminal_opens_the_image_and_is_not_echoed() {
    let dir = temp_dir();
    fixture(dir.path());
    let vdisk = Path::new(env!("CARGO_BIN_EXE_vdisk"));
    let out = on_terminal(
        vdisk,
        &["convert", "-O", "raw", "l.luks", "out.raw"],
        PASSPHRASE,
        dir.path(),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("Enter passphrase for 'l.luks': "),
        "{out:#?}"
    );
    assert!(!out.stdout.contains(PASSPHRASE), "echoed: {out:#?}");
    let raw = std::fs::read(dir.path().join("raw.img")).unwrap();
    assert!(std::fs::read(dir.path().join("out.raw")).unwrap() == raw);

    // qcow2 with encrypt.format=luks: `map` shows what qemu-img shows with the secret.
    let out = on_terminal(
        vdisk,
        &["map", "--output=json", "e.qcow2"],
        PASSPHRASE,
        dir.path(),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(!out.stdout.contains(PASSPHRASE), "echoed: {out:#?}");
    let secret = format!("secret,id=s0,data={PASSPHRASE}");
    let opts = "driver=qcow2,encrypt.key-secret=s0,file.filename=e.qcow2";
    let theirs = Command::new("qemu-img")
        .args([
            "map",
            "--output=json",
            "--object",
            &secret,
            "--image-opts",
            opts,
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let theirs = String::from_utf8_lossy(&theirs.stdout).replace('\n', "\r\n");
    assert!(
        out.stdout.ends_with(&theirs),
        "{out:#?}\nqemu-img:\n{theirs}"
    );
}

#[test]
fn a_wrong_passphrase_gives_one_clear_error() {
    let dir = temp_dir();
    fixture(dir.path());
    let vdisk = Path::new(env!("CARGO_BIN_EXE_vdisk"));
    let wrong = "wrong-horse-9";
    for image in ["l.luks", "e.qcow2"] {
        let out = on_terminal(vdisk, &["check", image], wrong, dir.path());
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert!(!out.stdout.contains(wrong), "echoed: {out:#?}");
        let errors: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("vdisk: "))
            .collect();
        assert_eq!(
            errors,
            [format!(
                "vdisk: Could not open '{image}': Invalid password, cannot unlock any keyslot"
            )],
            "{out:#?}"
        );
    }
}

#[test]
fn as_qemu_img_it_does_not_ask() {
    let dir = temp_dir();
    fixture(dir.path());
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vdisk"), &link).unwrap();
    let out = on_terminal(&link, &["map", "l.luks"], PASSPHRASE, dir.path());
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(!out.stdout.contains("passphrase for"), "{out:#?}");
    assert_eq!(
        out.stdout,
        "qemu-img: Could not open 'l.luks': Parameter 'key-secret' is required for cipher\r\n"
    );
}
