//! Compressed clusters, zlib and zstd, checked through qemu-img: images qemu-img compresses read
//! back identically; clusters vdisk compresses read back identically in qemu-img, with QEMU's
//! refcounts (`qemu-img check` clean); rewriting part of a compressed cluster decompresses it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{qemu_read_all, tool};
use vdisk_formats::qcow2::compressed::CompressionType;
use vdisk_formats::{create, open, qcow2, CreateOptions, OpenOptions, ZeroFlags};

/// Text-like data that compresses to roughly a third, and a random tail that does not compress.
fn sample(len: usize) -> Vec<u8> {
    let words = [
        "block ",
        "cluster ",
        "qcow2 ",
        "refcount ",
        "zlib ",
        "zstd ",
        "vdisk\n",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if out.len() > len * 7 / 8 {
            out.push(x as u8);
        } else {
            out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        }
    }
    out.truncate(len);
    out
}

fn check_clean(img: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", img.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img check: {text}");
    assert!(
        !text.contains("\"leaks\"") && !text.contains("\"corruptions\""),
        "{text}"
    );
}

#[test]
fn clusters_compressed_by_qemu_read_back_identically() {
    for (kind, cs) in [
        ("zlib", "64k"),
        ("zstd", "64k"),
        ("zlib", "4k"),
        ("zstd", "2M"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        let img = dir.path().join("c.qcow2");
        let data = sample(3 << 20);
        std::fs::write(&src, &data).unwrap();
        let opts = format!("compression_type={kind},cluster_size={cs}");
        tool(&[
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &opts,
            src.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let dev = open(
            &img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut back = vec![0u8; data.len()];
        // Odd-sized reads cross compressed clusters at unaligned offsets.
        for (i, chunk) in back.chunks_mut(12_345).enumerate() {
            dev.read_at(chunk, i as u64 * 12_345).unwrap();
        }
        assert!(back == data, "{kind}/{cs}: vdisk reads different data");
        assert!(
            dev.extent(0, 65536).unwrap().compressed,
            "{kind}/{cs}: first cluster not compressed"
        );
    }
}

#[test]
fn clusters_compressed_by_vdisk_read_back_in_qemu_and_check_clean() {
    for (kind, cs) in [
        (CompressionType::Zlib, 65536u64),
        (CompressionType::Zstd, 65536),
        (CompressionType::Zlib, 512),
        (CompressionType::Zstd, 4096),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("v.qcow2");
        let size = 2u64 << 20;
        let opts = qcow2::CreateOptions {
            size: Some(size),
            cluster_size: cs,
            compression_type: kind,
            ..Default::default()
        };
        create(&img, &CreateOptions::Qcow2(opts)).unwrap();
        let data = sample(size as usize);
        let dev = open(&img, OpenOptions::default()).unwrap();
        let mut plain = 0;
        for (i, cluster) in data.chunks(cs as usize).enumerate() {
            match dev.compress_cluster(cluster).unwrap() {
                Some(c) => dev.write_compressed(i as u64 * cs, &c).unwrap(),
                None => {
                    plain += 1;
                    dev.write_at(cluster, i as u64 * cs).unwrap()
                }
            }
        }
        assert!(plain > 0, "the random tail should not compress");
        dev.flush().unwrap();
        drop(dev);
        check_clean(&img);
        assert!(
            qemu_read_all(&img) == data,
            "{kind:?}/{cs}: qemu-img reads different data"
        );
        let info = String::from_utf8(tool(&["qemu-img", "info", img.to_str().unwrap()])).unwrap();
        assert!(
            info.contains(&format!("compression type: {}", kind.name())),
            "{info}"
        );
        let size_on_disk = std::fs::metadata(&img).unwrap().len();
        assert!(
            size_on_disk < size * 3 / 4,
            "{kind:?}/{cs}: image is {size_on_disk} bytes"
        );
    }
}

#[test]
fn rewriting_compressed_clusters_releases_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let img = dir.path().join("c.qcow2");
    let mut model = sample(1 << 20);
    std::fs::write(&src, &model).unwrap();
    tool(&[
        "qemu-img",
        "convert",
        "-c",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let dev = open(&img, OpenOptions::default()).unwrap();
    dev.write_at(&[7u8; 100], 70_000).unwrap();
    model[70_000..70_100].fill(7);
    dev.write_zeroes(
        3 * 65536,
        65536,
        ZeroFlags {
            may_unmap: true,
            fast_only: false,
        },
    )
    .unwrap();
    model[3 * 65536..4 * 65536].fill(0);
    dev.discard(5 * 65536, 65536).unwrap();
    let mut after = vec![0u8; 65536];
    dev.read_at(&mut after, 5 * 65536).unwrap();
    model[5 * 65536..6 * 65536].copy_from_slice(&after);
    dev.flush().unwrap();
    drop(dev);
    check_clean(&img);
    assert!(qemu_read_all(&img) == model);
}
