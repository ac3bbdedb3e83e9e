//! `--backing-policy` / `VDISK_BACKING_POLICY`: an untrusted qcow2 image whose backing file (or
//! external data file) names a host file holding a secret. Under `follow` (qemu-img's behaviour)
//! the secret shows through, as it does with qemu-img itself; under `require-format` an image that
//! does not record the backing format is refused, and under `refuse` every image that names
//! another file is, by every command that reads images or opens their chain, without the secret
//! reaching any output. `info` opens no backing or data file; `create -b` opens the backing file
//! the user names, and the chain below it under the policy.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SECRET: &[u8] = b"TOP-SECRET host file contents 0123456789";

/// A 64 KiB host file that starts with [`SECRET`].
fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("secret.txt");
    let mut bytes = SECRET.to_vec();
    bytes.resize(64 << 10, b'.');
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A qcow2 image made by qemu-img whose backing file is `backing` (absolute name). With
/// `record_format` false, the backing format extension is renamed into an unknown extension so
/// the image no longer records the format (as images written by old tools do).
fn hostile_image(dir: &Path, name: &str, backing: &Path, record_format: bool) -> PathBuf {
    let path = dir.join(name);
    qemu_img([
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        "-F".as_ref(),
        "raw".as_ref(),
        path.as_os_str(),
        "64K".as_ref(),
    ])
    .ok();
    if !record_format {
        let mut bytes = std::fs::read(&path).unwrap();
        let ext = 0xe279_2acau32.to_be_bytes();
        let at = bytes[..4096]
            .windows(4)
            .position(|w| w == ext)
            .expect("qemu-img wrote a backing format extension");
        bytes[at..at + 4].copy_from_slice(&0x7e57_0001u32.to_be_bytes());
        std::fs::write(&path, bytes).unwrap();
        let info = qemu_img(["info".as_ref(), path.as_os_str()]).ok();
        assert!(
            !info.stdout.contains("backing file format"),
            "{}",
            info.stdout
        );
    }
    path
}

