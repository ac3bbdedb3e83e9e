//! LUKS1 and LUKS2 header parsing and validation, without expensive key derivation.
//!
//! Input: one mode byte, then the start of the header area (the rest of the area reads as
//! zeros). Mode bits:
//! - 0: the area is exactly the input (else it is 32 MiB, room for the usual data offsets);
//! - 1: repair the SHA checksums of both LUKS2 copies first, so mutated JSON gets parsed;
//! - 2: the rest is LUKS2 JSON text, given straight to the JSON validator.
//!
//! The header is read as `info` reads it, then unlocked with the passphrase `fuzz` when every
//! key derivation it asks for is cheap (the seeds are made that way), which runs the key slot
//! checks, anti-forensic merge and key digest.

#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use vdisk_formats::luks::kdf::Kdf;
use vdisk_formats::luks::luks2::{header, json, Luks2};
use vdisk_formats::luks::{luks1, HeaderIo, LuksMetadata};
use vdisk_formats::{Error, Result};

const PADDED_SIZE: u64 = 32 << 20;
/// Most PBKDF2 iterations run per key slot or digest.
const CHEAP_PBKDF2: u32 = 2000;
/// Most Argon2 work (passes times KiB) run per key slot.
const CHEAP_ARGON2_KIB: u64 = 1024;
const PASSPHRASE: &[u8] = b"fuzz";

/// A header area backed by the input; past its end and up to `size` it reads as zeros.
#[derive(Debug)]
struct Area {
    data: Vec<u8>,
    size: u64,
    path: PathBuf,
}

impl HeaderIo for Area {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(Error::OutOfRange {
                path: self.path.clone(),
                offset,
                len: buf.len() as u64,
                size: self.size,
            });
        }
        buf.fill(0);
        if let Some(avail) = self.data.get(offset.min(self.data.len() as u64) as usize..) {
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::ReadOnly {
            path: self.path.clone(),
        })
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Rewrites the checksum of the LUKS2 header copy at `offset` when its binary part parses.
fn fix_checksum(data: &mut [u8], offset: u64) {
    let at = offset as usize;
    let Some(bin) = data.get(at..at + header::BIN_HDR_LEN) else {
        return;
    };
    let Ok(h) = header::parse_bin(bin, offset) else {
        return;
    };
    let Some(area) = data.get_mut(at..at + h.hdr_size as usize) else {
        return;
    };
    const CSUM_AT: usize = 448;
    area[CSUM_AT..CSUM_AT + 64].fill(0);
    let sum = h.checksum_alg.digest(&[area]);
    area[CSUM_AT..CSUM_AT + sum.len()].copy_from_slice(&sum);
}

fn pbkdf2_is_cheap(iterations: u32) -> bool {
    iterations <= CHEAP_PBKDF2
}

fn kdf_is_cheap(kdf: &Kdf) -> bool {
    match *kdf {
        Kdf::Pbkdf2 { iterations, .. } => pbkdf2_is_cheap(iterations),
        Kdf::Argon2 {
            time, memory_kib, ..
        } => u64::from(time) * u64::from(memory_kib) <= CHEAP_ARGON2_KIB,
    }
}

fn unlock_v1(io: &Area) {
    let Ok(h) = luks1::Header::read(io) else {
        return;
    };
    let slots_cheap = h
        .slots
        .iter()
        .all(|s| !s.active || pbkdf2_is_cheap(s.iterations));
    if pbkdf2_is_cheap(h.mk_iterations) && slots_cheap {
        let _ = h.unlock(io, PASSPHRASE);
    }
}

fn unlock_v2(io: &Area) {
    let Ok(h) = Luks2::read(io) else {
        return;
    };
    let slots_cheap = h
        .meta
        .keyslots
        .values()
        .all(|k| k.kdf.kdf().is_ok_and(|(kdf, _)| kdf_is_cheap(&kdf)));
    let digests_cheap = h
        .meta
        .digests
        .values()
        .all(|d| pbkdf2_is_cheap(d.iterations));
    if slots_cheap && digests_cheap {
        let _ = h.unlock(io, PASSPHRASE);
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 4 != 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            if let Ok(meta) = json::parse(text, header::HDR_SIZES[0]) {
                let _ = meta.to_json();
            }
        }
        return;
    }
    let mut data = rest.to_vec();
    if mode & 2 != 0 {
        fix_checksum(&mut data, 0);
        let second = header::peek_primary(&Area {
            data: data.clone(),
            size: data.len() as u64,
            path: PathBuf::new(),
        })
        .map_or(header::HDR_SIZES[0], |h| h.hdr_size);
        fix_checksum(&mut data, second);
    }
    let size = if mode & 1 != 0 {
        data.len() as u64
    } else {
        PADDED_SIZE.max(data.len() as u64)
    };
    let io = Area {
        data,
        size,
        path: PathBuf::from("<fuzz>"),
    };
    let Ok(meta) = LuksMetadata::read(&io) else {
        return;
    };
    let _ = format!("{:?}", meta.info());
    let _ = meta.data_size(io.size);
    if io.data.get(6..8) == Some(&[0, 1]) {
        unlock_v1(&io);
    } else {
        unlock_v2(&io);
    }
});
