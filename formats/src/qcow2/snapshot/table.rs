//! The snapshot table (qcow2.rst, "Snapshots"): parsed into typed [`Snapshot`]s and encoded back
//! the way QEMU writes it.
//!
//! ```text
//!   header: nb_snapshots, snapshots_offset ──> entry 0 │ entry 1 │ ...   (each 8-byte aligned)
//!   entry:  40-byte fixed part │ extra data │ id │ name
//!   extra:  vm_state_size_large (8) │ disk_size (8) │ icount (8) │ unknown (preserved)
//! ```
//!
//! Limits are QEMU's: at most [`MAX_SNAPSHOTS`] entries, [`MAX_TABLE_BYTES`] bytes of table and
//! [`MAX_EXTRA_DATA`] bytes of extra data per entry, so a hostile table costs bounded memory.

use crate::error::{Error, Result};
use crate::info::SnapshotInfo;

/// Most snapshots an image may have (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table (QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`).
pub const MAX_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Largest extra data of one entry (QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
pub const MAX_EXTRA_DATA: u32 = 1024;
/// The fixed part of an entry.
pub const ENTRY_HEADER_LEN: u64 = 40;
/// The extra data this version knows: 64-bit VM state size, disk size, icount.
pub const KNOWN_EXTRA_LEN: u32 = 24;
/// Longest name `qemu-img snapshot -c` stores (its buffer holds 256 bytes with the NUL).
pub const MAX_NEW_NAME: usize = 255;

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique id, by convention a decimal number.
    pub id: String,
    pub name: String,
    /// Host offset of the snapshot's own L1 table.
    pub l1_table_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// Bytes of saved VM state (the 64-bit field of the extra data when present).
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual size when the snapshot was taken (the current size when the entry has none).
    pub disk_size: u64,
    /// Instruction count (`None` when not recorded, stored as all ones).
    pub icount: Option<u64>,
    /// Bytes of extra data in the entry as read (at most [`MAX_EXTRA_DATA`]).
    pub extra_data_size: u32,
    /// Extra data past the fields known here, kept verbatim.
    pub unknown_extra: Vec<u8>,
}

impl Snapshot {
    /// The entry as `qemu-img snapshot -l` and `info` show it.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: u64::from(self.date_sec),
            date_nsec: self.date_nsec,
            vm_clock_sec: self.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: (self.vm_clock_nsec % 1_000_000_000) as u32,
            icount: self.icount,
        }
    }

    /// Bytes the entry takes when written (extra data is at least the known part).
    fn encoded_len(&self) -> u64 {
        ENTRY_HEADER_LEN
            + u64::from(self.extra_data_size.max(KNOWN_EXTRA_LEN))
            + self.id.len() as u64
            + self.name.len() as u64
    }
}

/// How strictly to read a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// vdisk's own use: every byte of the table must lie inside the file (`file_len` bytes).
    Strict { file_len: u64 },
    /// `check`: bytes past the end of the file read as zero, as in QEMU. With `repair`, entries
    /// with too much extra data are cut short and entries past the size limit dropped, each with
    /// a message, instead of failing.
    Check { repair: bool },
}

/// A table as read from the image.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadTable {
    pub snapshots: Vec<Snapshot>,
    /// Bytes the table spans in the file, from its offset.
    pub size: u64,
    /// Entries dropped off the end because the table was too big (repair only).
    pub dropped: u32,
    /// Entries whose extra data was cut to the limit (repair only).
    pub extra_cut: u32,
    /// What repair did, one line each, as QEMU prints it.
    pub messages: Vec<String>,
}

/// Why a table could not be read: QEMU's message, an optional hint line and the errno text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableError {
    pub message: String,
    pub hint: Option<String>,
    pub errno: &'static str,
}

impl TableError {
    fn new(message: String, hint: Option<String>, errno: &'static str) -> Self {
        TableError {
            message,
            hint,
            errno,
        }
    }

    /// As a block-layer error for `path`.
    pub fn into_error(self, path: &std::path::Path) -> Error {
        Error::invalid(path, self.message)
    }
}

pub(crate) const EFBIG: &str = "File too large";
pub(crate) const EIO: &str = "Input/output error";
pub(crate) const EINVAL: &str = "Invalid argument";

/// Checks the table pointer of the header the way QEMU validates it before reading (`name` is
/// "Snapshot table" at open and "snapshot table" in `check`).
pub(crate) fn validate_pointer(
    offset: u64,
    count: u32,
    cluster_size: u64,
    name: &str,
) -> Result<(), TableError> {
    if count > MAX_SNAPSHOTS {
        return Err(TableError::new(format!("{name} too large"), None, EFBIG));
    }
    let bytes = u64::from(count) * ENTRY_HEADER_LEN;
    if offset > i64::MAX as u64 - bytes || offset % cluster_size != 0 {
        return Err(TableError::new(
            format!("{name} offset invalid"),
            None,
            EINVAL,
        ));
    }
    Ok(())
}

