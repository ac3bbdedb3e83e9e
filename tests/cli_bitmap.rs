//! Persistent dirty bitmaps: the bits vdisk leaves are the bits qemu-img leaves. Dirty ranges are
//! read by an independent peer: `nbdinfo --map=qemu:dirty-bitmap:NAME` against `qemu-nbd -B
//! NAME`; the bitmap list by `qemu-img info`, and every image passes `qemu-img check`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_qemu_check_clean, qemu_img, qemu_io, temp_dir, vdisk, Outcome};

/// The dirty ranges of bitmap `name`, as nbdinfo lists them through qemu-nbd.
fn dirty_map(image: &Path, name: &str) -> String {
    let out = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name])
        .arg(image)
        .arg("]")
        .output()
        .expect("nbdinfo runs");
    assert!(out.status.success(), "nbdinfo on {name}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The `bitmaps` list `qemu-img info` shows.
fn bitmaps(image: &Path) -> serde_json::Value {
    let out = qemu_img(["info", "-U", "--output=json", image.to_str().unwrap()]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["format-specific"]["data"]["bitmaps"].clone()
}

fn ok(out: Outcome) {
    out.ok();
}

/// Runs `tool` (qemu-img or vdisk) with `args` in `dir`.
fn in_dir(tool: &str, dir: &Path, args: &[&str]) -> Outcome {
    let program = if tool == "vdisk" {
        env!("CARGO_BIN_EXE_vdisk")
    } else {
        tool
    };
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("runs");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn commit_into_a_base_with_bitmaps_sets_the_bits_qemu_img_sets() {
    let mut maps = Vec::new();
    for tool in ["qemu-img", "vdisk"] {
        let dir = temp_dir();
        let d = dir.path();
        ok(in_dir(
            "qemu-img",
            d,
            &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
        ));
        ok(in_dir(
            "qemu-img",
            d,
            &["bitmap", "--add", "base.qcow2", "b0"],
        ));
        ok(in_dir(
            "qemu-img",
            d,
            &["bitmap", "--add", "-g", "512", "base.qcow2", "fine"],
        ));
        ok(in_dir(
            "qemu-img",
            d,
            &["bitmap", "--add", "--disable", "base.qcow2", "off"],
        ));
        let top = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ];
        ok(in_dir("qemu-img", d, &top));
        qemu_io(
            "qcow2",
            &d.join("top.qcow2"),
            &[
                "write -P 9 1M 128k",
                "write -z 3M 64k",
                "write 5000 1000",
                "discard 6M 64k",
            ],
        );
        ok(in_dir(tool, d, &["commit", "-q", "top.qcow2"]));
        let base = d.join("base.qcow2");
        assert_qemu_check_clean(&base);
        let found: Vec<String> = ["b0", "fine", "off"]
            .iter()
            .map(|b| dirty_map(&base, b))
            .collect();
        maps.push((found, bitmaps(&base)));
    }
    assert_eq!(maps[0], maps[1], "qemu-img, then vdisk");
    assert!(maps[0].0[0].contains("dirty"), "{:?}", maps[0]);
}

#[test]
fn bitmap_actions_leave_the_bits_qemu_img_leaves() {
    let actions: &[&[&str]] = &[
        &["bitmap", "--add", "-g", "128k", "img.qcow2", "big"],
        &["bitmap", "--merge", "b0", "img.qcow2", "big"],
        &[
            "bitmap",
            "--add",
            "--disable",
            "--merge",
            "b0",
            "img.qcow2",
            "frozen",
        ],
        &[
            "bitmap",
            "--add",
            "-g",
            "1k",
            "--merge",
            "b0",
            "-b",
            "other.qcow2",
            "img.qcow2",
            "fine",
        ],
        &["bitmap", "--clear", "img.qcow2", "b0"],
        &["bitmap", "--disable", "img.qcow2", "big"],
        &["bitmap", "--enable", "img.qcow2", "frozen"],
        &["bitmap", "--remove", "img.qcow2", "gone"],
    ];
    let mut results = Vec::new();
    for tool in ["qemu-img", "vdisk"] {
        let dir = temp_dir();
        let d = dir.path();
        for name in ["img.qcow2", "other.qcow2"] {
            ok(in_dir(
                "qemu-img",
                d,
                &["create", "-q", "-f", "qcow2", name, "8M"],
            ));
            ok(in_dir("qemu-img", d, &["bitmap", "--add", name, "b0"]));
        }
        ok(in_dir(
            "qemu-img",
            d,
            &["bitmap", "--add", "img.qcow2", "gone"],
        ));
        qemu_io(
            "qcow2",
            &d.join("img.qcow2"),
            &["write 100k 50k", "write 1M 1k"],
        );
        qemu_io("qcow2", &d.join("other.qcow2"), &["write 7M 4k"]);
        let img = d.join("img.qcow2");
        for a in actions {
            let out = in_dir(tool, d, a);
            assert_eq!(out.code, Some(0), "{tool} {a:?}: {out:?}");
        }
        assert_qemu_check_clean(&img);
        let names = ["big", "frozen", "fine", "b0"];
        let found: Vec<String> = names.iter().map(|b| dirty_map(&img, b)).collect();
        results.push((found, bitmaps(&img)));
    }
    assert_eq!(results[0], results[1], "qemu-img, then vdisk");
    assert!(results[0].0[2].contains("dirty"), "{:?}", results[0]);
}

#[test]
fn bitmaps_made_by_vdisk_record_qemu_io_writes() {
    let dir = temp_dir();
    let img = dir.path().join("v.qcow2");
    let path = img.to_str().unwrap();
    ok(qemu_img(["create", "-q", "-f", "qcow2", path, "8M"]));
    ok(vdisk(["bitmap", "--add", path, "b0"]));
    qemu_io("qcow2", &img, &["write 2M 100k"]);
    assert_eq!(
        dirty_map(&img, "b0"),
        "         0     2097152    0  clean\n   2097152      131072    1  dirty\n   \
         2228224     6160384    0  clean\n"
    );
    let listed = vdisk(["info", "--output=json", path]).ok();
    let ours: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(ours["format-specific"]["data"]["bitmaps"], bitmaps(&img));
}

/// Ends the test's server when the test ends.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vdisk serve` of `img` (read-write) on the Unix socket `sock`, once it listens.
fn serve(img: &Path, sock: &Path) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["serve", "-f", "qcow2", "-k"])
        .arg(sock)
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .expect("vdisk serve starts");
    let server = Server(child);
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

#[test]
fn an_image_served_read_write_marks_its_enabled_bitmaps_in_use_until_closed() {
    let dir = temp_dir();
    let img = dir.path().join("s.qcow2");
    let sock = dir.path().join("s.sock");
    let path = img.to_str().unwrap();
    ok(qemu_img(["create", "-q", "-f", "qcow2", path, "8M"]));
    ok(qemu_img(["bitmap", "--add", path, "b0"]));
    let mut server = serve(&img, &sock);
    assert_eq!(
        bitmaps(&img),
        serde_json::json!([{"flags": ["in-use", "auto"], "name": "b0", "granularity": 65536}])
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write 3M 4k",
            "-c",
            "write -z 5M 64k",
            &uri,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The server ends with its last client.
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_qemu_check_clean(&img);
    assert_eq!(
        bitmaps(&img),
        serde_json::json!([{"flags": ["auto"], "name": "b0", "granularity": 65536}])
    );
    assert_eq!(
        dirty_map(&img, "b0"),
        "         0     3145728    0  clean\n   3145728       65536    1  dirty\n   \
         3211264     2031616    0  clean\n   5242880       65536    1  dirty\n   \
         5308416     3080192    0  clean\n"
    );
}

#[test]
fn convert_copies_bitmaps_and_skips_inconsistent_ones_as_qemu_img_does() {
    let dir = temp_dir();
    let d = dir.path();
    let src = d.join("src.qcow2");
    let sock = d.join("s.sock");
    ok(in_dir(
        "qemu-img",
        d,
        &["create", "-q", "-f", "qcow2", "src.qcow2", "8M"],
    ));
    ok(in_dir(
        "qemu-img",
        d,
        &["bitmap", "--add", "src.qcow2", "crashed"],
    ));
    // A writer that dies leaves its enabled bitmaps in use: inconsistent.
    let mut server = serve(&src, &sock);
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    ok(in_dir(
        "qemu-img",
        d,
        &["bitmap", "--add", "src.qcow2", "b0"],
    ));
    let off = [
        "bitmap",
        "--add",
        "-g",
        "128k",
        "--disable",
        "src.qcow2",
        "off",
    ];
    ok(in_dir("qemu-img", d, &off));
    qemu_io("qcow2", &src, &["write 100k 50k", "write -z 6M 1M"]);

    let refused = [
        "convert",
        "--bitmaps",
        "-O",
        "qcow2",
        "src.qcow2",
        "out.qcow2",
    ];
    let theirs = in_dir("qemu-img", d, &refused);
    let ours = in_dir("vdisk", d, &refused);
    assert_eq!(theirs.code, Some(1), "{theirs:?}");
    assert_eq!(ours.code, theirs.code);
    assert_eq!(ours.stderr_normalised(), theirs.stderr_normalised());
    assert!(!d.join("out.qcow2").exists());

    let mut results = Vec::new();
    for (tool, out) in [("qemu-img", "q.qcow2"), ("vdisk", "v.qcow2")] {
        let args = [
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "src.qcow2",
            out,
        ];
        let done = in_dir(tool, d, &args);
        assert_eq!(done.code, Some(0), "{tool}: {done:?}");
        assert!(done
            .stderr
            .contains("Skipping inconsistent bitmap 'crashed'"));
        let img = d.join(out);
        assert_qemu_check_clean(&img);
        let maps: Vec<String> = ["b0", "off"].iter().map(|b| dirty_map(&img, b)).collect();
        results.push((maps, bitmaps(&img)));
    }
    assert_eq!(results[0], results[1], "qemu-img, then vdisk");
    assert!(results[0].0[0].contains("dirty"), "{:?}", results[0]);
}
