//! Images whose guest data lives in an external data file (qcow2.rst, "External data file"):
//! the data cluster of guest offset G sits at offset G of the data file, data clusters are not
//! refcounted, and neither compressed clusters nor internal snapshots exist.
//!
//! The qcow2 file keeps only metadata. Allocating a cluster therefore takes no space there; a
//! cluster that loses its mapping (discard, write-zeroes with unmap) has its range discarded in
//! the data file, as QEMU's `qcow2_free_any_cluster` does. With `data_file_raw` the data file
//! stays a consistent raw image on its own: zeroes written to the image are written to it too.

use std::path::Path;

use super::header::{autoclear, ext, incompat, Header};
use super::overlap::Overlap;
use super::{Meta, Qcow2};
use crate::chain;
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::image::Preallocation;

/// QEMU's answer to what an external data file rules out (compressed clusters, internal
/// snapshots): `ENOTSUP`.
pub(super) const NOT_WITH_DATA_FILE: &str = "Operation not supported";

impl Qcow2 {
    /// The file guest data is read from and written to.
    pub(super) fn data_io(&self) -> &HostFile {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// Whether the image keeps its data in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.data_file.is_some()
    }

    /// Host clusters for `n` new data clusters starting at guest offset `guest` (cluster
    /// aligned): the same offsets in an external data file, else newly allocated clusters of
    /// the image file.
    pub(super) fn alloc_data_clusters(&self, meta: &mut Meta, guest: u64, n: u64) -> Result<u64> {
        if self.data_file.is_some() {
            return Ok(guest);
        }
        self.alloc_clusters(meta, n)
    }

    /// Gives up the data cluster at `host`: its range of the data file is discarded, or its
    /// reference in the image file dropped.
    pub(super) fn release_data_cluster(&self, meta: &mut Meta, host: u64) -> Result<()> {
        match &self.data_file {
            Some(f) => f.punch_hole(host, self.geo.cluster_size()).map(|_| ()),
            None => self.free_clusters(meta, host, 1),
        }
    }

    /// Whether guest data shares the image file with the metadata.
    pub(super) fn data_shares_image_file(&self) -> bool {
        self.data_file.is_none()
    }

    /// The metadata a data write of `len` bytes at `host` would overwrite; never any when the
    /// data goes to an external data file.
    pub(super) fn data_overlap(&self, host: u64, len: u64) -> Option<Overlap> {
        self.data_file
            .is_none()
            .then(|| self.metadata.overlap(host, len))
            .flatten()
    }

    /// With `data_file_raw`: writes zeroes to guest bytes `offset..offset+len` of the data file,
    /// which must read like the image on its own (QEMU's `qcow2_subcluster_zeroize`).
    pub(super) fn zero_raw_data_file(&self, offset: u64, len: u64) -> Result<()> {
        let Some(f) = self.data_file.as_ref().filter(|_| self.data_file_is_raw()) else {
            return Ok(());
        };
        if !f.zero_range(offset, len)? {
            f.write_zero_bytes(offset, len)?;
        }
        Ok(())
    }

    /// Whether the external data file must stay a valid raw image (`data_file_raw`): then every
    /// guest cluster stays mapped to it.
    pub(super) fn data_file_is_raw(&self) -> bool {
        self.data_file.is_some()
            && self.meta.lock().unwrap().header.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Fails for what an image with an external data file cannot hold.
    pub(super) fn check_no_data_file(&self) -> Result<()> {
        if self.data_file.is_some() {
            return Err(Error::unsupported(self.path(), NOT_WITH_DATA_FILE));
        }
        Ok(())
    }

    /// Gives an external data file the image's new size (QEMU truncates it with the image), the
    /// new space reserved (falloc) or written (full) as `prealloc` says.
    pub(super) fn resize_data_file(
        &self,
        old: u64,
        new: u64,
        prealloc: Preallocation,
    ) -> Result<()> {
        let Some(f) = &self.data_file else {
            return Ok(());
        };
        f.set_len(new)?;
        if new > old {
            match prealloc {
                Preallocation::Falloc => f.allocate(old, new - old)?,
                Preallocation::Full => f.write_zero_bytes(old, new - old)?,
                Preallocation::Off | Preallocation::Metadata => {}
            }
        }
        f.sync()
    }

    /// Makes writes to the data file durable too.
    pub(super) fn sync_data_file(&self) -> Result<()> {
        match &self.data_file {
            Some(f) => f.sync(),
            None => Ok(()),
        }
    }
}

/// Opens the external data file an image names (qcow2.rst, "External data file name"), resolved
/// like a backing file name; writable when the image is.
pub(super) fn open_data_file(
    path: &Path,
    h: &Header,
    policy: chain::BackingPolicy,
    read_only: bool,
) -> Result<Option<HostFile>> {
    if h.incompatible_features & incompat::DATA_FILE == 0 {
        return Ok(None);
    }
    let Some(name) = h.extension(ext::DATA_FILE) else {
        return Err(Error::invalid(
            path,
            "the external data file bit is set but the image names no data file",
        ));
    };
    let name = String::from_utf8_lossy(name);
    policy.check_data_file(path, &name)?;
    let data_path = chain::resolve_backing(path, &name)?;
    HostFile::open(&data_path, read_only).map(Some)
}
