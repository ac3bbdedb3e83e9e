//! The older ioctl interface of `/dev/nbdN` (`include/uapi/linux/nbd.h`), used when the netlink
//! family is unavailable. The configuration is computed as a plan of ioctl calls (unit-tested),
//! then applied; `NBD_DO_IT` blocks for the life of the connection, so it runs on its own thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IO(0xab, n)`: no direction, no size, type 0xab.
const fn nbd_io(n: u64) -> u64 {
    (0xab << 8) | n
}

pub const NBD_SET_SOCK: u64 = nbd_io(0);
pub const NBD_SET_BLKSIZE: u64 = nbd_io(1);
pub const NBD_DO_IT: u64 = nbd_io(3);
pub const NBD_CLEAR_SOCK: u64 = nbd_io(4);
pub const NBD_CLEAR_QUE: u64 = nbd_io(5);
pub const NBD_SET_SIZE_BLOCKS: u64 = nbd_io(7);
pub const NBD_DISCONNECT: u64 = nbd_io(8);
pub const NBD_SET_TIMEOUT: u64 = nbd_io(9);
pub const NBD_SET_FLAGS: u64 = nbd_io(10);

/// One ioctl with its argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub request: u64,
    pub arg: u64,
}

/// What the ioctl configuration needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub size: u64,
    pub block_size: u64,
    pub timeout: Option<u64>,
    pub flags: u64,
    pub fds: Vec<i32>,
}

/// The calls that configure a device before `NBD_DO_IT`: clear a stale socket, block size, size
/// in blocks (a trailing partial block is not addressable by the kernel anyway), flags, the
/// optional timeout, then one `NBD_SET_SOCK` per connection.
pub fn plan(p: &Params) -> Vec<Call> {
    let mut calls = vec![
        Call {
            request: NBD_CLEAR_SOCK,
            arg: 0,
        },
        Call {
            request: NBD_SET_BLKSIZE,
            arg: p.block_size,
        },
        Call {
            request: NBD_SET_SIZE_BLOCKS,
            arg: p.size / p.block_size,
        },
        Call {
            request: NBD_SET_FLAGS,
            arg: p.flags,
        },
    ];
    if let Some(t) = p.timeout {
        calls.push(Call {
            request: NBD_SET_TIMEOUT,
            arg: t,
        });
    }
    for &fd in &p.fds {
        calls.push(Call {
            request: NBD_SET_SOCK,
            arg: fd as u64,
        });
    }
    calls
}

/// Issues one ioctl on an open `/dev/nbdN`.
pub fn call(dev: &File, c: Call) -> io::Result<()> {
    // SAFETY: every NBD ioctl takes its argument by value (an integer, never a pointer), so
    // the kernel reads no user memory; `dev` is an open descriptor for the whole call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), c.request as _, c.arg as libc::c_ulong) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Asks the kernel to disconnect: queued requests are failed, the server gets `NBD_CMD_DISC`,
/// and the thread in `NBD_DO_IT` returns.
pub fn disconnect(path: &Path) -> io::Result<()> {
    let dev = open(path)?;
    call(
        &dev,
        Call {
            request: NBD_DISCONNECT,
            arg: 0,
        },
    )?;
    // Clearing may fail with EBUSY while the DO_IT thread is still finishing; that is fine.
    let _ = call(
        &dev,
        Call {
            request: NBD_CLEAR_SOCK,
            arg: 0,
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        assert_eq!(NBD_SET_SOCK, 0xab00);
        assert_eq!(NBD_SET_BLKSIZE, 0xab01);
        assert_eq!(NBD_DO_IT, 0xab03);
        assert_eq!(NBD_CLEAR_SOCK, 0xab04);
        assert_eq!(NBD_CLEAR_QUE, 0xab05);
        assert_eq!(NBD_SET_SIZE_BLOCKS, 0xab07);
        assert_eq!(NBD_DISCONNECT, 0xab08);
        assert_eq!(NBD_SET_TIMEOUT, 0xab09);
        assert_eq!(NBD_SET_FLAGS, 0xab0a);
    }

    #[test]
    fn plan_configures_then_adds_every_socket() {
        let calls = plan(&Params {
            size: (1 << 30) + 100,
            block_size: 4096,
            timeout: Some(30),
            flags: 0x10d,
            fds: vec![7, 8],
        });
        let got: Vec<(u64, u64)> = calls.iter().map(|c| (c.request, c.arg)).collect();
        assert_eq!(
            got,
            [
                (0xab04, 0),
                (0xab01, 4096),
                (0xab07, (1 << 30) / 4096),
                (0xab0a, 0x10d),
                (0xab09, 30),
                (0xab00, 7),
                (0xab00, 8),
            ]
        );
        let no_timeout = plan(&Params {
            size: 4096,
            block_size: 512,
            timeout: None,
            flags: 1,
            fds: vec![3],
        });
        assert!(no_timeout.iter().all(|c| c.request != NBD_SET_TIMEOUT));
    }
}
