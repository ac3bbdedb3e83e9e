//! Executing one request against the export and answering it: validation (flags, read-only,
//! range, alignment, size) with the errors of the spec's "Error values" section, then the I/O.

use vdisk_formats::{BlockDev, ErrorKind, ExtentKind, ZeroFlags};

use super::handshake::Negotiated;
use super::reply::ReplySink;
use super::transmission::Permit;
use super::Context;
use crate::proto::{
    BlockStatusPayload, CmdFlags, Command, Errno, Reply, ReplyMode, RequestHeader,
    StatusDescriptor, TransmissionFlags, MAX_EXTENTS, MAX_PAYLOAD,
};

/// A request with its payload, queued for a worker.
pub(crate) struct Request {
    pub header: RequestHeader,
    pub payload: Vec<u8>,
    /// Budget for the request's buffers, released once the reply is sent.
    pub _permit: Permit,
}

/// A request refused before any I/O.
struct Refusal(Errno, String);

fn refuse(errno: Errno, msg: impl Into<String>) -> Refusal {
    Refusal(errno, msg.into())
}

/// Executes `req` and sends its reply.
pub(crate) fn execute(neg: &Negotiated, sink: &ReplySink, req: Request) {
    let mut h = req.header;
    let mut contexts = &neg.contexts[..];
    let selected;
    if h.command == Command::BlockStatus
        && h.flags.has(CmdFlags::PAYLOAD_LEN)
        && neg.flags.has(TransmissionFlags::BLOCK_STATUS_PAYLOAD)
    {
        match select_contexts(neg, &req.payload) {
            Ok((effect_length, chosen)) => {
                selected = chosen;
                contexts = &selected;
                h.length = effect_length;
                h.payload = 0;
            }
            Err(msg) => return sink.error(h.cookie, h.offset, Errno::Inval, &msg),
        }
    }
    if let Err(Refusal(errno, msg)) = validate(neg, &h) {
        sink.error(h.cookie, h.offset, errno, &msg);
        return;
    }
    let dev = neg.export.dev().as_ref();
    let fua = h.flags.has(CmdFlags::FUA);
    let result = match h.command {
        Command::Read => return read(neg, sink, &h),
        Command::BlockStatus => return block_status(neg, sink, &h, contexts),
        Command::Write => dev.write_at(&req.payload, h.offset),
        Command::Flush => dev.flush(),
        Command::Trim => dev.discard(h.offset, h.length),
        // A hint only: the range was validated, nothing else needs doing.
        Command::Cache => Ok(()),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                may_unmap: !h.flags.has(CmdFlags::NO_HOLE),
                fast_only: h.flags.has(CmdFlags::FAST_ZERO),
            };
            match dev.write_zeroes(h.offset, h.length, flags) {
                Err(e) if flags.fast_only && e.kind() == ErrorKind::Unsupported => {
                    let msg = "zeroing this range would not be faster than writing";
                    return sink.error(h.cookie, h.offset, Errno::NotSup, msg);
                }
                r => r,
            }
        }
        Command::Disc | Command::Unknown(_) => unreachable!("refused by validate"),
    };
    let writes = matches!(
        h.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    let result = result.and_then(|()| if fua && writes { dev.flush() } else { Ok(()) });
    match result {
        Ok(()) => sink.ok(h.cookie, h.offset),
        Err(e) => sink.error(h.cookie, h.offset, Errno::from_block(&e), &e.to_string()),
    }
}

