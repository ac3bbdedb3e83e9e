//! `check`: consistency check and repair of qcow2 metadata, with the numbers, messages and exit
//! codes of `qemu-img check` (QEMU 10).
//!
//! ```text
//!   snapshot table ─┐
//!   header, L1/L2 ──┼─ walk.rs ──> RefArray (expected refcount per cluster)
//!   refcount table ─┘                  │
//!                         repair.rs: compare with the on-disk refcounts ──> leaks, corruptions
//!                                    rebuild the refcount structure (-r all), COPIED flags
//! ```
//!
//! The check opens the image itself (read-only unless repairing), reads past the end of the file
//! as zeros the way QEMU does, and keeps memory in proportion to the clusters in use (tables it
//! reads are bounded by QEMU's limits), so a hostile image yields findings or a failed check,
//! never a panic. A repair that fixed anything is followed by a second, read-only check whose
//! numbers are reported (as qemu-img does). Persistent dirty bitmaps are counted (bitmaps.rs)
//! and kept by repairs.

mod bitmaps;
mod image;
mod refs;
mod repair;
mod report;
mod snapshots;
mod walk;

use std::path::Path;

use image::Image;
use refs::RefArray;
pub use report::{CheckMessage, CheckReport, JsonValue};

use super::entry::{COMPRESSED, OFFSET_MASK, ZERO};
use super::header::incompat;
use super::snapshot::Snapshot;
use super::Qcow2;
use crate::error::{Error, Result};

/// What `check -r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// `-r leaks`: drop the refcounts nothing uses.
    Leaks,
    /// `-r all`: leaks and corruptions, rebuilding the refcount structure if needed.
    All,
}

impl Qcow2 {
    /// Checks the qcow2 image at `path` like `qemu-img check [-r leaks|all]`. `Err` means the
    /// image could not be opened (qemu-img exits 1 then); everything found, and a check that
    /// could not complete, is in the report.
    pub fn check(path: &Path, repair: Option<Repair>) -> Result<CheckReport> {
        let fix = Fix::from(repair);
        let mut checker = Checker::new(Image::open(path, fix.any())?);
        let first = checker.run(fix);
        let mut report = CheckReport::new(path, &first);
        if first.failure.is_none() && (first.res.corruptions_fixed > 0 || first.res.leaks_fixed > 0)
        {
            report.rechecked = true;
            let second = if checker.dead {
                Pass::failed("No medium found")
            } else {
                match Image::open(path, false) {
                    Ok(img) => {
                        let signaled = checker.signaled;
                        let msgs = std::mem::take(&mut checker.msgs);
                        checker = Checker::new(img);
                        checker.signaled = signaled;
                        checker.msgs = msgs;
                        checker.run(Fix::NONE)
                    }
                    Err(e) => Pass::failed(&Fail::from_error(&e).errno),
                }
            };
            report.set_numbers(&second);
        }
        if fix.any() && !checker.dead {
            // Closing an image opened for writing marks it clean, whatever the check found.
            let closed = Image::open(path, true).and_then(|img| {
                let mut c = Checker::new(img);
                c.clear_incompat(incompat::DIRTY)
                    .map_err(|e| Error::invalid(path, e.errno))
            });
            if let Err(e) = closed {
                report.failure.get_or_insert(e.to_string());
            }
        }
        report.messages = checker.msgs;
        Ok(report)
    }
}

/// How QEMU classifies an L2 entry (`qcow2_get_cluster_type`), reserved bits ignored. With
/// extended L2 entries bit 0 is not a zero flag: zero reads are in the subcluster bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

pub(crate) fn cluster_type(entry: u64, extended_l2: bool) -> ClusterType {
    if entry & COMPRESSED != 0 {
        ClusterType::Compressed
    } else if entry & ZERO != 0 && !extended_l2 {
        if entry & OFFSET_MASK != 0 {
            ClusterType::ZeroAlloc
        } else {
            ClusterType::ZeroPlain
        }
    } else if entry & OFFSET_MASK == 0 {
        ClusterType::Unallocated
    } else {
        ClusterType::Normal
    }
}

