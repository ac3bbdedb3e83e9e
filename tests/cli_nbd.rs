//! `vdisk serve` and the binary run as `qemu-nbd`, against real NBD peers: nbdinfo, nbdcopy,
//! qemu-img and qemu-io as clients, qemu-nbd as the reference server and lister, and certtool
//! for TLS certificates. Each test skips (saying why) when a tool is missing.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

fn have_all(tools: &[&str]) -> bool {
    tools.iter().all(|t| have(t))
}

/// A server process, ended with SIGTERM (and waited for) when dropped.
struct Server {
    child: Child,
}

impl Server {
    /// Starts `program args` and waits until `ready` holds (or the process dies).
    fn start(program: &str, args: &[&str], ready: impl Fn() -> bool) -> Server {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Server::spawn(cmd, ready)
    }

    fn spawn(mut cmd: Command, ready: impl Fn() -> bool) -> Server {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut server = Server { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready() {
            if let Some(status) = server.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                let _ = server.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("{cmd:?} exited ({status}) before it was ready:\n{err}");
            }
            assert!(Instant::now() < deadline, "{cmd:?} never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `vdisk serve ARGS` on Unix socket `sock` (part of `args`).
    fn vdisk_unix(sock: &Path, args: &[&str]) -> Server {
        let s = sock.to_path_buf();
        Server::start(VDISK, &[&["serve"], args].concat(), move || s.exists())
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    /// Waits for the process to end by itself.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unix_uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// A 16 MiB qcow2 image with data in a few places and a hole elsewhere.
fn sample_qcow2(dir: &Path) -> PathBuf {
    let img = dir.join("sample.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "16M"]).ok();
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 5M 64k",
            "write -z 8M 1M",
            "write -P 0x33 15M 1M",
        ],
    );
    img
}

/// An empty raw image `dir/name` of `size` (qemu-img's size syntax).
fn raw_image(dir: &Path, name: &str, size: &str) -> PathBuf {
    let img = dir.join(name);
    qemu_img(["create", "-q", "-f", "raw", img.to_str().unwrap(), size]).ok();
    img
}

fn raw_copy_of(img: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join("reference.raw");
    qemu_img([
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .ok();
    raw
}

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run(Command::new("nbdinfo").args(["--json", uri])).ok();
    json(&out)
}

#[test]
fn unix_socket_export_reads_like_the_image_for_nbdinfo_nbdcopy_and_qemu_img() {
    if !have_all(&["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = temp_dir();
    let img = sample_qcow2(dir.path());
    let sock = dir.path().join("s.sock");
    let mut server = Server::vdisk_unix(
        &sock,
        &["-k", sock.to_str().unwrap(), "-t", img.to_str().unwrap()],
    );
    let uri = unix_uri(&sock, "");

    let info = nbdinfo_json(&uri);
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 16 << 20);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_multi_conn"], false, "qemu-nbd's default -e 1");
    assert_eq!(export["contexts"], serde_json::json!(["base:allocation"]));

    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy)).ok();
    let reference = raw_copy_of(&img, dir.path());
    run(Command::new("cmp").arg(&copy).arg(&reference)).ok();
    qemu_img(["compare", "-f", "qcow2", img.to_str().unwrap(), &uri]).ok();

    // SIGTERM ends the server cleanly: exit 0 and no socket left behind.
    assert!(server.terminate().success());
    assert!(!sock.exists());
}

#[test]
fn tcp_export_with_name_description_and_allocation_depth() {
    if !have_all(&["nbdinfo", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = temp_dir();
    let img = sample_qcow2(dir.path());
    let port = free_port();
    let port_s = port.to_string();
    let _server = Server::start(
        VDISK,
        &[
            "serve",
            "-p",
            &port_s,
            "-b",
            "127.0.0.1",
            "-x",
            "disk",
            "-D",
            "a sample disk",
            "-A",
            "-e",
            "4",
            "-t",
            img.to_str().unwrap(),
        ],
        || TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let info = nbdinfo_json(&format!("nbd://127.0.0.1:{port}/disk"));
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "disk");
    assert_eq!(export["description"], "a sample disk");
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(
        export["contexts"],
        serde_json::json!(["base:allocation", "qemu:allocation-depth"])
    );
    // The allocation map seen through NBD is qemu-img's own map of the image.
    let ours = qemu_img([
        "map",
        "--output=json",
        &format!("nbd://127.0.0.1:{port}/disk"),
    ])
    .ok();
    let theirs = qemu_img(["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]).ok();
    // Runs of the same kind are merged: NBD does not tell a zero cluster from a hole's
    // neighbour the way the local qcow2 map does.
    let strip = |v: serde_json::Value| -> Vec<(u64, u64, bool, bool)> {
        let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
        for e in v.as_array().unwrap() {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            let kind = (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
            match runs.last_mut() {
                Some(last) if (last.2, last.3) == kind => last.1 += len,
                _ => runs.push((start, len, kind.0, kind.1)),
            }
        }
        runs
    };
    assert_eq!(strip(json(&ours)), strip(json(&theirs)));
}

/// Whether a persistent (`-t`) server accepts connections on `sock`: the socket file appears
/// at bind(), before the server listens, so its existence alone is not enough.
fn listening(sock: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(sock).is_ok()
}

/// A link named `qemu-nbd` to the vdisk binary.
fn vdisk_as_qemu_nbd(dir: &Path) -> PathBuf {
    let link = dir.join("qemu-nbd");
    std::os::unix::fs::symlink(VDISK, &link).unwrap();
    link
}

#[test]
fn qemu_nbd_list_output_matches_between_the_two_servers_and_the_two_listers() {
    if !have_all(&["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = temp_dir();
    let img = raw_image(dir.path(), "disk.raw", "8M");
    let ours = dir.path().join("ours.sock");
    let theirs = dir.path().join("theirs.sock");
    let common = [
        "-t",
        "-f",
        "raw",
        "-x",
        "exp",
        "-D",
        "described",
        "-A",
        "-e",
        "2",
        "-r",
    ];
    let _a = Server::vdisk_unix(
        &ours,
        &[
            &["-k", ours.to_str().unwrap()],
            &common[..],
            &[img.to_str().unwrap()],
        ]
        .concat(),
    );
    let t = theirs.clone();
    let _b = Server::start(
        "qemu-nbd",
        &[
            &["-k", theirs.to_str().unwrap()],
            &common[..],
            &[img.to_str().unwrap()],
        ]
        .concat(),
        move || listening(&t),
    );
    let list = |program: &Path, sock: &Path| {
        run(Command::new(program).args(["-L", "-k", sock.to_str().unwrap()]))
            .ok()
            .stdout
    };
    let qemu = Path::new("qemu-nbd");
    let reference = list(qemu, &theirs);
    assert!(
        reference.contains(" export: 'exp'\n  description: described\n"),
        "{reference}"
    );
    // qemu-nbd lists both servers alike.
    assert_lines_eq(
        &list(qemu, &ours),
        &reference,
        "qemu-nbd -L: vdisk serve vs qemu-nbd",
    );
    // vdisk run as qemu-nbd lists a real qemu-nbd server exactly as qemu-nbd does.
    let fake = vdisk_as_qemu_nbd(dir.path());
    assert_lines_eq(&list(&fake, &theirs), &reference, "-L of qemu-nbd's server");
    assert_lines_eq(
        &list(&fake, &ours),
        &list(qemu, &ours),
        "-L of vdisk's server",
    );

    // Option mistakes get qemu-nbd's messages.
    for args in [
        &["-L", "-x", "exp"][..],
        &["-L", "some.img"],
        &["-L", "--fork"],
    ] {
        let a = run(Command::new(&fake).args(args));
        let b = run(Command::new(qemu).args(args));
        assert_eq!(a.code, b.code, "{args:?}");
        assert_eq!(a.stderr, b.stderr, "{args:?}");
    }
    let refused =
        run(Command::new(&fake).args(["-L", "-k", dir.path().join("none.sock").to_str().unwrap()]));
    assert_eq!(refused.code, Some(1));
    assert!(
        refused
            .stderr
            .starts_with("qemu-nbd: Failed to connect to '"),
        "{}",
        refused.stderr
    );
}

#[test]
fn read_only_export_refuses_writes() {
    if !have_all(&["nbdinfo", "nbdcopy", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = temp_dir();
    let img = sample_qcow2(dir.path());
    let before = std::fs::read(&img).unwrap();
    let sock = dir.path().join("ro.sock");
    let _server = Server::vdisk_unix(
        &sock,
        &[
            "-r",
            "-k",
            sock.to_str().unwrap(),
            "-t",
            img.to_str().unwrap(),
        ],
    );
    let uri = unix_uri(&sock, "");
    assert_eq!(nbdinfo_json(&uri)["exports"][0]["is_read_only"], true);
    let src = dir.path().join("junk.raw");
    std::fs::write(&src, vec![0x5a; 16 << 20]).unwrap();
    let copy = run(Command::new("nbdcopy").arg(&src).arg(&uri));
    assert_ne!(copy.code, Some(0), "nbdcopy wrote to a read-only export");
    let io = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &uri]));
    assert!(
        io.stdout.contains("failed") || io.stderr.contains("read-only") || io.code != Some(0),
        "qemu-io wrote: {io:?}"
    );
    drop(_server);
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
}

#[test]
fn snapshot_mode_writes_to_a_temporary_overlay_and_leaves_the_image_untouched() {
    if !have_all(&["nbdcopy", "qemu-img", "qemu-io"]) {
        return;
    }
    let dir = temp_dir();
    let img = sample_qcow2(dir.path());
    let before = std::fs::read(&img).unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let sock = dir.path().join("sn.sock");
    let s = sock.clone();
    let mut cmd = Command::new(VDISK);
    cmd.args([
        "serve",
        "-s",
        "-k",
        sock.to_str().unwrap(),
        "-t",
        img.to_str().unwrap(),
    ])
    .env("TMPDIR", &tmp);
    let mut server = Server::spawn(cmd, move || s.exists());
    // The overlay file is already unlinked: nothing in TMPDIR even while serving.
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    let uri = unix_uri(&sock, "");
    let io = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 2M 1M",
        "-c",
        "read -P 0x77 2M 1M",
        "-c",
        "read -P 0x11 0 1M",
        &uri,
    ]))
    .ok();
    assert!(!io.stdout.contains("fail"), "{}", io.stdout);
    assert!(server.terminate().success());
    assert!(
        std::fs::read(&img).unwrap() == before,
        "-s changed the image"
    );
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    assert_qemu_check_clean(&img);
}

#[test]
fn fork_returns_once_serving_and_the_pid_file_names_the_server() {
    if !have_all(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let dir = temp_dir();
    let img = raw_image(dir.path(), "f.raw", "4M");
    let sock = dir.path().join("f.sock");
    let pid_file = dir.path().join("server.pid");
    let status = Command::new(VDISK)
        .args([
            "serve",
            "--fork",
            "-t",
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            "--pid-file",
        ])
        .arg(&pid_file)
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // Serving already: no waiting needed.
    assert!(sock.exists());
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        nbdinfo_json(&unix_uri(&sock, ""))["exports"][0]["export-size"],
        4 << 20
    );
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_file.exists() || sock.exists() {
        assert!(Instant::now() < deadline, "the server did not clean up");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Start-up errors still reach the caller, with a failing status.
    let out = run(Command::new(VDISK)
        .args(["serve", "--fork", "-k", sock.to_str().unwrap()])
        .arg(dir.path().join("missing.qcow2")));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("Could not open"), "{}", out.stderr);
    assert!(!sock.exists());
}

#[test]
fn without_persistent_the_server_exits_after_its_client() {
    if !have_all(&["nbdinfo", "qemu-img"]) {
        return;
    }
    let dir = temp_dir();
    let img = raw_image(dir.path(), "p.raw", "1M");
    let sock = dir.path().join("p.sock");
    let mut server = Server::vdisk_unix(
        &sock,
        &[
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    nbdinfo_json(&unix_uri(&sock, ""));
    let status = server
        .wait(Duration::from_secs(10))
        .expect("the server kept running");
    assert!(status.success());
    assert!(!sock.exists());
}

/// A CA, a server certificate for localhost and a client certificate, RSA keys (ring refuses
/// certtool's default ECDSA keys), laid out as qemu's x509 credentials directories.
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let server = dir.join("server");
    let client = dir.join("client");
    let ca_only = dir.join("ca-only");
    for d in [&server, &client, &ca_only] {
        std::fs::create_dir(d).unwrap();
    }
    let certtool = |args: &[&str]| {
        run(Command::new("certtool").args(args).current_dir(dir)).ok();
    };
    let template = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).unwrap();
    };
    certtool(&[
        "--generate-privkey",
        "--key-type=rsa",
        "--bits=2048",
        "--outfile",
        "ca-key.pem",
    ]);
    template(
        "ca.info",
        "cn = vdisk test CA\nca\ncert_signing_key\nexpiration_days = 2\n",
    );
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        "ca-key.pem",
        "--template",
        "ca.info",
        "--outfile",
        "ca-cert.pem",
    ]);
    for (who, usage) in [("server", "tls_www_server"), ("client", "tls_www_client")] {
        template(
            &format!("{who}.info"),
            &format!(
                "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n{usage}\n\
                 encryption_key\nsigning_key\nexpiration_days = 2\n"
            ),
        );
        certtool(&[
            "--generate-privkey",
            "--key-type=rsa",
            "--bits=2048",
            "--outfile",
            &format!("{who}/{who}-key.pem"),
        ]);
        certtool(&[
            "--generate-certificate",
            "--load-privkey",
            &format!("{who}/{who}-key.pem"),
            "--load-ca-certificate",
            "ca-cert.pem",
            "--load-ca-privkey",
            "ca-key.pem",
            "--template",
            &format!("{who}.info"),
            "--outfile",
            &format!("{who}/{who}-cert.pem"),
        ]);
    }
    for d in [&server, &client, &ca_only] {
        std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    }
    (server, client, ca_only)
}

#[test]
fn tls_export_with_certtool_certificates() {
    if !have_all(&["nbdinfo", "certtool", "qemu-img"]) {
        return;
    }
    let dir = temp_dir();
    let (server_dir, client_dir, ca_only) = make_certificates(dir.path());
    let img = raw_image(dir.path(), "t.raw", "2M");
    let info = |sock: &Path, certs: &Path| {
        run(Command::new("nbdinfo").arg("--json").arg(format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            sock.display(),
            certs.display()
        )))
    };

    // --tls-creds DIR: like qemu's x509 credentials with verify-peer=on.
    let sock = dir.path().join("tls.sock");
    let _s = Server::vdisk_unix(
        &sock,
        &[
            "--tls-creds",
            server_dir.to_str().unwrap(),
            "-t",
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let ok = info(&sock, &client_dir).ok();
    assert_eq!(json(&ok)["TLS"], true);
    assert_eq!(json(&ok)["exports"][0]["export-size"], 2 << 20);
    assert_ne!(
        info(&sock, &ca_only).code,
        Some(0),
        "a client without a certificate got in"
    );
    let plain = run(Command::new("nbdinfo").arg(unix_uri(&sock, "")));
    assert_ne!(plain.code, Some(0), "TLS was not required");

    // The --object form, without client certificates.
    let sock2 = dir.path().join("tls2.sock");
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
        server_dir.display()
    );
    let _s2 = Server::vdisk_unix(
        &sock2,
        &[
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            "-t",
            "-f",
            "raw",
            "-k",
            sock2.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(json(&info(&sock2, &ca_only).ok())["TLS"], true);

    // -L over TLS: vdisk run as qemu-nbd lists both servers as qemu-nbd does.
    if have("qemu-nbd") {
        let sock3 = dir.path().join("tls3.sock");
        let s3 = sock3.clone();
        let qemu_object = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
            server_dir.display()
        );
        let _q = Server::start(
            "qemu-nbd",
            &[
                "--object",
                &qemu_object,
                "--tls-creds",
                "tls0",
                "-t",
                "-f",
                "raw",
                "-k",
                sock3.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
            move || listening(&s3),
        );
        let fake = vdisk_as_qemu_nbd(dir.path());
        let client = format!(
            "tls-creds-x509,id=c0,dir={},endpoint=client",
            client_dir.display()
        );
        let list = |program: &Path, sock: &Path| {
            run(Command::new(program)
                .args([
                    "-L",
                    "--object",
                    &client,
                    "--tls-creds",
                    "c0",
                    "--tls-hostname",
                    "localhost",
                    "-k",
                ])
                .arg(sock))
            .ok()
            .stdout
        };
        let qemu = Path::new("qemu-nbd");
        for sock in [&sock3, &sock2] {
            assert_lines_eq(&list(&fake, sock), &list(qemu, sock), "-L over TLS");
        }
        // Without credentials both listers are told TLS is required.
        let plain = run(Command::new(&fake).arg("-L").arg("-k").arg(&sock3));
        assert_eq!(plain.code, Some(1));
        assert!(
            plain
                .stderr
                .starts_with("qemu-nbd: TLS negotiation required before option 3 (list)\n"),
            "{}",
            plain.stderr
        );
    }

    // Client credentials cannot serve.
    let bad = format!("tls-creds-x509,id=tls1,dir={}", client_dir.display());
    let out = vdisk([
        "serve",
        "--object",
        &bad,
        "--tls-creds",
        "tls1",
        "-k",
        "/nonexistent/x.sock",
        img.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("Expecting TLS credentials with a server endpoint"),
        "{}",
        out.stderr
    );
}

#[test]
fn kernel_attach_without_the_nbd_module_points_to_vdisk_mount() {
    if Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists() {
        eprintln!("skipped: the nbd module is loaded here");
        return;
    }
    let dir = temp_dir();
    let img = raw_image(dir.path(), "k.raw", "1M");
    let out = vdisk(["connect", "/dev/nbd0", img.to_str().unwrap()]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("nbd kernel module is not loaded"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("vdisk mount"), "{}", out.stderr);
    let fake = vdisk_as_qemu_nbd(dir.path());
    let out = run(Command::new(&fake).args(["-c", "/dev/nbd0", img.to_str().unwrap()]));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.starts_with("qemu-nbd: "), "{}", out.stderr);
    let out = vdisk(["disconnect", "/dev/nbd0"]);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("vdisk mount"), "{}", out.stderr);
}

/// Bytes qemu-img reports as data in the image.
fn data_bytes(img: &Path) -> u64 {
    let out = qemu_img(["map", "--output=json", img.to_str().unwrap()]).ok();
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn offset_discard_and_detect_zeroes_policies_reach_the_image_as_in_qemu_nbd() {
    if !have_all(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = temp_dir();
    let serve = |extra: &[&str], img: &Path, f: &dyn Fn(&str)| {
        let sock = dir.path().join("policy.sock");
        let mut args = vec!["-f", "qcow2", "-t", "-k", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(img.to_str().unwrap());
        let mut server = Server::vdisk_unix(&sock, &args);
        f(&unix_uri(&sock, ""));
        assert!(server.terminate().success());
    };
    let io = |uri: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = run(c.arg(uri)).ok();
        assert!(!out.stdout.contains("fail"), "{cmds:?}: {}", out.stdout);
    };

    // -o: the export starts 5 MiB into the image.
    let img = sample_qcow2(dir.path());
    serve(&["-o", "5242880"], &img, &|uri| {
        assert_eq!(nbdinfo_json(uri)["exports"][0]["export-size"], 11 << 20);
        io(uri, &["read -P 0x22 0 64k", "read -P 0x33 10M 1M"]);
    });

    // Trims are ignored by default (qemu-nbd's --discard=ignore) and release space with unmap.
    let before = data_bytes(&img);
    serve(&[], &img, &|uri| io(uri, &["discard 0 1M"]));
    assert_eq!(data_bytes(&img), before);
    serve(&["--discard=unmap"], &img, &|uri| {
        io(uri, &["discard 0 1M"])
    });
    assert_eq!(data_bytes(&img), before - (1 << 20));

    // --detect-zeroes=unmap turns a written zero buffer into a hole.
    serve(
        &["--discard=unmap", "--detect-zeroes=unmap"],
        &img,
        &|uri| io(uri, &["write -P 0 15M 1M", "read -P 0 15M 1M"]),
    );
    assert_eq!(data_bytes(&img), before - (2 << 20));
    assert_qemu_check_clean(&img);

    // Option mistakes get qemu-nbd's messages.
    for (args, message) in [
        (&["--cache=fast"][..], "Invalid cache mode `fast'"),
        (&["--detect-zeroes=unmap"], "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"),
        (&["-e", "-1"], "Invalid shared device number '-1'"),
        (&["-B", "bm0"], "Bitmap 'bm0' is not found"),
        (&["-l", "snap1"], "Failed to load snapshot"),
    ] {
        let mut full = vec!["serve", "-k", "/nonexistent/x.sock"];
        full.extend_from_slice(args);
        full.push(img.to_str().unwrap());
        let out = vdisk(&full);
        assert_eq!(out.code, Some(1), "{args:?}");
        assert!(out.stderr.contains(message), "{args:?}: {}", out.stderr);
    }
}

#[test]
fn handshake_limit_hangs_up_on_idle_clients() {
    let dir = temp_dir();
    let img = raw_image(dir.path(), "h.raw", "1M");
    let sock = dir.path().join("h.sock");
    let _server = Server::vdisk_unix(
        &sock,
        &[
            "--handshake-limit",
            "1",
            "-t",
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut client, &mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Say nothing more: the server hangs up after about a second.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut client, &mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn load_snapshot_exports_an_internal_snapshot_read_only() {
    if !have_all(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let dir = temp_dir();
    let img = sample_qcow2(dir.path());
    qemu_img(["snapshot", "-c", "before", img.to_str().unwrap()]).ok();
    qemu_io("qcow2", &img, &["write -P 0x99 0 1M"]);
    let image_bytes = std::fs::read(&img).unwrap();
    let files = || std::fs::read_dir(dir.path()).unwrap().count();
    let count = files();
    for spec in ["before", "snapshot.name=before", "snapshot.id=1"] {
        let sock = dir.path().join("l.sock");
        let mut server = Server::vdisk_unix(
            &sock,
            &[
                "-l",
                spec,
                "-t",
                "-k",
                sock.to_str().unwrap(),
                img.to_str().unwrap(),
            ],
        );
        let uri = unix_uri(&sock, "");
        assert_eq!(nbdinfo_json(&uri)["exports"][0]["is_read_only"], true);
        let io =
            run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0x11 0 1M", &uri]))
                .ok();
        assert!(!io.stdout.contains("fail"), "{spec}: {}", io.stdout);
        // The temporary copy is gone already.
        assert_eq!(files(), count + 1, "{spec}: only the socket is new");
        assert!(server.terminate().success());
    }
    assert!(
        std::fs::read(&img).unwrap() == image_bytes,
        "the image changed"
    );
    let out = vdisk([
        "serve",
        "-l",
        "nosuch",
        "-k",
        "/nonexistent/x.sock",
        img.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr
            .contains("Failed to load snapshot: Can't find snapshot"),
        "{}",
        out.stderr
    );
}

/// Command lines qemu-nbd refuses before serving: the link named qemu-nbd refuses them with the
/// same exit status and message.
#[test]
fn refused_command_lines_read_as_qemu_nbds() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = temp_dir();
    let img = raw_image(dir.path(), "r.img", "1M");
    let img = img.to_str().unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let opts = format!("driver=raw,file.filename={img}");
    let link = vdisk_as_qemu_nbd(dir.path());
    for args in [
        vec!["--image-opts", "-f", "raw", "-k", sock, &opts],
        vec!["-k", sock, "--cache=bogus", img],
        vec!["-k", sock, "-f", "nosuch", img],
        vec!["-k", sock, dir.path().join("missing.img").to_str().unwrap()],
    ] {
        let theirs = run(Command::new("qemu-nbd").args(&args));
        let ours = run(Command::new(&link).args(&args));
        assert_eq!(ours.code, theirs.code, "{args:?}: {ours:#?} {theirs:#?}");
        assert_eq!(ours.stderr.trim_end(), theirs.stderr.trim_end(), "{args:?}");
    }
}
