//! The server checked by real NBD clients: libnbd's nbdinfo and nbdcopy, qemu-img and qemu-nbd.

mod common;

use std::process::Command;

use common::*;
use vdisk_nbd::{Export, Server};

#[test]
fn nbdinfo_json_reports_flags_sizes_and_contexts() {
    if !have("nbdinfo") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let srv = serve_unix(
        Server::new(vec![
            Export::new("", open_image(&img, false)).description("sparse test disk")
        ]),
        dir.path(),
    );
    let out = stdout(Command::new("nbdinfo").arg("--json").arg(srv.uri()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["TLS"], false);
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 64 << 20);
    assert_eq!(e["description"], "sparse test disk");
    assert_eq!(e["is_read_only"], false);
    for cap in [
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[cap], true, "{cap} in {e}");
    }
    assert_eq!(e["block_size_minimum"], 1);
    // qemu-nbd's value for every format (the image's cluster size is 64 KiB).
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["base:allocation", "qemu:allocation-depth"]);
}

#[test]
fn read_only_export_reports_read_only_and_no_write_commands() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let srv = serve_unix(
        Server::new(vec![Export::new("", open_image(&img, true))]).max_connections(Some(1)),
        dir.path(),
    );
    let out = stdout(Command::new("nbdinfo").arg("--json").arg(srv.uri()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    assert_eq!(e["can_multi_conn"], false);
    assert_eq!(e["can_flush"], true);
}

#[test]
fn nbdinfo_maps_agree_with_qemu_img_map() {
    if !have("nbdinfo") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let size = 64 << 20;
    let grain = 512;
    let reference = qemu_map(&img);
    let srv = serve_unix(server_for(open_image(&img, true)), dir.path());

    let expect_alloc: Vec<(u64, u64, u32)> = reference
        .iter()
        .map(|&(s, l, data, zero, _, _)| {
            let v = match (data, zero) {
                (true, _) => 0,
                (false, true) => 3,
                (false, false) => 1,
            };
            (s, l, v)
        })
        .collect();
    let got = nbdinfo_map(&srv.uri(), None);
    assert_eq!(
        per_block(&got, size, grain),
        per_block(&expect_alloc, size, grain),
        "base:allocation {got:?} vs qemu-img map {reference:?}"
    );

    let expect_depth: Vec<(u64, u64, u32)> = reference
        .iter()
        .map(|&(s, l, _, _, depth, present)| (s, l, if present { depth as u32 + 1 } else { 0 }))
        .collect();
    let got = nbdinfo_map(&srv.uri(), Some("qemu:allocation-depth"));
    assert_eq!(
        per_block(&got, size, grain),
        per_block(&expect_depth, size, grain),
        "qemu:allocation-depth {got:?} vs qemu-img map {reference:?}"
    );
    // The fixture really has all three depths.
    let depths: std::collections::BTreeSet<u32> = got.iter().map(|r| r.2).collect();
    assert_eq!(depths.into_iter().collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn nbdcopy_from_server_matches_qemu_img_convert() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let srv = serve_unix(server_for(open_image(&img, true)), dir.path());
    let out = dir.path().join("out.raw");
    run(Command::new("nbdcopy").arg(srv.uri()).arg(&out));
    let reference = dir.path().join("ref.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&reference));
    run(Command::new("cmp").arg(&out).arg(&reference));
}

#[test]
fn nbdcopy_to_server_writes_the_image() {
    if !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    qemu_img_create(&src, "raw", "48M", &[]);
    qemu_io(
        &src,
        "raw",
        &[
            "write -P 0x5a 0 3M",
            "write -P 0xa5 17M 1M",
            "write -P 0x01 47M 1M",
        ],
    );
    let dst = dir.path().join("dst.qcow2");
    qemu_img_create(&dst, "qcow2", "48M", &[]);
    // Pre-existing data that nbdcopy must overwrite with zeroes.
    qemu_io(&dst, "qcow2", &["write -P 0x77 30M 2M"]);
    let srv = serve_unix(server_for(open_image(&dst, false)), dir.path());
    run(Command::new("nbdcopy").arg(&src).arg(srv.uri()));
    drop(srv);
    run(Command::new("qemu-img").arg("check").arg(&dst));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(&dst));
}

#[test]
fn qemu_img_convert_and_compare_over_nbd() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let srv = serve_unix(server_for(open_image(&img, true)), dir.path());
    let out = dir.path().join("via-nbd.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(srv.uri())
        .arg(&out));
    run(Command::new("qemu-img")
        .args(["compare", "-F", "raw"])
        .arg(&img)
        .arg(&out));
    run(Command::new("qemu-img")
        .arg("compare")
        .arg(srv.uri())
        .arg(&img));
    // qemu-img map over NBD sees the same allocation as the local image.
    let over_nbd = stdout(
        Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(srv.uri()),
    );
    let v: serde_json::Value = serde_json::from_str(&over_nbd).unwrap();
    let zero_bytes: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["zero"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let local_zero: u64 = qemu_map(&img).iter().filter(|e| e.3).map(|e| e.1).sum();
    assert_eq!(zero_bytes, local_zero);
}

#[test]
fn qemu_img_writes_through_the_server() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let dst = dir.path().join("dst.qcow2");
    qemu_img_create(&dst, "qcow2", "64M", &[]);
    let srv = serve_unix(server_for(open_image(&dst, false)), dir.path());
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-O", "raw"])
        .arg(&img)
        .arg(srv.uri()));
    drop(srv);
    run(Command::new("qemu-img").arg("check").arg(&dst));
    run(Command::new("qemu-img").arg("compare").arg(&img).arg(&dst));
}

#[test]
fn qemu_nbd_lists_the_exports() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    qemu_img_create(&a, "raw", "1M", &[]);
    qemu_img_create(&b, "raw", "2M", &[]);
    let srv = serve_unix(
        Server::new(vec![
            Export::new("alpha", open_image(&a, false)).description("first disk"),
            Export::new("beta", open_image(&b, true)),
        ]),
        dir.path(),
    );
    let out = stdout(
        Command::new("qemu-nbd")
            .arg("-L")
            .arg("-k")
            .arg(&srv.socket),
    );
    assert!(out.contains("exports available: 2"), "{out}");
    assert!(out.contains("export: 'alpha'"), "{out}");
    assert!(out.contains("description: first disk"), "{out}");
    assert!(out.contains("size:  1048576"), "{out}");
    assert!(out.contains("export: 'beta'"), "{out}");
    assert!(out.contains("size:  2097152"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("qemu:allocation-depth"), "{out}");
    // nbdinfo --list sees the same names through LIST + INFO.
    if have("nbdinfo") {
        let list = stdout(
            Command::new("nbdinfo")
                .arg("--list")
                .arg("--json")
                .arg(srv.uri()),
        );
        let v: serde_json::Value = serde_json::from_str(&list).unwrap();
        let names: Vec<&str> = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["alpha", "beta"]);
        let beta = stdout(
            Command::new("nbdinfo")
                .arg("--size")
                .arg(srv.uri_for("beta")),
        );
        assert_eq!(beta.trim(), "2097152");
    }
}

#[test]
fn tcp_listener_on_an_ephemeral_port() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.raw");
    qemu_img_create(&img, "raw", "3M", &[]);
    let (server, port) = serve_tcp(server_for(open_image(&img, false)));
    let out = stdout(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd://127.0.0.1:{port}/")),
    );
    assert_eq!(out.trim(), "3145728");
    server.shutdown();
}
