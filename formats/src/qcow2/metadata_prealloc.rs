//! QEMU's guess whether an image was created with `preallocation=metadata` (its
//! `qcow2_detect_metadata_preallocation`): many more clusters are allocated (have a refcount)
//! than the host file really stores. Only for such images does QEMU ask the host file which
//! data clusters are holes, and report those as reading zero (`map`, `measure`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::Qcow2;
use crate::error::{Error, Result};

impl Qcow2 {
    /// Whether the allocated clusters outnumber the clusters the host file stores by more than
    /// a ninth (and by more than two).
    pub fn metadata_preallocated(&self) -> Result<bool> {
        let file = self.file.file();
        let meta = file
            .metadata()
            .map_err(|e| Error::io(self.path(), "cannot stat", e))?;
        let cs = self.geo.cluster_size();
        let real_clusters = meta.blocks() * 512 / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let clusters_in_file = meta.len().div_ceil(cs);
        let allocated = self
            .refcounts()?
            .keys()
            .filter(|&&c| c < clusters_in_file)
            .count() as u64;
        Ok(allocated > threshold)
    }
}

/// [`Qcow2::metadata_preallocated`] of the image at `path` (opened read-only, without its
/// backing file).
pub fn metadata_preallocated(path: &Path) -> Result<bool> {
    Qcow2::open_with(path, true, None)?.metadata_preallocated()
}
