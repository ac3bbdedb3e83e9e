//! An image exported as a single regular file through FUSE, for machines without the nbd
//! module: attach the file to a loop device (`losetup -P`) and mount its partitions.
//!
//! ```text
//!   losetup / cat / dd ──> DIR/disk (FUSE) ──> FuseFile ──> Arc<dyn BlockDev>
//!        read, write ─────────────────────────> read_at / write_at
//!        fsync ───────────────────────────────> flush
//!        fallocate(PUNCH_HOLE | ZERO_RANGE) ──> write_zeroes (the range reads back as zero)
//! ```
//!
//! The mount point is either a directory (the image appears as `DIR/<file_name>`, like
//! `nbdfuse DIR/FILE`) or an existing regular file, which the image then replaces. The file has
//! the image's size and cannot be resized. Requests run on several FUSE threads at once, which
//! the thread-safe [`BlockDev`] allows.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, TimeOrNow, WriteFlags,
};
use vdisk_formats::{BlockDev, ZeroFlags};

/// How to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseOptions {
    /// Name of the file when the mount point is a directory.
    pub file_name: String,
    /// Refuse writes (`EROFS`) even if the device is writable.
    pub read_only: bool,
    /// Let other users (and root) open the file (`allow_other`; non-root users need
    /// `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
    /// FUSE worker threads.
    pub threads: usize,
}

impl Default for FuseOptions {
    fn default() -> FuseOptions {
        FuseOptions {
            file_name: "disk".into(),
            read_only: false,
            allow_other: false,
            threads: 4,
        }
    }
}

/// A mounted image. Dropping it unmounts (like [`FuseMount::unmount`]).
pub struct FuseMount {
    session: BackgroundSession,
    file: PathBuf,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl FuseMount {
    /// The path of the image file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Unmounts and waits for the FUSE threads to finish.
    pub fn unmount(self) -> io::Result<()> {
        self.session.umount_and_join()
    }

    /// Waits until the file system is unmounted from outside (`fusermount3 -u`, `umount`).
    pub fn join(self) -> io::Result<()> {
        self.session.join()
    }
}

/// Mounts `dev` at `mountpoint` (a directory or a regular file) and serves it on background
/// threads until the returned handle is dropped or the file system is unmounted.
pub fn mount(
    mountpoint: &Path,
    dev: Arc<dyn BlockDev>,
    opts: &FuseOptions,
) -> io::Result<FuseMount> {
    let meta = std::fs::metadata(mountpoint)?;
    let file_root = meta.is_file();
    let read_only = opts.read_only || dev.capabilities().read_only;
    let file = if file_root {
        mountpoint.to_path_buf()
    } else {
        mountpoint.join(&opts.file_name)
    };
    let mut mount_options = vec![
        MountOption::FSName("vdisk".into()),
        MountOption::Subtype("vdisk".into()),
    ];
    if read_only {
        mount_options.push(MountOption::RO);
    }
    let mut config = Config::default();
    config.mount_options = mount_options;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = FuseFile {
        dev,
        file_root,
        name: opts.file_name.clone(),
        read_only,
        uid,
        gid,
        mounted_at: SystemTime::now(),
    };
    let session = fuser::spawn_mount(fs, mountpoint, &config)?;
    Ok(FuseMount { session, file })
}

const ROOT: INodeNo = INodeNo(1);
/// The image file's inode when the root is a directory.
const FILE: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);
/// Largest write (and readahead) the kernel is told to send in one request: a larger write
/// reaches the file system split into pieces of at most this size.
pub const MAX_WRITE: u32 = 1 << 20;

struct FuseFile {
    dev: Arc<dyn BlockDev>,
    /// The mount point itself is the image file (inode 1).
    file_root: bool,
    name: String,
    read_only: bool,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

fn errno(e: &vdisk_formats::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl FuseFile {
    fn is_file(&self, ino: INodeNo) -> bool {
        if self.file_root {
            ino == ROOT
        } else {
            ino == FILE
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let t = self.mounted_at;
        let mut a = FileAttr {
            ino,
            size: 0,
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        if self.is_file(ino) {
            let size = self.dev.size();
            a.kind = FileType::RegularFile;
            a.perm = if self.read_only { 0o400 } else { 0o600 };
            a.nlink = 1;
            a.size = size;
            a.blocks = size.div_ceil(512);
            a.blksize = self.dev.capabilities().preferred_block.clamp(512, 1 << 20);
        } else if ino != ROOT {
            return None;
        }
        Some(a)
    }

    /// Clips `offset..offset+len` to the file; `None` when it starts past the end.
    fn clip(&self, offset: u64, len: u64) -> Option<u64> {
        let size = self.dev.size();
        (offset <= size).then(|| len.min(size - offset))
    }
}

impl Filesystem for FuseFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if self.file_root || parent != ROOT || name != OsStr::new(&self.name) {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(FILE) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The file cannot be resized, chmod-ed or chown-ed; time updates are accepted and
        // ignored so that tools touching the file do not fail.
        if size.is_some_and(|s| s != self.dev.size()) {
            return reply.error(Errno::EPERM);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !self.is_file(ino) {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if !self.is_file(ino) {
            return reply.error(Errno::EISDIR);
        }
        let Some(len) = self.clip(offset, u64::from(size)) else {
            return reply.data(&[]);
        };
        let mut buf = vec![0u8; len as usize];
        match self.dev.read_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if !self.is_file(ino) {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        if self.clip(offset, data.len() as u64) != Some(data.len() as u64) {
            // The file has the image's size and cannot grow.
            return reply.error(Errno::EFBIG);
        }
        match self.dev.write_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() is not a durability point; fsync is.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.dev.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if !self.is_file(ino) {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        let flags = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            // Punched holes read as zero afterwards, so this is write-zeroes that may unmap.
            m if m == libc::FALLOC_FL_PUNCH_HOLE && mode & punch == punch => ZeroFlags {
                may_unmap: true,
                fast_only: false,
            },
            m if m == zero => ZeroFlags::default(),
            // Plain allocation inside the file: every byte is already addressable.
            0 => {
                return match self.clip(offset, length) {
                    Some(n) if n == length => reply.ok(),
                    _ => reply.error(Errno::EFBIG),
                };
            }
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        let Some(len) = self.clip(offset, length) else {
            return reply.ok();
        };
        match self.dev.write_zeroes(offset, len, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if self.file_root || ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, self.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.dev.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }
}
