//! Sending replies from many worker threads over one socket.
//!
//! Each reply (a simple reply, or all chunks of one structured reply) is written under one lock,
//! so chunks never interleave mid-header. Replies of different requests go out in whatever order
//! the workers finish. If the socket breaks, it is shut down so the request reader stops too.

use std::io::Write;
use std::net::Shutdown;
use std::sync::Mutex;

use crate::proto::{Errno, Reply, ReplyMode};
use crate::transport::{write_all_vectored, Socket};

pub(crate) struct ReplySink {
    mode: ReplyMode,
    writer: Mutex<Box<dyn Write + Send>>,
    socket: Socket,
}

impl ReplySink {
    pub fn new(mode: ReplyMode, writer: Box<dyn Write + Send>, socket: Socket) -> ReplySink {
        ReplySink {
            mode,
            writer: Mutex::new(writer),
            socket,
        }
    }

    pub fn mode(&self) -> ReplyMode {
        self.mode
    }

    /// Sends the chunks of one reply, the last one flagged done. Each chunk is a reply header
    /// and its data bytes (empty except for READ data).
    pub fn send(&self, cookie: u64, offset: u64, chunks: &[(Reply, &[u8])]) {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let last = chunks.len().saturating_sub(1);
        for (i, (reply, data)) in chunks.iter().enumerate() {
            let header = self.mode.encode(cookie, offset, reply, i == last);
            if let Err(e) = write_all_vectored(&mut **w, &[&header, data]) {
                log::info!("cannot send reply: {e}");
                let _ = self.socket.shutdown(Shutdown::Both);
                return;
            }
        }
        if let Err(e) = w.flush() {
            log::info!("cannot send reply: {e}");
            let _ = self.socket.shutdown(Shutdown::Both);
        }
    }

    /// A successful reply without data.
    pub fn ok(&self, cookie: u64, offset: u64) {
        self.send(cookie, offset, &[(Reply::Ok, &[])]);
    }

    /// A failed reply; `message` travels only in structured modes.
    pub fn error(&self, cookie: u64, offset: u64, errno: Errno, message: &str) {
        let reply = Reply::Error {
            errno,
            message,
            offset: None,
        };
        self.send(cookie, offset, &[(reply, &[])]);
    }
}
