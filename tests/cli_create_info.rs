//! `vdisk create`, `vdisk info` and `vdisk bench` against qemu-img 10.0, the oracle: the same
//! arguments must print the same text (byte for byte, JSON included), exit the same way, and every
//! image vdisk creates must pass `qemu-img check`.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// `info` in both output layouts prints exactly what qemu-img prints.
fn assert_info_same(path: &Path) {
    assert_same(&["info", s(path)]);
    assert_same(&["info", "--output=json", s(path)]);
    // The same once more, through a JSON parser, so a failure shows which value differs.
    let (ours, theirs) = both(&["info", "--output", "json", s(path)]);
    assert_eq!(json(&ours), json(&theirs), "{}", path.display());
}

/// Creates `path` with qemu-img and then again with vdisk (same arguments, so the same
/// `Formatting` line is expected); the file left behind is vdisk's.
fn create_both(format: &str, opts: &str, path: &Path, size: &str) {
    let mut args = vec!["create", "-f", format];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size]);
    let theirs = qemu_img(&args).ok();
    let ours = vdisk(&args).ok();
    assert_lines_eq(&ours.stdout, &theirs.stdout, &format!("create {args:?}"));
    assert_eq!(ours.stderr, "", "create {args:?}");
}

/// Writes data the way a guest would (with qemu-io), leaving holes between the writes.
fn write_some_data(format: &str, path: &Path) {
    qemu_io(
        format,
        path,
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 5M 100k",
            "write -z 9M 64k",
            "write -P 0x11 12345k 3k",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// create + info on a matrix of qcow2 layouts

#[test]
fn qcow2_images_made_by_vdisk_check_clean_and_match_qemu_info() {
    let dir = temp_dir();
    for cluster_size in ["512", "4k", "64k", "2M"] {
        for refcount_bits in ["1", "8", "16", "64"] {
            let opts = format!("cluster_size={cluster_size},refcount_bits={refcount_bits}");
            let path = path_in(&dir, &format!("c{cluster_size}-r{refcount_bits}.qcow2"));
            create_both("qcow2", &opts, &path, "64M");
            assert_qemu_check_clean(&path);
            assert_info_same(&path);
            write_some_data("qcow2", &path);
            assert_qemu_check_clean(&path);
            assert_info_same(&path);
        }
    }
}

#[test]
fn qcow2_compat_levels_and_lazy_refcounts_match_qemu() {
    let dir = temp_dir();
    for (n, opts) in [
        "compat=0.10",
        "compat=v2",
        "compat=1.1",
        "compat=v3",
        "lazy_refcounts=on",
        "compat=1.1,lazy_refcounts=on,cluster_size=4k",
        "compat=0.10,cluster_size=2M",
        "compression_type=zstd",
    ]
    .into_iter()
    .enumerate()
    {
        let path = path_in(&dir, &format!("compat{n}.qcow2"));
        create_both("qcow2", opts, &path, "100M");
        assert_qemu_check_clean(&path);
        assert_info_same(&path);
        write_some_data("qcow2", &path);
        assert_info_same(&path);
    }
}

#[test]
fn preallocated_images_match_qemu() {
    let dir = temp_dir();
    for (format, opts) in [
        ("qcow2", "preallocation=off"),
        ("qcow2", "preallocation=metadata"),
        ("qcow2", "preallocation=falloc"),
        ("qcow2", "preallocation=full"),
        (
            "qcow2",
            "preallocation=metadata,compat=0.10,cluster_size=4k",
        ),
        ("raw", "preallocation=off"),
        ("raw", "preallocation=falloc"),
        ("raw", "preallocation=full"),
    ] {
        let path = path_in(&dir, &format!("prealloc.{format}"));
        create_both(format, opts, &path, "16M");
        if format == "qcow2" {
            assert_qemu_check_clean(&path);
        }
        assert_info_same(&path);
        write_some_data(format, &path);
        assert_info_same(&path);
    }
}

#[test]
fn qcow2_images_made_by_qemu_img_with_data_match_qemu_info() {
    let dir = temp_dir();
    for opts in [
        "cluster_size=512",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=64k,refcount_bits=8",
        "cluster_size=2M,refcount_bits=64",
        "compat=0.10",
        "lazy_refcounts=on",
        "preallocation=metadata",
        "preallocation=full",
    ] {
        let path = path_in(&dir, "by-qemu.qcow2");
        qemu_img(["create", "-q", "-f", "qcow2", "-o", opts, s(&path), "16M"]).ok();
        write_some_data("qcow2", &path);
        assert_info_same(&path);
    }
}

#[test]
fn raw_images_sparse_and_written_match_qemu() {
    let dir = temp_dir();
    let path = path_in(&dir, "disk.img");
    create_both("raw", "", &path, "16M");
    assert_info_same(&path);
    write_some_data("raw", &path);
    assert_info_same(&path);
    // Probing finds raw; naming the format changes nothing.
    assert_same(&["info", "-f", "raw", s(&path)]);

    let empty = path_in(&dir, "empty.img");
    create_both("raw", "", &empty, "0");
    assert_info_same(&empty);

    let by_qemu = path_in(&dir, "by-qemu.img");
    qemu_img(["create", "-q", "-f", "raw", s(&by_qemu), "1G"]).ok();
    assert_info_same(&by_qemu);
}

#[test]
fn dirty_and_corrupt_flags_match_qemu() {
    let dir = temp_dir();
    let dirty = path_in(&dir, "dirty.qcow2");
    vdisk([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&dirty),
        "64M",
    ])
    .ok();
    // A write with lazy refcounts then a crash leaves the dirty bit set.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 64k", "-c", "abort", s(&dirty)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io abort should not exit 0");
    let (ours, _) = both(&["info", s(&dirty)]);
    assert!(
        ours.stdout.contains("cleanly shut down: no"),
        "{}",
        ours.stdout
    );
    assert_info_same(&dirty);

    let corrupt = path_in(&dir, "corrupt.qcow2");
    vdisk(["create", "-q", "-f", "qcow2", s(&corrupt), "64M"]).ok();
    // Incompatible feature bit 1: corrupt (qcow2.rst, header bytes 72-79).
    let f = OpenOptions::new().write(true).open(&corrupt).unwrap();
    f.write_all_at(&2u64.to_be_bytes(), 72).unwrap();
    drop(f);
    let (ours, _) = both(&["info", s(&corrupt)]);
    assert!(ours.stdout.contains("    corrupt: true"), "{}", ours.stdout);
    assert_info_same(&corrupt);
}

#[test]
fn backing_files_and_chains_match_qemu() {
    let dir = temp_dir();
    let base = path_in(&dir, "base.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&base), "64M"]).ok();
    write_some_data("qcow2", &base);
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    // A relative name stored in the overlay: resolved against the overlay's directory.
    let sub_base = path_in(&dir, "sub/base.qcow2");
    std::fs::copy(&base, &sub_base).unwrap();
    let overlay = path_in(&dir, "sub/overlay.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ])
    .ok();
    qemu_io("qcow2", &overlay, &["write -P 7 2M 64k"]);
    let (ours, _) = both(&["info", s(&overlay)]);
    assert!(
        ours.stdout
            .contains("backing file: base.qcow2 (actual path: "),
        "{}",
        ours.stdout
    );
    assert_info_same(&overlay);
    assert_same(&["info", "--backing-chain", s(&overlay)]);
    assert_same(&["info", "--backing-chain", "--output=json", s(&overlay)]);

    // An absolute name and a raw base.
    let raw_base = path_in(&dir, "base.raw");
    qemu_img(["create", "-q", "-f", "raw", s(&raw_base), "32M"]).ok();
    let top = path_in(&dir, "top.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&raw_base),
        "-F",
        "raw",
        s(&top),
    ])
    .ok();
    qemu_io("qcow2", &top, &["write 0 64k"]);
    assert_info_same(&top);
    assert_same(&["info", "-b", s(&top)]);
    assert_same(&["info", "-b", "--output=json", s(&top)]);

    // info does not open the backing file; --backing-chain does and fails like qemu-img.
    let orphan = path_in(&dir, "orphan.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&orphan),
    ])
    .ok();
    qemu_io("qcow2", &orphan, &["write 0 64k"]);
    qemu_img([
        "rebase",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        s(&orphan),
    ])
    .ok();
    assert_info_same(&orphan);
    assert_same(&["info", "--backing-chain", s(&orphan)]);
}

#[test]
#[ignore = "needs a formats change: info::file_node (and raw's size) must round the file length \
            up to 512 bytes, as QEMU's bdrv_getlength does; fresh qemu-img images end mid-sector"]
fn fresh_qemu_img_images_report_their_length_in_whole_sectors() {
    let dir = temp_dir();
    let path = path_in(&dir, "fresh.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&path), "1G"]).ok();
    assert_ne!(std::fs::metadata(&path).unwrap().len() % 512, 0);
    assert_info_same(&path);
    let short = path_in(&dir, "short.raw");
    std::fs::write(&short, b"hello\n").unwrap();
    assert_info_same(&short);
}

// ---------------------------------------------------------------------------------------------
// create: the Formatting line, -o help, errors

#[test]
fn formatting_lines_match_qemu_for_every_supported_option() {
    let dir = temp_dir();
    let q = path_in(&dir, "f.qcow2");
    let r = path_in(&dir, "f.raw");
    for opts in [
        "",
        "cluster_size=4k",
        "cluster_size=65536",
        "compat=0.10",
        "compat=v2",
        "compat=1.1",
        "lazy_refcounts=on",
        "lazy_refcounts=yes",
        "lazy_refcounts",
        "nolazy_refcounts",
        "preallocation=metadata",
        "preallocation=full",
        "refcount_bits=8",
        "refcount_bits=0x10",
        "compat=0.10,preallocation=falloc",
        "cluster_size=2M,refcount_bits=64,lazy_refcounts=off,compat=v3",
        "cluster_size=4k,cluster_size=8k",
        "compression_type=zstd",
        "size=2G",
    ] {
        let size: &[&str] = if opts.starts_with("size=") {
            &[]
        } else {
            &["1G"]
        };
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(s(&q));
        args.extend(size);
        assert_same(&args);
    }
    assert_same(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "lazy_refcounts=on",
        s(&q),
        "1M",
    ]);
    assert_same(&["create", s(&r), "1G"]);
    assert_same(&["create", "-o", "size=3G", s(&r)]);
    for opts in [
        "preallocation=off",
        "preallocation=falloc",
        "preallocation=full",
    ] {
        assert_same(&["create", "-f", "raw", "-o", opts, s(&r), "1M"]);
    }
    for size in [
        "0", "1000", "1b", "1B", "1.0", "1m", "1g", "1.5k", " 1G", "1T",
    ] {
        let f = if size == "1T" { &q } else { &r };
        let fmt = if size == "1T" { "qcow2" } else { "raw" };
        assert_same(&["create", "-f", fmt, s(f), size]);
    }
    // -q prints nothing at all on success.
    let out = vdisk(["create", "-q", "-f", "qcow2", s(&q), "1G"]).ok();
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
}

#[test]
fn option_help_lists_what_qemu_lists() {
    for format in ["qcow2", "raw"] {
        for with_file in [true, false] {
            for help in ["help", "?", "cluster_size=4k,help"] {
                if format == "raw" && help.starts_with("cluster") {
                    continue;
                }
                let mut args = vec!["create", "-f", format, "-o", help];
                if with_file {
                    args.extend(["x.img", "1X"]);
                }
                let (ours, theirs) = both(&args);
                assert_eq!((ours.code, theirs.code), (Some(0), Some(0)), "{args:?}");
                assert_eq!(ours.stderr, "");
                assert_help_agrees(&ours.stdout, &theirs.stdout, &format!("{args:?}"));
            }
        }
    }
    // Every option vdisk accepts is one qemu-img lists for the format.
    let (ours, theirs) = both(&["create", "-f", "qcow2", "-o", "help", "x", "1G"]);
    let (ours, theirs) = (option_lines(&ours.stdout), option_lines(&theirs.stdout));
    assert!(ours.len() >= 9, "{ours:?}");
    for line in &ours {
        assert!(theirs.contains(line), "{line:?} is not in qemu-img's list");
    }
}

/// The `  name=<type>  - text` lines of `-o help`.
fn option_lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("  ")).collect()
}

