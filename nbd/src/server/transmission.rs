//! The transmission phase of one connection: this thread reads requests and their payloads,
//! a pool of workers executes them concurrently and sends the replies.
//!
//! Memory is bounded per connection: before a request's buffer (WRITE payload or READ data) is
//! allocated, its size is taken from a byte budget that is given back when the reply is sent, so
//! a client cannot queue gigabytes of writes.
//!
//! The connection ends on `NBD_CMD_DISC` (outstanding requests finish, the export is flushed,
//! then the socket is closed), on end of file, or on a violation the stream cannot recover from
//! (bad magic, a payload over [`MAX_PAYLOAD`]): a hard disconnect, as the spec allows.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use super::commands::{self, Request};
use super::handshake::Negotiated;
use super::reply::ReplySink;
use super::Shared;
use crate::proto::{Command, Errno, ReplyMode, RequestError, RequestHeader, MAX_PAYLOAD};
use crate::transport::{Halves, Socket};

/// Bytes of request buffers one connection may hold at once.
const BUDGET: u64 = 4 * MAX_PAYLOAD as u64;

/// A counting semaphore over bytes.
pub(crate) struct Budget {
    free: Mutex<BudgetState>,
    cv: Condvar,
}

struct BudgetState {
    free: u64,
    /// Threads waiting for bytes: without any, returning bytes needs no wake-up call.
    waiters: usize,
}

impl Budget {
    fn new(bytes: u64) -> Budget {
        Budget {
            free: Mutex::new(BudgetState {
                free: bytes,
                waiters: 0,
            }),
            cv: Condvar::new(),
        }
    }

    /// Takes `n` bytes (at most the whole budget), waiting until they are free.
    fn take(self: &Arc<Self>, n: u64) -> Permit {
        let n = n.min(BUDGET);
        let mut state = self.free.lock().unwrap();
        while state.free < n {
            state.waiters += 1;
            state = self.cv.wait(state).unwrap();
            state.waiters -= 1;
        }
        state.free -= n;
        Permit {
            budget: self.clone(),
            bytes: n,
        }
    }
}

/// Budget held by one request; returned on drop.
pub(crate) struct Permit {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.budget.free.lock().unwrap();
        state.free += self.bytes;
        if state.waiters > 0 {
            self.budget.cv.notify_all();
        }
    }
}

/// Runs the transmission phase until the client disconnects.
///
/// Leader and followers: each of the connection's workers takes the reader in turn, reads one
/// request, lets go of the reader and executes the request, so no request is handed from one
/// thread to another.
pub(crate) fn run(
    shared: &Shared,
    neg: Negotiated,
    halves: Halves,
    socket: &Socket,
) -> io::Result<()> {
    let Halves { mut reader, writer } = halves;
    let sink = ReplySink::new(neg.mode, writer, socket.try_clone()?);
    let workers = shared.settings.workers;
    let budget = Arc::new(Budget::new(BUDGET));
    let input = Mutex::new(Input {
        // Buffered: a pipelining client's headers arrive many to a system call.
        reader: io::BufReader::with_capacity(64 << 10, &mut *reader),
        ended: None,
    });
    thread::scope(|s| {
        for _ in 1..workers {
            thread::Builder::new()
                .name("nbd-worker".into())
                .spawn_scoped(s, || serve(&neg, &sink, &input, &budget))
                .expect("cannot start an NBD worker thread");
        }
        serve(&neg, &sink, &input, &budget);
    });
    let result = input
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .ended
        .unwrap_or(Ok(Ending::Eof));
    if matches!(result, Ok(Ending::Disconnect)) && !neg.export.is_read_only() {
        if let Err(e) = neg.export.dev().flush() {
            log::warn!("flush at disconnect: {e}");
        }
    }
    drop(sink);
    let _ = socket.shutdown(Shutdown::Both);
    result.map(|_| ())
}

/// The request stream, shared by a connection's workers.
struct Input<R> {
    reader: io::BufReader<R>,
    /// Set by the worker that saw the stream end; the others stop taking requests.
    ended: Option<io::Result<Ending>>,
}

/// One worker: read a request, execute it, until the stream ends.
fn serve<R: Read>(
    neg: &Negotiated,
    sink: &ReplySink,
    input: &Mutex<Input<R>>,
    budget: &Arc<Budget>,
) {
    loop {
        let req = {
            let mut input = input.lock().unwrap_or_else(|p| p.into_inner());
            if input.ended.is_some() {
                return;
            }
            match next_request(neg, sink, &mut input.reader, budget) {
                Ok(Next::Request(req)) => req,
                Ok(Next::End(ending)) => {
                    input.ended = Some(Ok(ending));
                    return;
                }
                Err(e) => {
                    input.ended = Some(Err(e));
                    return;
                }
            }
        };
        commands::execute(neg, sink, req);
    }
}

/// How the request stream ended.
enum Ending {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// End of file or a broken socket.
    Eof,
}

/// What the stream holds next.
enum Next {
    Request(Request),
    End(Ending),
}

fn next_request(
    neg: &Negotiated,
    sink: &ReplySink,
    reader: &mut dyn Read,
    budget: &Arc<Budget>,
) -> io::Result<Next> {
    let extended = neg.mode == ReplyMode::Extended;
    let header = match RequestHeader::read(reader, extended) {
        Ok(h) => h,
        Err(RequestError::Io(e)) if is_eof(&e) => return Ok(Next::End(Ending::Eof)),
        Err(RequestError::Io(e)) => return Err(e),
        Err(e @ RequestError::BadMagic(_)) => {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        }
    };
    if header.command == Command::Disc {
        return Ok(Next::End(Ending::Disconnect));
    }
    if header.payload > u64::from(MAX_PAYLOAD) {
        // Larger than any payload we advertised: reading it would be a denial of service,
        // skipping it is impossible without reading. Say why, then hang up.
        let msg = format!("payload of {} bytes exceeds {MAX_PAYLOAD}", header.payload);
        sink.error(header.cookie, header.offset, Errno::Inval, &msg);
        return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
    }
    let wants_buffer = match header.command {
        Command::Write => header.payload,
        Command::Read if header.length <= u64::from(MAX_PAYLOAD) => header.length,
        _ => header.payload,
    };
    let permit = budget.take(wants_buffer);
    let mut payload = Vec::new();
    if header.payload > 0 {
        payload = vec![0; header.payload as usize];
        if let Err(e) = reader.read_exact(&mut payload) {
            // A client that vanishes mid-payload never gets the partial write applied.
            return if is_eof(&e) {
                Ok(Next::End(Ending::Eof))
            } else {
                Err(e)
            };
        }
    }
    Ok(Next::Request(Request {
        header,
        payload,
        _permit: permit,
    }))
}

fn is_eof(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