/// Reads `count` entries from `offset`. `read` fills a buffer from a file offset (bytes past the
/// end of the file as zero); `virtual_size` is the disk size of entries that record none.
pub(crate) fn read_table(
    read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    offset: u64,
    count: u32,
    virtual_size: u64,
    mode: ReadMode,
) -> Result<ReadTable, TableError> {
    let mut out = ReadTable::default();
    let repair = mode == ReadMode::Check { repair: true };
    let fetch = |len: u64, at: u64, what: &str, i: u32| -> Result<Vec<u8>, TableError> {
        if let ReadMode::Strict { file_len } = mode {
            if at.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(TableError::new(
                    format!(
                        "snapshot table entry {i}: {what} ({len} bytes at offset {at:#x}) lies past the end of the file ({file_len} bytes)"
                    ),
                    None,
                    EINVAL,
                ));
            }
        }
        let mut buf = vec![0u8; len as usize];
        read(&mut buf, at).map_err(|e| {
            TableError::new(format!("Failed to read snapshot table: {e}"), None, EIO)
        })?;
        Ok(buf)
    };
    let mut at = offset;
    let mut table_len = 0u64;
    for i in 0..count {
        let entry_start = at;
        table_len = table_len.next_multiple_of(8);
        at = at.next_multiple_of(8);
        let h = fetch(ENTRY_HEADER_LEN, at, "entry", i)?;
        at += ENTRY_HEADER_LEN;
        let be32 = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
        let be64 = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().unwrap());
        let be16 = |o: usize| u16::from_be_bytes(h[o..o + 2].try_into().unwrap());
        let id_len = u64::from(be16(12));
        let name_len = u64::from(be16(14));
        let mut extra_size = be32(36);
        let mut cut = false;
        if extra_size > MAX_EXTRA_DATA {
            if !repair {
                return Err(TableError::new(
                    format!("Too much extra metadata in snapshot table entry {i}"),
                    Some(
                        "You can force-remove this extra metadata with qemu-img check -r all"
                            .into(),
                    ),
                    EFBIG,
                ));
            }
            out.messages.push(format!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra_size} > {MAX_EXTRA_DATA})"
            ));
            out.extra_cut += 1;
            cut = true;
        }
        let known_len = extra_size.min(KNOWN_EXTRA_LEN);
        let mut known = fetch(u64::from(known_len), at, "extra data", i)?;
        at += u64::from(known_len);
        known.resize(KNOWN_EXTRA_LEN as usize, 0);
        let extra64 = |o: usize| u64::from_be_bytes(known[o..o + 8].try_into().unwrap());
        let mut unknown_extra = Vec::new();
        if extra_size > KNOWN_EXTRA_LEN {
            let extra_end = at + u64::from(extra_size - KNOWN_EXTRA_LEN);
            if cut {
                extra_size = MAX_EXTRA_DATA;
            }
            unknown_extra = fetch(u64::from(extra_size - KNOWN_EXTRA_LEN), at, "extra data", i)?;
            at = extra_end;
        }
        let id = fetch(id_len, at, "id", i)?;
        at += id_len;
        let name = fetch(name_len, at, "name", i)?;
        at += name_len;
        let snapshot = Snapshot {
            id: c_string(&id),
            name: c_string(&name),
            l1_table_offset: be64(0),
            l1_size: be32(8),
            vm_state_size: if extra_size >= 8 {
                extra64(0)
            } else {
                u64::from(be32(32))
            },
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: be64(24),
            disk_size: if extra_size >= 16 {
                extra64(8)
            } else {
                virtual_size
            },
            icount: if extra_size >= 24 {
                Some(extra64(16)).filter(|&v| v != u64::MAX)
            } else {
                None
            },
            extra_data_size: extra_size,
            unknown_extra,
        };
        table_len += ENTRY_HEADER_LEN + u64::from(extra_size) + id_len + name_len;
        if table_len > MAX_TABLE_BYTES || at - offset > i32::MAX as u64 {
            if !repair {
                return Err(TableError::new(
                    "Snapshot table is too big".into(),
                    Some(format!(
                        "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                        count - i
                    )),
                    EFBIG,
                ));
            }
            out.messages.push(format!(
                "Discarding {} overhanging snapshots (snapshot table is too big)",
                count - i
            ));
            out.dropped += count - i;
            at = entry_start;
            break;
        }
        out.snapshots.push(snapshot);
    }
    out.size = at - offset;
    Ok(out)
}

