//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! The qcow2 driver and checker open images by path, so those targets write each input to a
//! file in `/dev/shm` (memory-backed, removed when the input is done).

use std::io::Write;

use tempfile::NamedTempFile;

/// Where input files go: tmpfs when the machine has it, else the default temporary directory.
fn temp_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A temporary file holding `data`, deleted when dropped.
pub fn image_file(data: &[u8]) -> NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("vdisk-fuzz-")
        .tempfile_in(temp_dir())
        .expect("create a temporary file");
    file.write_all(data).expect("write the fuzz input");
    file.flush().expect("flush the fuzz input");
    file
}

/// Reads input bytes front to back; past the end every value is zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let src = self.bytes(2);
        b[..src.len()].copy_from_slice(src);
        u16::from_le_bytes(b)
    }

    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let src = self.bytes(4);
        b[..src.len()].copy_from_slice(src);
        u32::from_le_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let src = self.bytes(8);
        b[..src.len()].copy_from_slice(src);
        u64::from_le_bytes(b)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}