/// The effect length and the negotiated contexts a `BLOCK_STATUS` payload asks for; an
/// unusable payload (malformed, a repeated or unknown id) is an `EINVAL`, as in qemu-nbd.
fn select_contexts(neg: &Negotiated, payload: &[u8]) -> Result<(u64, Vec<(u32, Context)>), String> {
    let p = BlockStatusPayload::parse(payload, neg.contexts.len())?;
    let chosen = p
        .ids
        .iter()
        .map(|id| {
            neg.contexts
                .iter()
                .find(|(known, _)| known == id)
                .copied()
                .ok_or_else(|| format!("context id {id} was not negotiated"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((p.effect_length, chosen))
}

/// The checks every request passes before it touches the device.
fn validate(neg: &Negotiated, h: &RequestHeader) -> Result<(), Refusal> {
    let cmd = h.command;
    if let Command::Unknown(code) = cmd {
        return Err(refuse(Errno::Inval, format!("unknown command {code}")));
    }
    let extended = neg.mode == ReplyMode::Extended;
    let mut allowed = cmd.allowed_flags();
    if !neg.flags.has(TransmissionFlags::SEND_DF) {
        allowed &= !CmdFlags::DF;
    }
    if !neg.flags.has(TransmissionFlags::SEND_FAST_ZERO) {
        allowed &= !CmdFlags::FAST_ZERO;
    }
    if !extended {
        allowed &= !CmdFlags::PAYLOAD_LEN;
    }
    let unknown = h.flags.0 & !allowed;
    if unknown != 0 {
        let msg = format!("flags {unknown:#x} are not valid for {cmd:?}");
        return Err(refuse(Errno::Inval, msg));
    }
    if cmd != Command::Write && h.payload > 0 {
        return Err(refuse(Errno::Inval, format!("{cmd:?} takes no payload")));
    }
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && neg.export.is_read_only() {
        return Err(refuse(Errno::Perm, "the export is read-only"));
    }
    if cmd == Command::Flush {
        if h.offset != 0 || h.length != 0 {
            return Err(refuse(Errno::Inval, "FLUSH offset and length must be zero"));
        }
        return Ok(());
    }
    let size = neg.export.size();
    if h.offset.checked_add(h.length).is_none_or(|end| end > size) {
        // "Error values": ENOSPC for writes past the end, EINVAL for reads, trims and the rest.
        let errno = match cmd {
            Command::Write | Command::WriteZeroes => Errno::NoSpc,
            _ => Errno::Inval,
        };
        let msg = format!(
            "request {}+{} is past the end of the export ({size} bytes)",
            h.offset, h.length
        );
        return Err(refuse(errno, msg));
    }
    let (min, _, _) = neg.export.block_sizes();
    if min > 1 && (h.offset % u64::from(min) != 0 || h.length % u64::from(min) != 0) {
        let msg = format!("request is not aligned to the {min}-byte minimum block size");
        return Err(refuse(Errno::Inval, msg));
    }
    match cmd {
        Command::Read if h.length > u64::from(MAX_PAYLOAD) => {
            // Structured replies may reject long reads with EOVERFLOW ("NBD_CMD_READ"); simple
            // replies cannot carry them at all ("Size constraints").
            let errno = if neg.mode == ReplyMode::Simple {
                Errno::Inval
            } else {
                Errno::Overflow
            };
            let msg = format!("read of {} bytes exceeds {MAX_PAYLOAD}", h.length);
            Err(refuse(errno, msg))
        }
        Command::BlockStatus if neg.contexts.is_empty() => {
            Err(refuse(Errno::Inval, "no metadata context was negotiated"))
        }
        Command::BlockStatus if h.length == 0 => {
            Err(refuse(Errno::Inval, "block status of zero bytes"))
        }
        _ => Ok(()),
    }
}

/// One piece of a structured read: data to send, or a range that reads as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    offset: u64,
    len: u64,
    hole: bool,
}

/// Splits `offset..offset+len` into data and hole pieces from the device's extents, merging
/// neighbours of the same kind. On a mapping error the whole range is data.
fn pieces(dev: &dyn BlockDev, offset: u64, len: u64) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let end = offset + len;
    let mut cur = offset;
    while cur < end {
        let (n, hole) = match dev.extent(cur, end - cur) {
            Ok(e) => (
                e.length.clamp(1, end - cur),
                matches!(e.kind, ExtentKind::Zero | ExtentKind::Unallocated),
            ),
            Err(_) => (end - cur, false),
        };
        match out.last_mut() {
            Some(p) if p.hole == hole => p.len += n,
            _ => out.push(Piece {
                offset: cur,
                len: n,
                hole,
            }),
        }
        cur += n;
    }
    out
}

/// Structured reads shorter than this are read whole, without asking the mapping for holes.
const SMALL_READ: usize = 64 << 10;

fn read(neg: &Negotiated, sink: &ReplySink, h: &RequestHeader) {
    let dev = neg.export.dev().as_ref();
    let len = h.length as usize;
    let fail = |e: vdisk_formats::Error| {
        sink.error(h.cookie, h.offset, Errno::from_block(&e), &e.to_string());
    };
    // Without structured replies, or with DF, the reply is one run of data (holes included).
    if sink.mode() == ReplyMode::Simple || h.flags.has(CmdFlags::DF) || len == 0 {
        let mut buf = vec![0; len];
        if let Err(e) = dev.read_at(&mut buf, h.offset) {
            return fail(e);
        }
        let chunk = if len == 0 && sink.mode() != ReplyMode::Simple {
            Reply::Ok
        } else {
            Reply::Data {
                offset: h.offset,
                len: len as u64,
            }
        };
        return sink.send(h.cookie, h.offset, &[(chunk, &buf)]);
    }
    if len < SMALL_READ {
        // Asking the mapping first costs more than the read: read, and send a hole chunk if
        // it is all zero.
        let mut buf = vec![0; len];
        if let Err(e) = dev.read_at(&mut buf, h.offset) {
            return fail(e);
        }
        let chunk = if vdisk_formats::convert::is_zero(&buf) {
            let reply = Reply::Hole {
                offset: h.offset,
                len: len as u32,
            };
            (reply, &[][..])
        } else {
            let reply = Reply::Data {
                offset: h.offset,
                len: len as u64,
            };
            (reply, &buf[..])
        };
        return sink.send(h.cookie, h.offset, &[chunk]);
    }
    // Structured: everything is read before the first chunk is sent, so no error can show up
    // after a chunk went out and the last chunk can carry the DONE flag.
    let pieces = pieces(dev, h.offset, h.length);
    let mut buf = vec![0; len];
    for p in pieces.iter().filter(|p| !p.hole) {
        let at = (p.offset - h.offset) as usize;
        if let Err(e) = dev.read_at(&mut buf[at..at + p.len as usize], p.offset) {
            return fail(e);
        }
    }
    let chunks: Vec<(Reply, &[u8])> = pieces
        .iter()
        .map(|p| {
            let at = (p.offset - h.offset) as usize;
            if p.hole {
                let reply = Reply::Hole {
                    offset: p.offset,
                    len: p.len as u32,
                };
                (reply, &[][..])
            } else {
                let reply = Reply::Data {
                    offset: p.offset,
                    len: p.len,
                };
                (reply, &buf[at..at + p.len as usize])
            }
        })
        .collect();
    sink.send(h.cookie, h.offset, &chunks);
}

/// One run of the device's mapping as both contexts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    len: u64,
    allocation: u32,
    depth: u32,
}

/// `base:allocation` bits ("base:allocation metadata context").
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// Walks the mapping from `offset` for up to `len` bytes into runs, merged while both context
/// values stay the same, stopping early after [`MAX_EXTENTS`] runs.
fn walk(dev: &dyn BlockDev, offset: u64, len: u64) -> vdisk_formats::Result<Vec<Run>> {
    let mut runs: Vec<Run> = Vec::new();
    let end = offset + len;
    let mut cur = offset;
    while cur < end {
        let e = dev.extent(cur, end - cur)?;
        let n = e.length.clamp(1, end - cur);
        let (allocation, depth) = match e.kind {
            // A qcow2 zero cluster counts as a hole that reads as zero, as qemu-nbd reports it.
            ExtentKind::Data => (0, e.depth + 1),
            ExtentKind::Zero => (STATE_HOLE | STATE_ZERO, e.depth + 1),
            ExtentKind::Unallocated => (STATE_HOLE | STATE_ZERO, 0),
        };
        match runs.last_mut() {
            Some(r) if r.allocation == allocation && r.depth == depth => r.len += n,
            _ => {
                if runs.len() == MAX_EXTENTS {
                    break;
                }
                runs.push(Run {
                    len: n,
                    allocation,
                    depth,
                });
            }
        }
        cur += n;
    }
    Ok(runs)
}

/// The descriptors of one context: runs merged by that context's value, a single one with
/// `REQ_ONE`, lengths capped to 32 bits unless extended headers are in use.
fn descriptors(runs: &[Run], ctx: Context, req_one: bool, wide: bool) -> Vec<StatusDescriptor> {
    let max_len = if wide {
        u64::MAX
    } else {
        // Largest 32-bit length that keeps descriptors 512-aligned.
        u64::from(u32::MAX) & !511
    };
    let mut out: Vec<StatusDescriptor> = Vec::new();
    for r in runs {
        let status = match ctx {
            Context::Allocation => r.allocation,
            Context::AllocationDepth => r.depth,
        };
        match out.last_mut() {
            Some(d) if d.status == status && d.length + r.len <= max_len => d.length += r.len,
            Some(_) if req_one => break,
            _ => out.push(StatusDescriptor {
                length: r.len.min(max_len),
                status,
            }),
        }
    }
    out.truncate(if req_one { 1 } else { MAX_EXTENTS });
    out
}

fn block_status(
    neg: &Negotiated,
    sink: &ReplySink,
    h: &RequestHeader,
    contexts: &[(u32, Context)],
) {
    let dev = neg.export.dev().as_ref();
    let runs = match walk(dev, h.offset, h.length) {
        Ok(r) => r,
        Err(e) => return sink.error(h.cookie, h.offset, Errno::from_block(&e), &e.to_string()),
    };
    let req_one = h.flags.has(CmdFlags::REQ_ONE);
    let wide = sink.mode() == ReplyMode::Extended;
    let per_context: Vec<(u32, Vec<StatusDescriptor>)> = contexts
        .iter()
        .map(|&(id, ctx)| (id, descriptors(&runs, ctx, req_one, wide)))
        .collect();
    let chunks: Vec<(Reply, &[u8])> = per_context
        .iter()
        .map(|(id, extents)| {
            let reply = Reply::BlockStatus {
                context: *id,
                extents,
            };
            (reply, &[][..])
        })
        .collect();
    sink.send(h.cookie, h.offset, &chunks);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(len: u64, allocation: u32, depth: u32) -> Run {
        Run {
            len,
            allocation,
            depth,
        }
    }

    #[test]
    fn descriptors_merge_per_context() {
        let runs = [run(512, 0, 1), run(1024, 3, 1), run(512, 3, 0)];
        let alloc = descriptors(&runs, Context::Allocation, false, false);
        assert_eq!(
            alloc,
            vec![
                StatusDescriptor {
                    length: 512,
                    status: 0
                },
                StatusDescriptor {
                    length: 1536,
                    status: 3
                }
            ]
        );
        let depth = descriptors(&runs, Context::AllocationDepth, false, false);
        assert_eq!(depth.len(), 2);
        assert_eq!(depth[0].length, 1536);
        assert_eq!(depth[1].status, 0);
    }

    #[test]
    fn req_one_returns_exactly_one_descriptor() {
        let runs = [run(512, 3, 1), run(1024, 3, 0), run(512, 0, 1)];
        let d = descriptors(&runs, Context::Allocation, true, false);
        assert_eq!(
            d,
            vec![StatusDescriptor {
                length: 1536,
                status: 3
            }]
        );
        let d = descriptors(&runs, Context::AllocationDepth, true, false);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].length, 512);
    }

    #[test]
    fn compact_descriptors_stay_within_32_bits() {
        let runs = [run(3 << 30, 0, 1), run(3 << 30, 0, 1)];
        let d = descriptors(&runs, Context::Allocation, false, false);
        assert!(d.iter().all(|d| d.length <= u64::from(u32::MAX)));
        assert_eq!(d.iter().map(|d| d.length).sum::<u64>(), 6 << 30);
        let wide = descriptors(&runs, Context::Allocation, false, true);
        assert_eq!(wide.len(), 1);
    }
}