/// [`cluster_type`] of an L2 entry of an image that may have an external data file, where
/// host offset 0 is a data cluster when the entry has COPIED (qcow2.rst; QEMU's
/// `qcow2_get_cluster_type`).
pub(super) fn cluster_type_in(entry: u64, extended_l2: bool, data_file: bool) -> ClusterType {
    match cluster_type(entry, extended_l2) {
        ClusterType::Unallocated if data_file && entry & !ZERO == crate::qcow2::entry::COPIED => {
            ClusterType::Normal
        }
        kind => kind,
    }
}

/// Subcluster bitmap (second word of an extended L2 entry): allocated subclusters...
pub(super) const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// ...and subclusters that read as zero.
pub(super) const BITMAP_ALL_ZEROES: u64 = 0xffff_ffff << 32;

/// A check that cannot go on, with the `strerror` text qemu-img prints ("Check failed: ...").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fail {
    pub errno: String,
}

impl Fail {
    fn new(errno: &str) -> Self {
        Fail {
            errno: errno.to_string(),
        }
    }
    pub fn io() -> Self {
        Fail::new("Input/output error")
    }
    pub fn no_memory() -> Self {
        Fail::new("Cannot allocate memory")
    }
    pub fn invalid() -> Self {
        Fail::new("Invalid argument")
    }
    pub fn too_large() -> Self {
        Fail::new("File too large")
    }
    /// The OS error text of an I/O error, without Rust's " (os error N)".
    pub fn from_error(e: &Error) -> Self {
        let text = match e {
            Error::Io { source, .. } => {
                let s = source.to_string();
                s.split(" (os error").next().unwrap_or(&s).to_string()
            }
            _ => "Input/output error".to_string(),
        };
        Fail { errno: text }
    }
}

/// QEMU's `BdrvCheckMode` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fix {
    pub leaks: bool,
    pub errors: bool,
}

impl Fix {
    pub const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };
    pub const LEAKS: Fix = Fix {
        leaks: true,
        errors: false,
    };
    pub fn any(self) -> bool {
        self.leaks || self.errors
    }
}

impl From<Option<Repair>> for Fix {
    fn from(r: Option<Repair>) -> Fix {
        match r {
            None => Fix::NONE,
            Some(Repair::Leaks) => Fix::LEAKS,
            Some(Repair::All) => Fix {
                leaks: true,
                errors: true,
            },
        }
    }
}

/// QEMU's `BdrvCheckResult` counters (signed: repairs count a finding, then take it back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub corruptions: i64,
    pub leaks: i64,
    pub check_errors: i64,
    pub corruptions_fixed: i64,
    pub leaks_fixed: i64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.corruptions += o.corruptions;
        self.leaks += o.leaks;
        self.check_errors += o.check_errors;
        self.corruptions_fixed += o.corruptions_fixed;
        self.leaks_fixed += o.leaks_fixed;
    }
}

/// Allocation statistics of the active L1 table (QEMU's `BlockFragInfo`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Frag {
    pub total: u64,
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
}

/// The outcome of one check pass (one `bdrv_check` call).
#[derive(Debug, Clone, Default)]
pub(super) struct Pass {
    pub res: Counts,
    pub frag: Frag,
    pub image_end: u64,
    pub failure: Option<String>,
}

impl Pass {
    fn failed(errno: &str) -> Pass {
        Pass {
            failure: Some(errno.to_string()),
            ..Pass::default()
        }
    }
}

/// Metadata regions a write may be checked against (what to leave out of the check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Overlap {
    /// Check against everything.
    Nothing,
    ActiveL2,
    InactiveL2,
}

/// One check of one image.
#[derive(Debug)]
pub(super) struct Checker {
    img: Image,
    snapshots: Vec<Snapshot>,
    /// Bytes of the snapshot table.
    snapshots_size: u64,
    msgs: Vec<CheckMessage>,
    /// A corruption was signalled (QEMU says so once).
    signaled: bool,
    /// The image was marked corrupt while writable; QEMU then refuses further checks.
    dead: bool,
}

impl Checker {
    fn new(img: Image) -> Self {
        Checker {
            img,
            snapshots: Vec::new(),
            snapshots_size: 0,
            msgs: Vec::new(),
            signaled: false,
            dead: false,
        }
    }