/// Runs `program` (the vdisk binary, or a link to it) with the policy in the environment.
fn run_with_env(program: &Path, env: Option<&str>, args: &[&str]) -> Outcome {
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C");
    match env {
        Some(value) => cmd.env("VDISK_BACKING_POLICY", value),
        None => cmd.env_remove("VDISK_BACKING_POLICY"),
    };
    let out = cmd.output().unwrap();
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn vdisk_env(env: Option<&str>, args: &[&str]) -> Outcome {
    run_with_env(Path::new(env!("CARGO_BIN_EXE_vdisk")), env, args)
}

/// `vdisk convert -O raw IMAGE OUT` with the policy in the environment.
fn convert_to_raw(env: Option<&str>, image: &Path, out: &Path) -> Outcome {
    convert_to_raw_by(Path::new(env!("CARGO_BIN_EXE_vdisk")), env, image, out)
}

/// [`convert_to_raw`] run by `program` (the vdisk binary, or a link to it).
fn convert_to_raw_by(program: &Path, env: Option<&str>, image: &Path, out: &Path) -> Outcome {
    let args = [
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    run_with_env(program, env, &args)
}

fn contains_secret(bytes: &[u8]) -> bool {
    bytes.windows(SECRET.len()).any(|w| w == SECRET)
}

/// The commands that read an image's data or open its chain (resize opens it as qemu-img does),
/// for `image` and a fresh output file in `dir`.
fn reading_commands(image: &str, out: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        v(&["convert", "-O", "raw", image, out]),
        v(&[
            "dd",
            "-O",
            "raw",
            &format!("if={image}"),
            &format!("of={out}"),
            "bs=64k",
        ]),
        v(&["compare", image, image]),
        v(&["map", "--output=json", image]),
        v(&["info", "--backing-chain", image]),
        v(&["measure", "-O", "qcow2", image]),
        v(&["bench", "-c", "1", image]),
        v(&["resize", image, "+64K"]),
        v(&["bitmap", "--add", image, "b0"]),
        v(&["amend", "-o", "size=128K", image]),
    ]
}

/// Every reading command fails on `image` under `policy`, naming the image and `refused`, and
/// neither its output nor the output file holds the secret.
fn assert_refused_everywhere(dir: &Path, image: &Path, policy: &str, needle: &str) {
    let out_file = dir.join("out.raw");
    let image_s = image.to_str().unwrap();
    for args in reading_commands(image_s, out_file.to_str().unwrap()) {
        let _ = std::fs::remove_file(&out_file);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Once as an option, once from the environment.
        let mut with_option = vec!["--backing-policy", policy];
        with_option.extend(&args);
        for out in [
            vdisk_env(None, &with_option),
            vdisk_env(Some(policy), &args),
        ] {
            assert_ne!(out.code, Some(0), "{args:?} under {policy}: {out:#?}");
            assert!(
                out.stderr.contains(image_s) && out.stderr.contains(needle),
                "{args:?} under {policy}: the message names neither the image nor the refusal: {}",
                out.stderr
            );
            assert!(
                out.stderr.contains(&format!("(backing policy {policy})")),
                "{}",
                out.stderr
            );
            assert!(
                !contains_secret(out.stdout.as_bytes()),
                "{args:?}: {}",
                out.stdout
            );
            assert!(
                !contains_secret(out.stderr.as_bytes()),
                "{args:?}: {}",
                out.stderr
            );
            let written = std::fs::read(&out_file).unwrap_or_default();
            assert!(!contains_secret(&written), "{args:?} wrote the secret");
        }
    }
}

#[test]
fn follow_reads_the_backing_file_like_qemu_img() {
    let dir = temp_dir();
    let secret = secret_file(dir.path());
    let image = hostile_image(dir.path(), "hostile.qcow2", &secret, false);
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    let image_s = image.to_str().unwrap();
    convert_to_raw(None, &image, &ours).ok();
    qemu_img(["convert", "-O", "raw", image_s, theirs.to_str().unwrap()]).ok();
    let ours = std::fs::read(&ours).unwrap();
    assert!(contains_secret(&ours), "follow must read the backing file");
    assert_eq!(ours, std::fs::read(&theirs).unwrap());
    // The explicit option and the environment variable say the same.
    let out = dir.path().join("explicit.raw");
    let args = ["--backing-policy=follow", "convert", "-O", "raw", image_s];
    let mut args = args.to_vec();
    args.push(out.to_str().unwrap());
    vdisk_env(Some("refuse"), &args).ok();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        ours,
        "the option overrides the environment"
    );
}

#[test]
fn require_format_refuses_a_backing_file_of_unrecorded_format() {
    let dir = temp_dir();
    let secret = secret_file(dir.path());
    let image = hostile_image(dir.path(), "hostile.qcow2", &secret, false);
    let needle = format!("backing file '{}' refused", secret.display());
    assert_refused_everywhere(dir.path(), &image, "require-format", &needle);
    // With the format recorded, require-format opens the backing file (as raw): it guards
    // against probing, not against reading the file the image names.
    let formatted = hostile_image(dir.path(), "formatted.qcow2", &secret, true);
    let out = dir.path().join("formatted.raw");
    convert_to_raw(Some("require-format"), &formatted, &out).ok();
    assert!(contains_secret(&std::fs::read(&out).unwrap()));
}

#[test]
fn refuse_refuses_any_backing_file() {
    let dir = temp_dir();
    let secret = secret_file(dir.path());
    let needle = format!("backing file '{}' refused", secret.display());
    for (name, recorded) in [("unrecorded.qcow2", false), ("recorded.qcow2", true)] {
        let image = hostile_image(dir.path(), name, &secret, recorded);
        assert_refused_everywhere(dir.path(), &image, "refuse", &needle);
        // Describing the image alone opens nothing else, and still works.
        let info = vdisk_env(Some("refuse"), &["info", image.to_str().unwrap()]).ok();
        assert!(info
            .stdout
            .contains(&format!("backing file: {}", secret.display())));
    }
}

