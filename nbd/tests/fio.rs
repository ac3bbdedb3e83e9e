//! fio's nbd engine with four connections (multi-conn): random writes, then a separate verify
//! pass, then qemu-img check of the qcow2 image behind the server.

mod common;

use std::process::Command;

use common::*;

fn fio(uri: &str, dir: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = dir.join("fio.json");
    // Four jobs = four NBD connections, each on its own 16 MiB quarter of the disk.
    // fio writes its verify state files into the working directory: keep them in `dir`.
    run(Command::new("fio")
        .current_dir(dir)
        .args([
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--bs=4k",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=json",
        ])
        .arg(format!("--output={}", out.display()))
        .args(extra));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

#[test]
fn fio_random_writes_over_four_connections_then_verify() {
    if !have("fio") || !have("qemu-img") {
        return;
    }
    if !Command::new("fio")
        .arg("--enghelp")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nbd"))
    {
        eprintln!("skipped: this fio has no nbd engine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fio.qcow2");
    qemu_img_create(&img, "qcow2", "64M", &[]);
    let srv = serve_unix(server_for(open_image(&img, false)), dir.path());

    let w = fio(&srv.uri(), dir.path(), &["--rw=randwrite", "--do_verify=0"]);
    let jobs = w["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    for j in jobs {
        assert_eq!(j["error"], 0, "{j}");
        assert_eq!(j["write"]["io_bytes"], 16 << 20);
    }
    // A second run connects again and reads every block back against its checksum.
    let v = fio(&srv.uri(), dir.path(), &["--rw=randwrite", "--verify_only"]);
    for j in v["jobs"].as_array().unwrap() {
        assert_eq!(j["error"], 0, "{j}");
        assert_eq!(j["read"]["io_bytes"], 16 << 20, "verify read everything");
    }
    drop(srv);
    std::thread::sleep(std::time::Duration::from_millis(100));
    run(Command::new("qemu-img").arg("check").arg(&img));
    let map = qemu_map(&img);
    let data: u64 = map.iter().filter(|e| e.2).map(|e| e.1).sum();
    assert_eq!(data, 64 << 20, "every cluster was written: {map:?}");
}
