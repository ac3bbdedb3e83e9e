//! What the server exports: an image, its name, and the flags and sizes the handshake reports.

use std::sync::Arc;

use vdisk_formats::BlockDev;

use crate::proto::{TransmissionFlags, MAX_PAYLOAD};

/// Metadata contexts this server offers (section "Metadata querying").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`: bit 0 hole, bit 1 reads as zero.
    Allocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 this image, 2 its backing file, ...
    AllocationDepth,
}

impl Context {
    pub fn name(self) -> &'static str {
        match self {
            Context::Allocation => "base:allocation",
            Context::AllocationDepth => "qemu:allocation-depth",
        }
    }
}

/// One exported image.
///
/// ```
/// # use std::sync::Arc;
/// # use vdisk_formats::mem::MemDev;
/// use vdisk_nbd::Export;
/// let export = Export::new("", Arc::new(MemDev::new(1 << 20)))
///     .description("scratch disk")
///     .read_only(true);
/// assert!(export.is_read_only());
/// ```
#[derive(Clone)]
pub struct Export {
    name: String,
    description: String,
    dev: Arc<dyn BlockDev>,
    read_only: bool,
    allocation_depth: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .field("allocation_depth", &self.allocation_depth)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Exports `dev` under `name` (`""` is the default export that clients get when they give
    /// no name). Writable unless the device is read-only; `qemu:allocation-depth` is offered.
    pub fn new(name: impl Into<String>, dev: Arc<dyn BlockDev>) -> Export {
        let read_only = dev.capabilities().read_only;
        Export {
            name: name.into(),
            description: String::new(),
            dev,
            read_only,
            allocation_depth: true,
        }
    }

    /// Human-readable text for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    pub fn description(mut self, text: impl Into<String>) -> Export {
        self.description = text.into();
        self
    }

    /// Refuses writes with `EPERM` and advertises `NBD_FLAG_READ_ONLY`. A device that is itself
    /// read-only stays read-only.
    pub fn read_only(mut self, read_only: bool) -> Export {
        self.read_only = read_only || self.dev.capabilities().read_only;
        self
    }

    /// Whether `qemu:allocation-depth` is offered (like `qemu-nbd -A`; on by default).
    pub fn allocation_depth(mut self, on: bool) -> Export {
        self.allocation_depth = on;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn text(&self) -> &str {
        &self.description
    }

    pub fn dev(&self) -> &Arc<dyn BlockDev> {
        &self.dev
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn size(&self) -> u64 {
        self.dev.size()
    }

    /// The contexts a client may select on this export.
    pub fn contexts(&self) -> Vec<Context> {
        let mut v = vec![Context::Allocation];
        if self.allocation_depth {
            v.push(Context::AllocationDepth);
        }
        v
    }

    /// Minimum, preferred and maximum block sizes for `NBD_INFO_BLOCK_SIZE` ("Size
    /// constraints"): minimum a power of two up to 64 KiB, preferred 4 KiB or the minimum if
    /// larger (what qemu-nbd advertises whatever the format: clients such as the kernel then
    /// send page-sized requests), maximum payload 32 MiB.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let caps = self.dev.capabilities();
        let min = caps.min_block.clamp(1, 65536).next_power_of_two();
        (min, min.max(4096), MAX_PAYLOAD)
    }

    /// The transmission flags for a connection. `structured` adds `SEND_DF` (the spec requires
    /// it to be clear without structured replies); `multi_conn` says whether other connections
    /// may share the export. Flushes are consistent across connections because all of them use
    /// the one `BlockDev` of this process, so `CAN_MULTI_CONN` is set whenever sharing is allowed.
    pub fn flags(&self, structured: bool, multi_conn: bool) -> TransmissionFlags {
        type F = TransmissionFlags;
        let mut f = F::HAS_FLAGS | F::SEND_FLUSH | F::SEND_FUA | F::SEND_CACHE;
        if self.read_only {
            f |= F::READ_ONLY;
        } else {
            f |= F::SEND_TRIM | F::SEND_WRITE_ZEROES | F::SEND_FAST_ZERO;
        }
        if structured {
            f |= F::SEND_DF;
        }
        if multi_conn {
            f |= F::CAN_MULTI_CONN;
        }
        TransmissionFlags(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_formats::mem::MemDev;

    #[test]
    fn writable_export_advertises_write_commands() {
        let e = Export::new("x", Arc::new(MemDev::new(4096)));
        let f = e.flags(true, true);
        assert_eq!(
            f.0,
            0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0080 | 0x0100 | 0x0400 | 0x0800
        );
        let f = e.flags(false, false);
        assert!(!f.has(TransmissionFlags::SEND_DF));
        assert!(!f.has(TransmissionFlags::CAN_MULTI_CONN));
    }

    #[test]
    fn read_only_export_drops_write_flags() {
        let e = Export::new("x", Arc::new(MemDev::new(4096))).read_only(true);
        let f = e.flags(true, true);
        assert!(f.has(TransmissionFlags::READ_ONLY));
        assert!(!f.has(TransmissionFlags::SEND_TRIM));
        assert!(!f.has(TransmissionFlags::SEND_FAST_ZERO));
        assert!(f.has(TransmissionFlags::SEND_FLUSH));
    }

    #[test]
    fn block_sizes_follow_the_device() {
        let e = Export::new("x", Arc::new(MemDev::new(4096)));
        assert_eq!(e.block_sizes(), (1, 4096, 32 << 20));
        assert_eq!(
            e.contexts(),
            vec![Context::Allocation, Context::AllocationDepth]
        );
        assert_eq!(
            e.allocation_depth(false).contexts(),
            vec![Context::Allocation]
        );
    }
}