/// A qcow2 image made by qemu-img whose external data file `data.raw` holds the secret.
fn image_with_data_file(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data.raw");
    let image = dir.join("data-file.qcow2");
    let opts = format!("data_file={},data_file_raw=on", data.display());
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        image.to_str().unwrap(),
        "64K",
    ])
    .ok();
    // The data file now holds the secret, as if the image named a host file.
    std::fs::copy(secret_file(dir), &data).unwrap();
    (image, data)
}

#[test]
fn refuse_refuses_an_external_data_file() {
    let dir = temp_dir();
    let (image, data) = image_with_data_file(dir.path());
    let out = dir.path().join("out.raw");
    convert_to_raw(Some("require-format"), &image, &out).ok();
    assert!(contains_secret(&std::fs::read(&out).unwrap()));
    std::fs::remove_file(&out).unwrap();
    let refused = convert_to_raw(Some("refuse"), &image, &out);
    assert_ne!(refused.code, Some(0));
    let needle = format!("external data file '{}' refused", data.display());
    assert!(refused.stderr.contains(&needle), "{}", refused.stderr);
    assert!(!out.exists() || !contains_secret(&std::fs::read(&out).unwrap()));
}

/// Commands that open each image of a chain without its backing file (map, measure, resize's
/// look at the current size, snapshot) open the external data file under the policy too, as do
/// bitmap and amend.
#[test]
fn images_opened_without_their_backing_file_obey_the_policy_for_the_data_file() {
    let dir = temp_dir();
    let (image, data) = image_with_data_file(dir.path());
    let image_s = image.to_str().unwrap();
    let needle = format!("external data file '{}' refused", data.display());
    for args in [
        vec!["map", "--output=json", image_s],
        vec!["measure", "-O", "qcow2", image_s],
        vec!["resize", image_s, "128K"],
        vec!["snapshot", "-l", image_s],
        vec!["snapshot", "-c", "s1", image_s],
        vec!["bitmap", "--add", image_s, "b0"],
        vec!["amend", "-o", "size=128K", image_s],
    ] {
        let out = vdisk_env(Some("refuse"), &args);
        assert_ne!(out.code, Some(0), "{args:?}: {out:#?}");
        assert!(out.stderr.contains(&needle), "{args:?}: {}", out.stderr);
        assert!(!contains_secret(out.stdout.as_bytes()), "{args:?}");
    }
    // Under follow map reads the data file's allocation, as qemu-img does.
    let ours = vdisk_env(None, &["map", "--output=json", image_s]).ok();
    let theirs = qemu_img(["map", "--output=json", image_s]).ok();
    assert_eq!(json(&ours), json(&theirs));
}

/// `info` opens no external data file under any policy, as qemu-img's `info` does not (QEMU
/// opens images for it with BDRV_O_NO_IO): it shows what an untrusted image names, even when the
/// data file is missing.
#[test]
fn info_opens_no_data_file() {
    let dir = temp_dir();
    let (image, data) = image_with_data_file(dir.path());
    let image_s = image.to_str().unwrap();
    for missing in [false, true] {
        if missing {
            std::fs::remove_file(&data).unwrap();
        }
        for policy in ["follow", "refuse"] {
            for chain in [&[][..], &["--backing-chain"][..]] {
                let mut args = vec!["--backing-policy", policy, "info", "--output=json"];
                args.extend(chain);
                args.push(image_s);
                let out = vdisk_env(None, &args);
                assert_eq!(
                    out.code,
                    Some(0),
                    "{args:?} (data file missing: {missing}): {out:#?}"
                );
                let theirs = qemu_img(["info", "--output=json", image_s]).ok();
                let size = |o: &Outcome| json(o)["virtual-size"].clone();
                let ours = if chain.is_empty() {
                    size(&out)
                } else {
                    json(&out)[0]["virtual-size"].clone()
                };
                assert_eq!(ours, size(&theirs), "{args:?}");
            }
        }
    }
}