    /// A line QEMU prints with `fprintf(stderr, ...)`.
    fn say(&mut self, text: String) {
        self.msgs.push(CheckMessage {
            text,
            reported: false,
        });
    }

    /// A line QEMU prints with `error_report` (prefixed with the program name).
    fn report(&mut self, text: String) {
        self.msgs.push(CheckMessage {
            text,
            reported: true,
        });
    }

    /// QEMU's `qcow2_signal_corruption`: said once; a writable image is marked corrupt.
    fn signal_corruption(&mut self, what: &str) {
        if self.signaled {
            return;
        }
        self.signaled = true;
        if self.img.writable {
            self.say(format!(
                "qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"
            ));
            let features = self.img.header.incompatible_features | incompat::CORRUPT;
            if self.img.header.version >= 3 && self.img.write_u64(72, features).is_ok() {
                self.img.header.incompatible_features = features;
            }
            self.dead = true;
        } else {
            self.say(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            ));
        }
    }

    /// The metadata `offset..offset+size` would overwrite, if any (QEMU's default "cached"
    /// overlap checks: everything but inactive L2 tables).
    fn overlaps(&self, offset: u64, size: u64, ignore: Overlap) -> Option<&'static str> {
        let cs = self.img.cluster_size();
        if size == 0 {
            return None;
        }
        if offset < cs {
            return Some("qcow2_header");
        }
        let start = u128::from(offset & !(cs - 1));
        let end = u128::from((offset + size).next_multiple_of(cs));
        let hits = |o: u64, len: u64| {
            len > 0 && start < u128::from(o) + u128::from(len) && u128::from(o) < end
        };
        let h = &self.img.header;
        if hits(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            return Some("active L1 table");
        }
        if hits(h.refcount_table_offset, self.img.reftable.len() as u64 * 8) {
            return Some("refcount table");
        }
        if hits(h.snapshots_offset, self.snapshots_size) {
            return Some("snapshot table");
        }
        if self
            .snapshots
            .iter()
            .any(|s| hits(s.l1_table_offset, u64::from(s.l1_size) * 8))
        {
            return Some("inactive L1 table");
        }
        if ignore != Overlap::ActiveL2 && self.img.l1.iter().any(|e| hits(e & OFFSET_MASK, cs)) {
            return Some("active L2 table");
        }
        if self
            .img
            .reftable
            .iter()
            .any(|e| hits(e & !image::REFT_RESERVED, cs))
        {
            return Some("refcount block");
        }
        if let Some((dir, len)) = self.img.bitmaps.map(|b| b.directory()) {
            if hits(dir, len) {
                return Some("bitmap directory");
            }
        }
        None
    }

    /// One check (QEMU's `qcow2_co_check_locked`).
    fn run(&mut self, fix: Fix) -> Pass {
        let mut snap = Counts::default();
        if let Err(e) = self.check_snapshot_table(&mut snap, fix) {
            let mut p = Pass::failed(&e.errno);
            p.res = snap;
            return p;
        }
        let mut pass = Pass::default();
        let outcome = self.check_refcounts(&mut pass.res, &mut pass.frag, fix);
        match outcome {
            Ok(end) => pass.image_end = end,
            Err(e) => {
                pass.res.add(&snap);
                pass.failure = Some(e.errno);
                return pass;
            }
        }
        let fixed = self.fix_snapshot_table(&mut snap, fix);
        pass.res.add(&snap);
        if let Err(e) = fixed {
            pass.failure = Some(e.errno);
            return pass;
        }
        if fix.any() && pass.res.check_errors == 0 && pass.res.corruptions == 0 {
            if let Err(e) = self.mark_clean() {
                pass.failure = Some(e.errno);
            }
        }
        pass
    }

    /// Clears the dirty and corrupt bits after a successful repair.
    fn mark_clean(&mut self) -> Result<(), Fail> {
        self.clear_incompat(incompat::DIRTY | incompat::CORRUPT)
    }

    /// Clears incompatible feature bits in the header (version 3 only has them).
    fn clear_incompat(&mut self, bits: u64) -> Result<(), Fail> {
        let features = self.img.header.incompatible_features;
        let clean = features & !bits;
        if clean != features && self.img.header.version >= 3 {
            self.img.sync()?;
            self.img.write_u64(72, clean)?;
            self.img.sync()?;
            self.img.header.incompatible_features = clean;
        }
        Ok(())
    }

    /// Walks the metadata, compares and repairs refcounts (QEMU's `qcow2_check_refcounts`).
    /// Returns the image end offset.
    fn check_refcounts(
        &mut self,
        res: &mut Counts,
        frag: &mut Frag,
        fix: Fix,
    ) -> Result<u64, Fail> {
        let cs = self.img.cluster_size();
        let nb_clusters = self.img.file_len().div_ceil(cs);
        if nb_clusters > i32::MAX as u64 {
            res.check_errors += 1;
            return Err(Fail::too_large());
        }
        frag.total = (self.img.header.size / 512 * 512).div_ceil(cs);
        let mut arr = RefArray::new(
            self.img.header.refcount_order,
            self.img.cluster_bits,
            nb_clusters,
        );
        let mut rebuild = false;
        self.calculate(res, frag, &mut arr, fix, &mut rebuild)?;
        let before_compare = *res;
        let mut highest = self.compare(res, &arr, Fix::NONE, &mut rebuild);
        if rebuild && fix.errors {
            let old = *res;
            self.say("Rebuilding refcount structure".into());
            self.rebuild(res, &mut arr)?;
            res.corruptions = 0;
            res.leaks = 0;
            rebuild = false;
            arr.clear();
            self.calculate(res, frag, &mut arr, Fix::NONE, &mut rebuild)?;
            let mut fresh_leaks = 0;
            if fix.leaks {
                // The old structure is now leaked; what cannot be fixed was leaked by the
                // rebuild itself.
                let saved = *res;
                *res = Counts::default();
                highest = self.compare(res, &arr, Fix::LEAKS, &mut rebuild);
                if rebuild {
                    self.say("ERROR rebuilt refcount structure is still broken".into());
                }
                fresh_leaks = res.leaks;
                *res = saved;
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if fix.any() {
            if rebuild {
                self.say("ERROR need to rebuild refcount structures".into());
                res.check_errors += 1;
                return Err(Fail::io());
            }
            if res.leaks != 0 || res.corruptions != 0 {
                *res = before_compare;
                highest = self.compare(res, &arr, fix, &mut rebuild);
            }
        }
        self.check_copied(res, fix)?;
        Ok((highest + 1) * cs)
    }
}

/// `printf("%#x")`: `0x` before nonzero values only.
pub(super) fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_classify_like_qemu() {
        assert_eq!(cluster_type(0, false), ClusterType::Unallocated);
        assert_eq!(cluster_type(ZERO, false), ClusterType::ZeroPlain);
        assert_eq!(cluster_type(ZERO | 0x5_0000, false), ClusterType::ZeroAlloc);
        assert_eq!(cluster_type(0x5_0000, false), ClusterType::Normal);
        assert_eq!(
            cluster_type(COMPRESSED | 0x5_0123, false),
            ClusterType::Compressed
        );
        // With subclusters bit 0 means nothing to the type.
        assert_eq!(cluster_type(ZERO, true), ClusterType::Unallocated);
        assert_eq!(cluster_type(ZERO | 0x5_0000, true), ClusterType::Normal);
    }

    #[test]
    fn hex_is_printed_like_c() {
        assert_eq!(c_hex(0), "0");
        assert_eq!(c_hex(0x50200), "0x50200");
    }

    #[test]
    fn reports_print_like_qemu_img() {
        let mut r = CheckReport {
            leaks: 2,
            total_clusters: 1024,
            allocated_clusters: 4,
            image_end_offset: 720896,
            ..CheckReport::default()
        };
        assert_eq!(
            r.human(),
            "\n2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n4/1024 = 0.39% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 720896\n"
        );
        assert_eq!(r.exit_code(), 3);
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        r.check_errors = 1;
        assert_eq!(
            (r.exit_code(), r.failure_line().unwrap()),
            (1, "Check failed".into())
        );
        let keys: Vec<&str> = r.json_fields().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "image-end-offset",
                "total-clusters",
                "corruptions",
                "check-errors",
                "leaks",
                "allocated-clusters",
                "filename",
                "format"
            ]
        );
    }
}