/// A name or id as QEMU reads it: a C string (it ends at the first NUL byte).
fn c_string(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Encodes a table as QEMU writes it: entries 8-byte aligned, at least the known extra data,
/// VM state sizes over 4 GiB only in the 64-bit field.
pub(crate) fn encode_table(snapshots: &[Snapshot]) -> Result<Vec<u8>> {
    let mut len = 0u64;
    for s in snapshots {
        len = len.next_multiple_of(8) + s.encoded_len();
        if len > MAX_TABLE_BYTES {
            return Err(Error::NoSpace {
                path: Default::default(),
                what: format!("the snapshot table would exceed {MAX_TABLE_BYTES} bytes"),
            });
        }
    }
    let mut out = Vec::with_capacity(len as usize);
    for s in snapshots {
        out.resize(out.len().next_multiple_of(8), 0);
        let extra_size = s.extra_data_size.max(KNOWN_EXTRA_LEN);
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        let small_vm_state = u32::try_from(s.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small_vm_state.to_be_bytes());
        out.extend_from_slice(&extra_size.to_be_bytes());
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.to_be_bytes());
        out.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        if extra_size > KNOWN_EXTRA_LEN {
            let mut unknown = s.unknown_extra.clone();
            unknown.resize((extra_size - KNOWN_EXTRA_LEN) as usize, 0);
            out.extend_from_slice(&unknown);
        }
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
    }
    Ok(out)
}

/// The id QEMU gives a new snapshot: one more than the largest numeric id (ids are read like
/// `strtoul`: leading digits, anything else counts as 0).
pub(crate) fn next_id(snapshots: &[Snapshot]) -> String {
    let max = snapshots
        .iter()
        .map(|s| {
            let t = s.id.trim_start();
            let t = t.strip_prefix('+').unwrap_or(t);
            let digits = t.len() - t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            t[..digits]
                .parse::<u64>()
                .unwrap_or(if digits > 0 { u64::MAX } else { 0 })
        })
        .max()
        .unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// Cuts a new snapshot name to what qemu-img stores, on a character boundary.
pub(crate) fn clip_name(name: &str) -> &str {
    if name.len() <= MAX_NEW_NAME {
        return name;
    }
    let mut end = MAX_NEW_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, name: &str) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: name.into(),
            l1_table_offset: 0x50000,
            l1_size: 2,
            vm_state_size: 5 << 32,
            date_sec: 1_700_000_000,
            date_nsec: 123_000,
            vm_clock_nsec: 3_600_000_000_123,
            disk_size: 1 << 30,
            icount: None,
            extra_data_size: 30,
            unknown_extra: vec![1, 2, 3, 4, 5, 6],
        }
    }

    fn reader(bytes: Vec<u8>) -> impl Fn(&mut [u8], u64) -> Result<()> {
        move |buf: &mut [u8], at: u64| {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = bytes.get(at as usize + i).copied().unwrap_or(0);
            }
            Ok(())
        }
    }

    #[test]
    fn encode_then_read_keeps_every_field() {
        let snaps = vec![sample("1", "first"), sample("7", "second one")];
        let bytes = encode_table(&snaps).unwrap();
        let len = bytes.len() as u64;
        let t = read_table(&reader(bytes), 0, 2, 99, ReadMode::Strict { file_len: len }).unwrap();
        assert_eq!(t.snapshots, snaps);
        assert_eq!(t.size, len);
        assert_eq!(next_id(&t.snapshots), "8");
        let info = t.snapshots[0].info();
        assert_eq!((info.vm_clock_sec, info.vm_clock_nsec), (3600, 123));
    }

    #[test]
    fn hostile_tables_are_refused_in_strict_mode() {
        let bytes = encode_table(&[sample("1", "x")]).unwrap();
        let len = bytes.len() as u64;
        // A name running past the end of the file.
        let mut long_name = bytes.clone();
        long_name[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        let err = read_table(
            &reader(long_name),
            0,
            1,
            0,
            ReadMode::Strict { file_len: len },
        )
        .unwrap_err();
        assert!(err.message.contains("name"), "{err:?}");
        // More entries than the file holds.
        let err = read_table(
            &reader(bytes.clone()),
            0,
            2,
            0,
            ReadMode::Strict { file_len: len },
        )
        .unwrap_err();
        assert!(err.message.contains("past the end"), "{err:?}");
        // Too much extra data.
        let mut extra = bytes;
        extra[36..40].copy_from_slice(&5000u32.to_be_bytes());
        let err = read_table(
            &reader(extra.clone()),
            0,
            1,
            0,
            ReadMode::Check { repair: false },
        )
        .unwrap_err();
        assert_eq!(
            err.message,
            "Too much extra metadata in snapshot table entry 0"
        );
        let t = read_table(&reader(extra), 0, 1, 0, ReadMode::Check { repair: true }).unwrap();
        assert_eq!(
            (t.extra_cut, t.snapshots[0].extra_data_size),
            (1, MAX_EXTRA_DATA)
        );
        assert!(validate_pointer(0x10000, MAX_SNAPSHOTS + 1, 65536, "Snapshot table").is_err());
    }

    #[test]
    fn ids_and_names_follow_qemu() {
        let mut a = sample("12abc", "n");
        assert_eq!(next_id(&[a.clone()]), "13");
        a.id = "x".into();
        assert_eq!(next_id(&[a]), "1");
        assert_eq!(next_id(&[]), "1");
        let long = "é".repeat(200);
        assert!(clip_name(&long).len() <= MAX_NEW_NAME);
    }
}