/// `create -b BACKING`: the backing file the user names is the user's choice and is opened under
/// every policy (to take its size, as qemu-img does), but the files it names in turn obey the
/// policy; `-u` opens nothing.
#[test]
fn create_opens_the_named_backing_file_and_its_chain_under_the_policy() {
    let dir = temp_dir();
    let secret = secret_file(dir.path());
    let plain = dir.path().join("plain.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        plain.to_str().unwrap(),
        "64K",
    ])
    .ok();
    let unrecorded = hostile_image(dir.path(), "unrecorded.qcow2", &secret, false);
    let recorded = hostile_image(dir.path(), "recorded.qcow2", &secret, true);
    let create = |policy: &str, backing: &Path, name: &str, unsafe_open: bool| {
        let top = dir.path().join(name);
        let mut args = vec!["--backing-policy", policy, "create", "-f", "qcow2"];
        args.extend(["-b", backing.to_str().unwrap(), "-F", "qcow2"]);
        if unsafe_open {
            args.push("-u");
        }
        args.push(top.to_str().unwrap());
        if unsafe_open {
            args.push("64K");
        }
        (vdisk_env(None, &args), top)
    };
    let needle = format!("backing file '{}' refused", secret.display());
    for (policy, refused) in [
        ("refuse", vec![&unrecorded, &recorded]),
        ("require-format", vec![&unrecorded]),
    ] {
        let (out, top) = create(policy, &plain, &format!("plain-{policy}.qcow2"), false);
        out.ok();
        let info = qemu_img(["info", "--output=json", top.to_str().unwrap()]).ok();
        assert_eq!(json(&info)["backing-filename"], plain.to_str().unwrap());
        for backing in refused {
            let (out, top) = create(policy, backing, "refused.qcow2", false);
            assert_ne!(out.code, Some(0), "{policy}: {out:#?}");
            assert!(out.stderr.contains(&needle), "{policy}: {}", out.stderr);
            assert!(
                out.stderr.contains(&format!("(backing policy {policy})")),
                "{}",
                out.stderr
            );
            assert!(!top.exists(), "{policy}: the image was created");
            // -u does not open the backing file: the new image just names it.
            let (out, top) = create(policy, backing, "unsafe.qcow2", true);
            out.ok();
            assert!(top.exists());
            // Reading the new image then obeys the policy like any other.
            let raw = dir.path().join("unsafe.raw");
            let read = convert_to_raw(Some(policy), &top, &raw);
            assert_ne!(read.code, Some(0), "{policy}: {read:#?}");
            assert!(!raw.exists() || !contains_secret(&std::fs::read(&raw).unwrap()));
            std::fs::remove_file(&top).unwrap();
        }
    }
    // Under follow the chain below the named backing file is opened, as qemu-img opens it.
    let (out, top) = create("follow", &unrecorded, "follow.qcow2", false);
    out.ok();
    let raw = dir.path().join("follow.raw");
    convert_to_raw(None, &top, &raw).ok();
    assert!(contains_secret(&std::fs::read(&raw).unwrap()));
}

#[test]
fn the_environment_reaches_vdisk_run_as_qemu_img() {
    let dir = temp_dir();
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vdisk"), &link).unwrap();
    let secret = secret_file(dir.path());
    let image = hostile_image(dir.path(), "hostile.qcow2", &secret, true);
    let out = dir.path().join("out.raw");
    let refused = convert_to_raw_by(&link, Some("refuse"), &image, &out);
    assert_eq!(refused.code, Some(1), "{refused:#?}");
    assert!(
        refused.stderr.starts_with("qemu-img: "),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("refused"), "{}", refused.stderr);
    assert!(!out.exists());
    convert_to_raw_by(&link, None, &image, &out).ok();
    assert!(contains_secret(&std::fs::read(&out).unwrap()));
}

#[test]
fn unknown_policy_names_are_errors() {
    let out = vdisk_env(Some("probe"), &["info", "/nonexistent.qcow2"]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("VDISK_BACKING_POLICY: unknown backing policy 'probe'"),
        "{}",
        out.stderr
    );
    let out = vdisk_env(None, &["--backing-policy", "probe", "info", "x"]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("probe"), "{}", out.stderr);
}
