//! qcow2 open and metadata walk: the input is an image file. It is described as `info` does
//! (header, extensions, encryption header without a key), its snapshots listed, then opened
//! read-only without its backing file and walked: extents over the whole disk, every data run read
//! in bounded chunks (L1/L2 lookups, compressed descriptors, subclusters), and the refcounts read.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk_formats::qcow2::Qcow2;
use vdisk_formats::{BlockDev, ExtentKind, Format};

/// Extent queries per input (a huge virtual size must not make the walk endless).
const MAX_EXTENTS: usize = 4096;
/// Guest bytes read per input.
const MAX_READ: u64 = 4 << 20;
/// Bytes per read call.
const CHUNK: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let file = vdisk_fuzz::image_file(data);
    let path = file.path();
    if let Ok(info) = vdisk_formats::describe(path, Some(Format::Qcow2)) {
        let _ = format!("{info:?}");
    }
    let _ = vdisk_formats::qcow2::snapshot::list(path);
    let Ok(img) = Qcow2::open_with(path, true, None) else {
        return;
    };
    let _ = img.info();
    let _ = img.header();
    walk(&img);
    let _ = img.refcounts();
});

/// Walks the extents of `dev` front to back and reads what they describe, checking the
/// [`BlockDev::extent`] contract: each run starts where asked, is 1 to `len` bytes long, and
/// zero or unallocated runs (no backing file is open) read back as zeros.
fn walk(dev: &dyn BlockDev) {
    let size = dev.size();
    let step = u64::from(dev.capabilities().preferred_block.max(512));
    let mut buf = vec![0u8; CHUNK];
    let mut budget = MAX_READ;
    let mut off = 0u64;
    for _ in 0..MAX_EXTENTS {
        if off >= size {
            break;
        }
        let ext = match dev.extent(off, size - off) {
            Ok(ext) => ext,
            Err(_) => {
                // Unreadable metadata here: try a read anyway, then go on with the next block.
                let n = (size - off).min(512) as usize;
                let _ = dev.read_at(&mut buf[..n], off);
                off = (off / step + 1).saturating_mul(step);
                continue;
            }
        };
        assert_eq!(ext.offset, off, "extent starts elsewhere than asked");
        assert!(
            ext.length >= 1 && ext.length <= size - off,
            "extent length {} out of 1..={}",
            ext.length,
            size - off
        );
        let len = ext.length.min(budget);
        budget -= len;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let read = dev.read_at(&mut buf[..n], off + done);
            if read.is_ok() && ext.kind != ExtentKind::Data {
                assert!(
                    buf[..n].iter().all(|&b| b == 0),
                    "{:?} run at {} reads non-zero bytes",
                    ext.kind,
                    off + done
                );
            }
            done += n as u64;
        }
        off += ext.length;
    }
}
