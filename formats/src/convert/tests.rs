//! The convert engine against memory devices and a sparse raw file.

use super::*;
use crate::mem::MemDev;

#[test]
fn concatenated_sources_copy_in_order() {
    let a: Arc<dyn BlockDev> = Arc::new(MemDev::new(3 << 20));
    let b: Arc<dyn BlockDev> = Arc::new(MemDev::new(1 << 20));
    a.write_at(&[1u8; 5000], (2 << 20) + 100).unwrap();
    b.write_at(&[2u8; 7], 10).unwrap();
    let t = Arc::new(MemDev::new(4 << 20));
    let target: Arc<dyn BlockDev> = t.clone();
    convert(
        &[a, b],
        &target,
        &ConvertOptions {
            threads: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let out = t.contents();
    assert!(out[(2 << 20) + 100..(2 << 20) + 5100]
        .iter()
        .all(|&x| x == 1));
    assert_eq!(&out[(3 << 20) + 10..(3 << 20) + 17], &[2u8; 7]);
    assert_eq!(out.iter().filter(|&&x| x != 0).count(), 5007);
}

#[test]
fn long_holes_zero_exactly_their_range() {
    // A sparse raw source: data at odd offsets, holes spanning many chunks in between.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.raw");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(16 << 20).unwrap();
    drop(file);
    let src = crate::raw::Raw::open(&path, false).unwrap();
    src.write_at(&[7u8; 1000], (5 << 20) + 123).unwrap();
    src.write_at(&[9u8; 20], (13 << 20) - 10).unwrap();
    let src: Arc<dyn BlockDev> = Arc::new(src);
    // The target holds garbage and is not known to read as zero (`-n`).
    let t = Arc::new(MemDev::new(16 << 20));
    t.write_at(&vec![0xffu8; 16 << 20], 0).unwrap();
    let target: Arc<dyn BlockDev> = t.clone();
    convert(
        std::slice::from_ref(&src),
        &target,
        &ConvertOptions {
            target_is_zero: false,
            ..Default::default()
        },
    )
    .unwrap();
    let mut expected = vec![0u8; 16 << 20];
    src.read_at(&mut expected, 0).unwrap();
    assert!(t.contents() == expected, "target differs from the source");
}

/// A memory device for watching the engine: it records which thread wrote which offset, says
/// whether it takes parallel writes, and with `slow_start` takes a while to read its first MiB
/// (so that later chunks finish first).
#[derive(Debug)]
struct Probe {
    mem: MemDev,
    parallel: bool,
    slow_start: bool,
    writes: Mutex<Vec<(u64, std::thread::ThreadId)>>,
}

impl Probe {
    fn new(size: usize) -> Probe {
        Probe {
            mem: MemDev::new(size),
            parallel: false,
            slow_start: false,
            writes: Mutex::new(Vec::new()),
        }
    }
}

impl BlockDev for Probe {
    fn capabilities(&self) -> crate::block::Capabilities {
        self.mem.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.slow_start && offset < 1 << 20 {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let me = std::thread::current().id();
        self.writes.lock().unwrap().push((offset, me));
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.mem.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.mem.write_zeroes(offset, len, flags)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.mem.discard(offset, len)
    }
    fn extent(&self, offset: u64, len: u64) -> Result<crate::block::Extent> {
        self.mem.extent(offset, len)
    }
    fn parallel_writes(&self) -> bool {
        self.parallel
    }
    fn info(&self) -> Result<crate::info::NodeInfo> {
        self.mem.info()
    }
}

/// Converts 32 MiB of numbered chunks into a [`Probe`] target with 4 threads; returns
/// the target after checking that its contents equal the source.
fn convert_into_probe(parallel: bool) -> Arc<Probe> {
    let src: Arc<dyn BlockDev> = Arc::new(MemDev::new(32 << 20));
    for i in 0..32u8 {
        src.write_at(&[i + 1; 1 << 20], u64::from(i) << 20).unwrap();
    }
    let t = Arc::new(Probe {
        parallel,
        ..Probe::new(32 << 20)
    });
    let target: Arc<dyn BlockDev> = t.clone();
    let opts = ConvertOptions {
        threads: 4,
        ..Default::default()
    };
    convert(std::slice::from_ref(&src), &target, &opts).unwrap();
    let mut expected = vec![0u8; 32 << 20];
    src.read_at(&mut expected, 0).unwrap();
    assert!(
        t.mem.contents() == expected,
        "target differs from the source"
    );
    t
}

#[test]
fn one_writer_writes_in_order() {
    let t = convert_into_probe(false);
    let writes = t.writes.lock().unwrap();
    assert_eq!(writes.len(), 32);
    assert!(writes.windows(2).all(|w| w[0].0 < w[1].0), "{writes:?}");
    assert!(writes.iter().all(|w| w.1 == writes[0].1), "{writes:?}");
}

#[test]
fn parallel_writes_come_from_the_workers() {
    let t = convert_into_probe(true);
    let writes = t.writes.lock().unwrap();
    let me = std::thread::current().id();
    assert_eq!(writes.len(), 32);
    assert!(writes.iter().all(|w| w.1 != me), "{writes:?}");
}

#[test]
fn write_errors_are_reported() {
    let a: Arc<dyn BlockDev> = Arc::new(MemDev::new(8 << 20));
    a.write_at(&[1u8; 8 << 20], 0).unwrap();
    let t = Arc::new(MemDev::new(8 << 20));
    t.fail_write_after(2);
    let target: Arc<dyn BlockDev> = t.clone();
    let err = convert(&[a], &target, &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
}

/// The first chunk's write fails while later chunks wait for their turn: the error comes back
/// (the chunks waiting used to keep every token, and the planner waited for one forever).
#[test]
fn a_write_error_with_chunks_waiting_ends_the_copy() {
    let src = Probe {
        slow_start: true,
        ..Probe::new(16 << 20)
    };
    src.write_at(&vec![1u8; 16 << 20], 0).unwrap();
    let src: Arc<dyn BlockDev> = Arc::new(src);
    let t = Arc::new(MemDev::new(16 << 20));
    t.fail_write_after(0);
    let target: Arc<dyn BlockDev> = t.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(convert(&[src], &target, &ConvertOptions::default()));
    });
    let result = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("convert hung after a write error");
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("error while writing at byte 0"),
        "{err}"
    );
}
