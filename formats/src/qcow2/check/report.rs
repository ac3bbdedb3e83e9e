//! What a check found, and how qemu-img prints it: the human summary, the JSON report and the
//! exit code.

use std::fmt::Write as _;
use std::path::Path;

use super::Pass;

/// A line the check printed to stderr while it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckMessage {
    pub text: String,
    /// qemu-img prints this line through `error_report`, prefixed with the program name
    /// (`qemu-img: `); the others go out as they are.
    pub reported: bool,
}

/// The result of `check`, shaped like qemu-img's `ImageCheck`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The file name as given.
    pub filename: String,
    /// Always `qcow2`.
    pub format: String,
    /// Internal errors: the check could not look at everything.
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Clusters the active L1 table maps to host clusters (compressed ones included).
    pub allocated_clusters: u64,
    /// Allocated clusters not right after the previous one of their L2 table, plus every
    /// compressed cluster.
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// End of the last cluster in use or with a refcount.
    pub image_end_offset: u64,
    /// stderr lines, in order.
    pub messages: Vec<CheckMessage>,
    /// A repair fixed something and the image was checked again: the counts are those of the
    /// second check, the `*_fixed` ones those of the repair.
    pub rechecked: bool,
    /// The check could not complete (qemu-img: "Check failed: <this>", exit 1, no report).
    pub failure: Option<String>,
}

impl CheckReport {
    pub(super) fn new(path: &Path, pass: &Pass) -> Self {
        let mut r = CheckReport {
            filename: path.display().to_string(),
            format: "qcow2".into(),
            corruptions_fixed: pass.res.corruptions_fixed.max(0) as u64,
            leaks_fixed: pass.res.leaks_fixed.max(0) as u64,
            ..CheckReport::default()
        };
        r.set_numbers(pass);
        r
    }

    /// Takes the findings of `pass` (the fixed counts stay those of the repair).
    pub(super) fn set_numbers(&mut self, pass: &Pass) {
        let n = |v: i64| v.max(0) as u64;
        self.check_errors = n(pass.res.check_errors);
        self.corruptions = n(pass.res.corruptions);
        self.leaks = n(pass.res.leaks);
        self.total_clusters = pass.frag.total;
        self.allocated_clusters = pass.frag.allocated;
        self.fragmented_clusters = pass.frag.fragmented;
        self.compressed_clusters = pass.frag.compressed;
        self.image_end_offset = pass.image_end;
        self.failure = pass.failure.clone();
    }

    /// qemu-img's exit status: 0 clean (or fully repaired), 1 the check failed or had internal
    /// errors, 2 corruptions remain, 3 only leaks remain.
    pub fn exit_code(&self) -> i32 {
        if self.failure.is_some() || self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The last line qemu-img prints on stderr (after the report), if any: the check failed or
    /// had internal errors. It goes out through `error_report` (`qemu-img: Check failed...`).
    pub fn failure_line(&self) -> Option<String> {
        match &self.failure {
            Some(why) => Some(format!("Check failed: {why}")),
            None if self.check_errors > 0 => Some("Check failed".into()),
            None => None,
        }
    }

    /// What `qemu-img check` prints on stdout (human output).
    pub fn human(&self) -> String {
        let mut out = String::new();
        if self.rechecked {
            let _ = write!(
                out,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            );
        }
        if self.failure.is_some() {
            return out;
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            out.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                let _ = write!(
                    out,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                let _ = write!(
                    out,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                let _ = write!(
                    out,
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let alloc = self.allocated_clusters as f64;
            let _ = writeln!(
                out,
                "{}/{} = {}% allocated, {}% fragmented, {}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                percent(alloc * 100.0 / self.total_clusters as f64),
                percent(self.fragmented_clusters as f64 * 100.0 / alloc),
                percent(self.compressed_clusters as f64 * 100.0 / alloc),
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(out, "Image end offset: {}", self.image_end_offset);
        }
        out
    }

    /// The fields of `qemu-img check --output=json`, in the order qemu-img prints them, each
    /// optional one only when it is nonzero (as qemu-img leaves them out). Nothing is printed
    /// when the check failed.
    pub fn json_fields(&self) -> Vec<(&'static str, JsonValue)> {
        let mut fields = Vec::new();
        let mut num = |key: &'static str, v: u64, always: bool| {
            if always || v != 0 {
                fields.push((key, JsonValue::Int(v)));
            }
        };
        // QEMU prints a QDict, whose order is that of its hash buckets.
        num("image-end-offset", self.image_end_offset, false);
        num("compressed-clusters", self.compressed_clusters, false);
        num("total-clusters", self.total_clusters, false);
        num("corruptions", self.corruptions, false);
        num("corruptions-fixed", self.corruptions_fixed, false);
        num("check-errors", self.check_errors, true);
        num("leaks", self.leaks, false);
        num("leaks-fixed", self.leaks_fixed, false);
        num("allocated-clusters", self.allocated_clusters, false);
        fields.push(("filename", JsonValue::Str(self.filename.clone())));
        fields.push(("format", JsonValue::Str(self.format.clone())));
        if self.fragmented_clusters != 0 {
            fields.push((
                "fragmented-clusters",
                JsonValue::Int(self.fragmented_clusters),
            ));
        }
        fields
    }
}

/// A value of the JSON report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonValue {
    Int(u64),
    Str(String),
}

/// `printf("%0.2f")`: two decimals, ties to even on the exact binary value (as glibc does).
fn percent(v: f64) -> String {
    format!("{v:.2}")
}