fn option_name(line: &str) -> &str {
    line.trim_start().split('=').next().unwrap()
}

/// Same heading and trailer; for the options both list, the same line, in the same order.
fn assert_help_agrees(ours: &str, theirs: &str, what: &str) {
    let heading = |t: &str| t.lines().next().unwrap_or("").to_string();
    assert_eq!(heading(ours), heading(theirs), "{what}");
    let trailer = |t: &str| -> Vec<String> {
        t.lines()
            .skip(1)
            .filter(|l| !l.starts_with("  "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(trailer(ours), trailer(theirs), "{what}");
    let (o, t) = (option_lines(ours), option_lines(theirs));
    let names_t: Vec<_> = t.iter().map(|l| option_name(l)).collect();
    let shared_o: Vec<_> = o
        .iter()
        .filter(|l| names_t.contains(&option_name(l)))
        .collect();
    let names_o: Vec<_> = o.iter().map(|l| option_name(l)).collect();
    let shared_t: Vec<_> = t
        .iter()
        .filter(|l| names_o.contains(&option_name(l)))
        .collect();
    assert!(!shared_o.is_empty(), "{what}: no option in common");
    assert_eq!(shared_o, shared_t, "{what}");
}

#[test]
fn create_errors_match_qemu() {
    let dir = temp_dir();
    let q = path_in(&dir, "e.qcow2");
    let q = s(&q);
    let cases: Vec<Vec<&str>> = vec![
        vec!["create", "-f", "qcow2", q, "1X"],
        vec!["create", "-f", "qcow2", q, "abc"],
        vec!["create", "-f", "qcow2", q, "1kB"],
        vec!["create", "-f", "qcow2", q, "1.5"],
        vec!["create", "-f", "qcow2", q, "99999999999E"],
        vec!["create", "-f", "raw", q, "8E"],
        vec!["create", "-f", "foo", q, "1G"],
        vec!["create", "-f", "foo", q, "1X"],
        vec!["create", "-f", "foo", "-o", "help"],
        vec!["create", "-f", "qcow2", q],
        vec!["create", "-f", "raw", q],
        vec!["create", "-f", "qcow2", "-o", "foo=bar", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "foo", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "=5", q, "1G"],
        vec!["create", "-f", "raw", "-o", "cluster_size=4k", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "cluster_size=abc", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "cluster_size=-5", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "cluster_size=16E", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "cluster_size=3000", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "cluster_size=256", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "cluster_size=4M", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "refcount_bits=abc", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "refcount_bits=3", q, "1G"],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=99999999999999999999",
            q,
            "1G",
        ],
        vec![
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=maybe",
            q,
            "1G",
        ],
        vec!["create", "-f", "qcow2", "-o", "lazy_refcounts=ON", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "preallocation=bad", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "compat=1.1,", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", ",compat=1.1", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "", q, "1G"],
        vec!["create", "-f", "qcow2", "-o", "size=2G", q, "1G"],
        vec!["create", "-f", "raw", "-o", "size=1X", q],
        vec!["create", "-f", "raw", "-o", "size=-1", q],
        vec!["create", "-f", "qcow2", "/nonexistent/dir/x.qcow2", "1G"],
        vec!["create", "-f", "raw", "/nonexistent/dir/x.raw", "1G"],
        vec!["create"],
        vec!["create", "-f", "qcow2"],
        vec!["create", q, "1G", "extra"],
    ];
    for args in &cases {
        let (ours, _) = both(args);
        assert_eq!(ours.code, Some(1), "{args:?}: {ours:#?}");
        assert_same(args);
    }
}

#[test]
fn create_errors_worded_by_the_block_layer_still_fail_and_name_the_problem() {
    // qemu-img words these differently ("Parameter 'version' ...", "use version=v3"): the block
    // layer's wording is asserted to name the file and the offending value.
    let dir = temp_dir();
    let q = path_in(&dir, "e.qcow2");
    let r = path_in(&dir, "e.raw");
    for (args, needle) in [
        (vec!["-f", "qcow2", "-o", "compat=2", s(&q), "1G"], "'2'"),
        (
            vec![
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,refcount_bits=8",
                s(&q),
                "1G",
            ],
            "1.1",
        ),
        (
            vec![
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,lazy_refcounts=on",
                s(&q),
                "1G",
            ],
            "1.1",
        ),
        (
            vec!["-f", "raw", "-o", "preallocation=metadata", s(&r), "1G"],
            "metadata",
        ),
    ] {
        let mut argv = vec!["create"];
        argv.extend(&args);
        let (ours, theirs) = both(&argv);
        assert_eq!((ours.code, theirs.code), (Some(1), Some(1)), "{argv:?}");
        assert_eq!(ours.stdout, theirs.stdout, "{argv:?}");
        let file = args[args.len() - 2];
        assert!(
            ours.stderr.starts_with(&format!("vdisk: {file}: ")) && ours.stderr.contains(needle),
            "{argv:?}: {}",
            ours.stderr
        );
    }
}

#[test]
fn backing_files_luks_and_objects_behave_like_qemu() {
    let dir = temp_dir();
    let q = path_in(&dir, "x.qcow2");
    let base = path_in(&dir, "base.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&base), "64M"]).ok();
    for args in [
        [
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&q),
        ]
        .as_slice(),
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "qcow2",
            s(&q),
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "missing.qcow2",
            "-F",
            "qcow2",
            s(&q),
        ],
        &["create", "-f", "qcow2", "-b", s(&base), s(&q), "1G"],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nope",
            "-F",
            "raw",
            s(&q),
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            s(&q),
        ],
        &[
            "create",
            "--object",
            "secret,id=s0,data=x",
            "-f",
            "qcow2",
            s(&q),
            "1G",
        ],
        &["create", "-f", "luks", s(&q), "1G"],
        &["create", "-f", "luks", "-o", "key-secret=s0", s(&q), "1G"],
    ] {
        assert_same(args);
    }
}

// ---------------------------------------------------------------------------------------------
// info of encrypted images: described from the header, with no secret (qemu-img opens them with
// BDRV_O_NO_IO)

#[test]
fn encrypted_images_are_described_without_their_secret_as_qemu_does() {
    let dir = temp_dir();
    let luks = path_in(&dir, "a.luks");
    let essiv = path_in(&dir, "essiv.luks");
    let enc = path_in(&dir, "enc.qcow2");
    let secret = ["--object", "secret,id=s0,data=x"];
    // The default LUKS1 image of qemu-img (iter-time 2 s), and two more layouts quickly.
    let args = [
        &["create", "-q", "-f", "luks"],
        &secret[..],
        &["-o", "key-secret=s0"],
    ];
    qemu_img([&args.concat()[..], &[s(&luks), "16M"]].concat()).ok();
    let create = |fmt: &str, opts: &str, path: &Path| {
        let args = [
            &["create", "-q", "-f", fmt],
            &secret[..],
            &["-o", opts, s(path), "16M"],
        ];
        qemu_img(args.concat()).ok();
    };
    create(
        "luks",
        "key-secret=s0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
        &essiv,
    );
    create(
        "qcow2",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        &enc,
    );
    for path in [&luks, &essiv, &enc] {
        assert_info_same(path);
    }
    // A named secret is not looked up, let alone checked: an unknown id or a wrong passphrase
    // changes nothing but the image's name.
    for driver in [
        "driver=luks,key-secret=s0",
        "driver=qcow2,encrypt.key-secret=s0",
    ] {
        let file = if driver.contains("qcow2") {
            &enc
        } else {
            &luks
        };
        let opts = format!("{driver},file.filename={}", s(file));
        assert_same(&["info", "--image-opts", &opts]);
        assert_same(&[
            "info",
            "--output=json",
            "--object",
            "secret,id=s0,data=wrong",
            "--image-opts",
            &opts,
        ]);
    }
    // Commands that read data still need the secret, with qemu-img's message and exit code.
    for file in [&luks, &enc] {
        for cmd in [
            &["map"][..],
            &["check"],
            &["measure", "-O", "qcow2"],
            &["compare"],
        ] {
            let mut args = cmd.to_vec();
            args.push(s(file));
            if cmd[0] == "compare" {
                args.push(s(file));
            }
            let (ours, _) = both(&args);
            assert_ne!(ours.code, Some(0), "{args:?}");
            assert_same(&args);
        }
    }
}

#[test]
fn luks2_images_are_described_without_their_secret_as_cryptsetup_dumps_them() {
    let dir = temp_dir();
    let img = path_in(&dir, "c2.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let mut format = Command::new("cryptsetup");
    format.args(["luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2"]);
    format.args([
        "--pbkdf-force-iterations",
        "1000",
        "--sector-size",
        "4096",
        "--label",
        "lbl",
    ]);
    format.args(["-q", "--key-file=-", s(&img)]);
    let mut child = format.stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"pw").unwrap();
    assert!(child.wait().unwrap().success());
    let dump = Command::new("cryptsetup")
        .args(["luksDump", "--dump-json-metadata", s(&img)])
        .output()
        .unwrap();
    let theirs: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let uuid = Command::new("cryptsetup")
        .args(["luksUUID", s(&img)])
        .output()
        .unwrap();
    let ours = json(&vdisk(["info", "--output=json", s(&img)]).ok());
    let d = &ours["format-specific"]["data"];
    let seg = &theirs["segments"]["0"];
    let slot = &theirs["keyslots"]["0"];
    assert_eq!(ours["virtual-size"], 4 << 20);
    assert_eq!(d["uuid"], String::from_utf8_lossy(&uuid.stdout).trim());
    assert_eq!(
        d["payload-offset"].to_string(),
        seg["offset"].as_str().unwrap()
    );
    assert_eq!(
        format!(
            "{}-{}-plain64",
            d["cipher-alg"].as_str().unwrap().replace("-256", ""),
            d["cipher-mode"].as_str().unwrap()
        ),
        seg["encryption"]
    );
    assert_eq!(d["hash-alg"], theirs["digests"]["0"]["hash"]);
    assert_eq!(d["master-key-iters"], theirs["digests"]["0"]["iterations"]);
    let v2 = &d["luks2"];
    assert_eq!(v2["sector-size"], seg["sector_size"]);
    assert_eq!(v2["label"], "lbl");
    assert_eq!(
        v2["keyslots-size"].to_string(),
        theirs["config"]["keyslots_size"].as_str().unwrap()
    );
    let k = &v2["keyslots"][0];
    assert_eq!(k["kdf"], slot["kdf"]["type"]);
    assert_eq!(k["iterations"], slot["kdf"]["iterations"]);
    assert_eq!(k["key-size"], slot["key_size"]);
    assert_eq!(
        k["area-offset"].to_string(),
        slot["area"]["offset"].as_str().unwrap()
    );
    assert_eq!(k["area-encryption"], slot["area"]["encryption"]);
    // The human layout shows the same fields.
    let human = vdisk(["info", s(&img)]).ok().stdout;
    assert!(human.contains("encrypted: yes\n"), "{human}");
    assert!(human.contains("        sector size: 4096\n"), "{human}");
}

// ---------------------------------------------------------------------------------------------
// info errors

#[test]
fn info_errors_match_qemu() {
    let dir = temp_dir();
    let raw = path_in(&dir, "r.img");
    qemu_img(["create", "-q", "-f", "raw", s(&raw), "1M"]).ok();
    let missing = path_in(&dir, "missing.img");
    for args in [
        vec!["info", s(&missing)],
        vec!["info", "--output=json", s(&missing)],
        vec!["info", "-f", "foo", s(&raw)],
        vec!["info", "-f", "qcow2", s(&raw)],
        vec!["info", "--output=xml", s(&raw)],
        vec!["info"],
        vec!["info", s(&raw), s(&raw)],
    ] {
        let (ours, _) = both(&args);
        assert_eq!(ours.code, Some(1), "{args:?}");
        assert_same(&args);
    }
    let out = vdisk(["info", s(&missing)]);
    assert_eq!(
        out.stderr,
        format!(
            "vdisk: Could not open '{0}': Could not open '{0}': No such file or directory\n",
            s(&missing)
        )
    );
}

// ---------------------------------------------------------------------------------------------
// bench

/// The lines of bench output with the timing replaced by `T`, after checking its shape.
fn untimed(out: &str) -> String {
    out.lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(rest) => {
                let secs = rest.strip_suffix(" seconds.").expect(l);
                let (int, frac) = secs.split_once('.').expect(l);
                assert!(
                    int.chars().all(|c| c.is_ascii_digit()) && frac.len() == 3,
                    "{l}"
                );
                "Run completed in T seconds.".to_string()
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn bench_prints_what_qemu_prints() {
    let dir = temp_dir();
    let q = path_in(&dir, "b.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&q), "64M"]).ok();
    for extra in [
        vec!["-c", "1000"],
        vec!["-c", "100", "-d", "1"],
        vec!["-c", "0x10", "-s", "1.5k", "-S", "0"],
        vec!["-c", "100", "-s", "1", "-o", "1.5k"],
        vec![
            "-c",
            "200",
            "-w",
            "-d",
            "4",
            "-s",
            "4k",
            "-S",
            "8k",
            "-o",
            "1M",
            "--pattern=5",
        ],
        vec!["-c", "200", "-w", "-d", "2", "--flush-interval=10"],
        vec![
            "-c",
            "200",
            "-w",
            "-d",
            "2",
            "--flush-interval=10",
            "--no-drain",
        ],
        vec!["-c", "10", "-w", "--flush-interval=0"],
        vec!["-c", "10", "-t", "none"],
        vec!["-c", "10", "-t", "writethrough", "-i", "threads"],
        vec!["-c", "10", "-n", "-t", "none"],
        vec!["-c", "10", "-U", "-f", "qcow2"],
        vec!["-q", "-c", "10"],
    ] {
        let mut args = vec!["bench"];
        args.extend(&extra);
        args.push(s(&q));
        let (ours, theirs) = both(&args);
        assert_eq!(
            (ours.code, theirs.code),
            (Some(0), Some(0)),
            "{args:?}: {ours:#?}"
        );
        assert_eq!(untimed(&ours.stdout), untimed(&theirs.stdout), "{args:?}");
        assert_eq!(ours.stderr, "", "{args:?}");
    }
    assert_qemu_check_clean(&q);
}

#[test]
fn bench_writes_land_where_qemu_img_puts_them() {
    let dir = temp_dir();
    for format in ["qcow2", "raw"] {
        let ours = path_in(&dir, &format!("ours.{format}"));
        let theirs = path_in(&dir, &format!("theirs.{format}"));
        vdisk(["create", "-q", "-f", format, s(&ours), "4M"]).ok();
        qemu_img(["create", "-q", "-f", format, s(&theirs), "4M"]).ok();
        // 300 requests of 4k every 16k from 1M: they run off the end of the image and wrap.
        let args = |path: &Path| {
            vec![
                "bench".to_string(),
                "-q".into(),
                "-w".into(),
                "-c".into(),
                "300".into(),
                "-d".into(),
                "8".into(),
                "-s".into(),
                "4k".into(),
                "-S".into(),
                "16k".into(),
                "-o".into(),
                "1M".into(),
                "--pattern=0xab".into(),
                "--flush-interval=16".into(),
                "-f".into(),
                format.into(),
                s(path).into(),
            ]
        };
        vdisk(args(&ours)).ok();
        qemu_img(args(&theirs)).ok();
        if format == "qcow2" {
            assert_qemu_check_clean(&ours);
        }
        // Same bytes written at the same offsets as real qemu-img bench.
        qemu_img(["compare", "-q", s(&ours), s(&theirs)]).ok();
        qemu_io(
            format,
            &ours,
            &["read -P 0xab 1M 4k", "read -P 0 1028k 12k"],
        );
    }
}

#[test]
fn bench_takes_image_opts_as_qemu_img_does() {
    let dir = temp_dir();
    let raw = path_in(&dir, "r.img");
    let (ours, theirs) = (path_in(&dir, "ours.qcow2"), path_in(&dir, "theirs.qcow2"));
    qemu_img(["create", "-q", "-f", "raw", s(&raw), "4M"]).ok();
    for q in [&ours, &theirs] {
        qemu_img(["create", "-q", "-f", "qcow2", s(q), "4M"]).ok();
    }
    let opts = |p: &Path, extra: &str| format!("driver=qcow2,file.filename={}{extra}", s(p));
    // Writes through --image-opts land where qemu-img's do; reads print the same.
    let write = |p: &Path| {
        let o = opts(p, "");
        "bench -w -c 64 -d 4 -S 64k --pattern=7 --image-opts"
            .split(' ')
            .map(String::from)
            .chain([o])
            .collect::<Vec<_>>()
    };
    let (a, b) = (vdisk(write(&ours)), qemu_img(write(&theirs)));
    assert_eq!((a.code, b.code), (Some(0), Some(0)), "{a:#?}");
    assert_eq!(untimed(&a.stdout), untimed(&b.stdout));
    qemu_img(["compare", "-q", s(&ours), s(&theirs)]).ok();
    assert_qemu_check_clean(&ours);
    let no_driver = format!("file.filename={}", s(&raw));
    for spec in [opts(&ours, ""), no_driver] {
        let args = ["bench", "-c", "10", "--image-opts", &spec];
        let (a, b) = both(&args);
        assert_eq!((a.code, b.code), (Some(0), Some(0)), "{args:?}: {a:#?}");
        assert_eq!(untimed(&a.stdout), untimed(&b.stdout), "{args:?}");
    }
    let luks = format!("driver=luks,key-secret=s0,file.filename={}", s(&raw));
    let foo = opts(&ours, ",foo=bar");
    for args in [
        vec!["bench", "-c", "10", "-f", "qcow2", "--image-opts", &foo],
        vec!["bench", "-c", "10", "--image-opts", &foo],
        vec!["bench", "-c", "10", "--image-opts", s(&ours)],
        vec!["bench", "-c", "10", "--image-opts", &luks],
        vec![
            "bench",
            "-c",
            "10",
            "--image-opts",
            "driver=foo,file.filename=x",
        ],
    ] {
        assert_same(&args);
    }
}

#[test]
fn bench_errors_match_qemu() {
    let dir = temp_dir();
    let q = path_in(&dir, "b.qcow2");
    qemu_img(["create", "-q", "-f", "qcow2", s(&q), "64M"]).ok();
    let missing = path_in(&dir, "missing.qcow2");
    for extra in [
        vec!["-c", "0"],
        vec!["-c", "-1"],
        vec!["-c", "abc"],
        vec!["-c", "1k"],
        vec!["-c", "2147483648"],
        vec!["-d", "0"],
        vec!["-d", "1k"],
        vec!["-s", "0"],
        vec!["-s", "2G"],
        vec!["-S", "abc"],
        vec!["-S", "3G"],
        vec!["-o", "abc"],
        vec!["-o", "-1"],
        vec!["-w", "--pattern=256"],
        vec!["-w", "--pattern=abc"],
        vec!["--flush-interval=100"],
        vec!["-w", "--flush-interval=10"],
        vec!["-w", "--flush-interval=abc"],
        vec!["-w", "--flush-interval=-1"],
        vec!["-t", "bogus"],
        vec!["-i", "bogus"],
        vec!["-n"],
        vec!["-i", "native"],
        vec!["-f", "foo"],
    ] {
        let mut args = vec!["bench", "-c", "10"];
        args.extend(&extra);
        args.push(s(&q));
        let (ours, _) = both(&args);
        assert_eq!(ours.code, Some(1), "{args:?}");
        assert_same(&args);
    }
    assert_same(&["bench", s(&missing)]);
    assert_same(&["bench"]);
    // Requests past the end fail in both, after the Sending line.
    for extra in [["-s", "128M"], ["-o", "64M"]] {
        let mut args = vec!["bench", "-c", "10"];
        args.extend(extra);
        args.push(s(&q));
        let (ours, theirs) = both(&args);
        assert_eq!((ours.code, theirs.code), (Some(1), Some(1)), "{args:?}");
        assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
        assert!(
            ours.stderr.starts_with("vdisk: Failed request: "),
            "{}",
            ours.stderr
        );
    }
}
