//! Protocol edge cases over raw sockets: each gets the spec's answer and the server keeps
//! serving other clients (and usually the same one).

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::client::*;
use common::*;
use vdisk_formats::mem::MemDev;
use vdisk_formats::{BlockDev, Capabilities, Extent, NodeInfo, ZeroFlags};
use vdisk_nbd::{Export, Server};

const MIB: u64 = 1 << 20;

fn mem_server(dir: &std::path::Path, size: u64) -> (Running, Arc<MemDev>) {
    let dev = Arc::new(MemDev::new(size as usize));
    let srv = serve_unix(server_for(dev.clone()), dir);
    (srv, dev)
}

/// The server still answers a fresh client with a working read.
fn still_serving(srv: &Running) {
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    assert_eq!(c.error_of(0, CMD_READ, 0, 4096, &[]), 0);
}

#[test]
fn bad_option_magic_hangs_up_and_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    c.send(b"NOTOPTIONxxxxxxxx");
    assert!(c.closed());
    still_serving(&srv);
}

#[test]
fn unknown_client_flags_hang_up() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect_raw(&srv.socket);
    let mut greet = [0u8; 18];
    std::io::Read::read_exact(&mut c.s, &mut greet).unwrap();
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed());
    still_serving(&srv);
}

#[test]
fn bad_request_magic_hangs_up_and_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    c.send(&[0x12, 0x56, 0x09, 0x53]);
    c.send(&[0; 24]);
    assert!(c.closed());
    still_serving(&srv);
}

#[test]
fn truncated_option_and_request_do_not_hurt_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    c.send(b"IHAVEOPT\0\0\0\x07\0\0\0\x20abc");
    drop(c);
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Simple, &[]);
    c.send(&0x2560_9513u32.to_be_bytes());
    c.send(&[0, 0, 0, 1, 0, 0]);
    drop(c);
    still_serving(&srv);
}

#[test]
fn unknown_options_get_unsup_and_negotiation_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    assert_eq!(c.option(4, b"peek"), REP_ERR_UNSUP);
    assert_eq!(c.option(0x1234, &[1; 100]), REP_ERR_UNSUP);
    assert_eq!(c.option(OPT_LIST, b"junk"), REP_ERR_INVALID);
    assert_eq!(c.option(OPT_INFO, &info_data("nope", &[])), REP_ERR_UNKNOWN);
    // SET_META_CONTEXT needs structured replies first.
    let mut q = 0u32.to_be_bytes().to_vec();
    q.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(c.option(OPT_SET_META_CONTEXT, &q), REP_ERR_INVALID);
    // No TLS configured: STARTTLS is unsupported, never TLS_REQD.
    assert_eq!(c.option(5, &[]), REP_ERR_UNSUP);
    c.go("", Mode::Structured, &[]);
    assert_eq!(c.size, MIB);
}

#[test]
fn option_longer_than_the_limit_is_too_big_and_a_huge_one_hangs_up() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    let long = vec![b'x'; 64 * 1024 + 1];
    assert_eq!(c.option(OPT_GO, &long), REP_ERR_TOO_BIG);
    // The connection is still in sync.
    c.go("", Mode::Structured, &[]);
    assert_eq!(c.error_of(0, CMD_READ, 0, 512, &[]), 0);

    let mut c = Client::connect(&srv.socket);
    let mut hdr = b"IHAVEOPT".to_vec();
    hdr.extend_from_slice(&OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&(64u32 << 20).to_be_bytes());
    c.send(&hdr);
    assert!(c.closed());
    still_serving(&srv);
}

#[test]
fn export_name_for_unknown_export_hangs_up() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    c.send_option(OPT_EXPORT_NAME, b"missing");
    assert!(c.closed());
    // The default export works through EXPORT_NAME: size, flags, no padding (NO_ZEROES).
    let mut c = Client::connect(&srv.socket);
    c.send_option(OPT_EXPORT_NAME, b"");
    let mut r = [0u8; 10];
    std::io::Read::read_exact(&mut c.s, &mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), MIB);
    assert_eq!(c.error_of(0, CMD_READ, 0, 16, &[]), 0);
}

#[test]
fn oversize_read_is_refused_and_the_connection_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), 64 * MIB);
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    assert_eq!(c.error_of(0, CMD_READ, 0, 33 * MIB, &[]), EOVERFLOW);
    assert_eq!(c.error_of(0, CMD_READ, 0, 32 * MIB, &[]), 0);
    let mut s = Client::connect(&srv.socket);
    s.go("", Mode::Simple, &[]);
    assert_eq!(s.error_of(0, CMD_READ, 0, 33 * MIB, &[]), EINVAL);
    assert_eq!(s.error_of(0, CMD_READ, MIB, 4096, &[]), 0);
}

#[test]
fn oversize_write_payload_is_refused_with_a_hard_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), 64 * MIB);
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    c.request(0, CMD_WRITE, 9, 0, 33 * MIB, &[]);
    let r = c.chunk(0);
    assert_eq!((r.cookie, r.error), (9, EINVAL));
    assert!(c.closed());
    still_serving(&srv);
}

#[test]
fn out_of_range_requests_get_the_spec_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, dev) = mem_server(dir.path(), MIB);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::connect(&srv.socket);
        let contexts = if mode == Mode::Simple {
            &[][..]
        } else {
            &["base:allocation"][..]
        };
        c.go("", mode, contexts);
        assert_eq!(
            c.error_of(0, CMD_READ, MIB - 512, 1024, &[]),
            EINVAL,
            "{mode:?}"
        );
        assert_eq!(c.error_of(0, CMD_READ, u64::MAX - 10, 100, &[]), EINVAL);
        assert_eq!(c.error_of(0, CMD_WRITE, MIB, 512, &[7; 512]), ENOSPC);
        assert_eq!(
            c.error_of(0, CMD_WRITE_ZEROES, MIB - 512, 4096, &[]),
            ENOSPC
        );
        assert_eq!(c.error_of(0, CMD_TRIM, MIB, 512, &[]), EINVAL);
        assert_eq!(c.error_of(0, CMD_CACHE, 2 * MIB, 1, &[]), EINVAL);
        if mode != Mode::Simple {
            assert_eq!(c.error_of(0, CMD_BLOCK_STATUS, MIB, 512, &[]), EINVAL);
        }
        // The rejected write's payload was consumed: the stream is still in sync.
        assert_eq!(c.error_of(0, CMD_WRITE, 0, 4, b"okay"), 0);
        assert_eq!(c.read(0, 4).0, b"okay");
    }
    assert!(dev.contents()[4..].iter().all(|&b| b == 0));
}

#[test]
fn zero_length_requests_succeed_without_disconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    for mode in [Mode::Simple, Mode::Structured] {
        let mut c = Client::connect(&srv.socket);
        let contexts = if mode == Mode::Simple {
            &[][..]
        } else {
            &["base:allocation"][..]
        };
        c.go("", mode, contexts);
        assert_eq!(c.error_of(0, CMD_READ, 4096, 0, &[]), 0);
        assert_eq!(c.error_of(0, CMD_WRITE, 4096, 0, &[]), 0);
        assert_eq!(c.error_of(0, CMD_TRIM, 4096, 0, &[]), 0);
        assert_eq!(c.error_of(0, CMD_WRITE_ZEROES, 4096, 0, &[]), 0);
        assert_eq!(c.error_of(0, CMD_CACHE, 4096, 0, &[]), 0);
        if mode != Mode::Simple {
            assert_eq!(c.error_of(0, CMD_BLOCK_STATUS, 4096, 0, &[]), EINVAL);
        }
        assert_eq!(c.error_of(0, CMD_READ, 0, 512, &[]), 0);
    }
}

#[test]
fn writes_to_a_read_only_export_are_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDev::new(MIB as usize));
    let srv = serve_unix(
        Server::new(vec![Export::new("", dev.clone()).read_only(true)]),
        dir.path(),
    );
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    assert_ne!(c.flags & 2, 0, "READ_ONLY flag");
    assert_eq!(c.error_of(0, CMD_WRITE, 0, 3, b"abc"), EPERM);
    assert_eq!(c.error_of(0, CMD_WRITE_ZEROES, 0, 512, &[]), EPERM);
    assert_eq!(c.error_of(0, CMD_TRIM, 0, 512, &[]), EPERM);
    assert_eq!(c.error_of(0, CMD_FLUSH, 0, 0, &[]), 0);
    assert!(dev.contents().iter().all(|&b| b == 0));
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    assert_eq!(c.error_of(0, 8, 0, 4096, &[]), EINVAL);
    assert_eq!(c.error_of(0, 99, 0, 0, &[]), EINVAL);
    assert_eq!(c.error_of(0x40, CMD_READ, 0, 512, &[]), EINVAL);
    assert_eq!(c.error_of(FLAG_REQ_ONE, CMD_READ, 0, 512, &[]), EINVAL);
    assert_eq!(c.error_of(0, CMD_FLUSH, 4096, 0, &[]), EINVAL);
    // FUA is accepted on every command.
    assert_eq!(c.error_of(FLAG_FUA, CMD_READ, 0, 512, &[]), 0);
    // BLOCK_STATUS without a negotiated context.
    assert_eq!(c.error_of(0, CMD_BLOCK_STATUS, 0, 512, &[]), EINVAL);
    // DF is refused without structured replies (SEND_DF is not advertised then).
    let mut s = Client::connect(&srv.socket);
    s.go("", Mode::Simple, &[]);
    assert_eq!(s.flags & 0x80, 0);
    assert_eq!(s.error_of(FLAG_DF, CMD_READ, 0, 512, &[]), EINVAL);
}

/// Serves (read-only) the sparse qcow2 image with a backing file that `sparse_qcow2` builds
/// with qemu-img; None without qemu-img.
fn serve_sparse_qcow2() -> Option<(tempfile::TempDir, Running)> {
    if !have("qemu-img") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let srv = serve_unix(server_for(open_image(&img, true)), dir.path());
    Some((dir, srv))
}

#[test]
fn sparse_reads_use_hole_chunks_unless_df() {
    let Some((_dir, srv)) = serve_sparse_qcow2() else {
        return;
    };
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    // 0..4M: base data at 1M..1M+64K is covered by top data 1M..2M; 2M..4M is a hole.
    let (buf, kinds) = c.read(0, 4 * MIB as usize);
    assert!(kinds.contains(&CHUNK_HOLE), "{kinds:?}");
    assert!(kinds.contains(&CHUNK_DATA), "{kinds:?}");
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0));
    assert!(buf[MIB as usize..2 * MIB as usize]
        .iter()
        .all(|&b| b == 0xab));
    assert!(buf[2 * MIB as usize..].iter().all(|&b| b == 0));
    c.request(FLAG_DF, CMD_READ, 6, 0, 4 * MIB, &[]);
    let chunks = c.reply(0);
    let content: Vec<u16> = chunks
        .iter()
        .map(|c| c.kind)
        .filter(|&k| k != CHUNK_NONE)
        .collect();
    assert_eq!(content, [CHUNK_DATA]);
    assert_eq!(&chunks[0].payload[8..], &buf[..]);
}

#[test]
fn small_reads_of_zeroes_are_one_hole_chunk() {
    let Some((_dir, srv)) = serve_sparse_qcow2() else {
        return;
    };
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Structured, &[]);
    // Under the small-read size the server reads first and sends a hole if it read zeroes.
    let (buf, kinds) = c.read(3 * MIB, 4096);
    assert_eq!(kinds, [CHUNK_HOLE]);
    assert!(buf.iter().all(|&b| b == 0));
    let (buf, kinds) = c.read(MIB + 512, 4096);
    assert_eq!(kinds, [CHUNK_DATA]);
    assert!(buf.iter().all(|&b| b == 0xab));
}

#[test]
fn block_status_req_one_and_extended_descriptors() {
    let Some((_dir, srv)) = serve_sparse_qcow2() else {
        return;
    };
    for mode in [Mode::Structured, Mode::Extended] {
        let mut c = Client::connect(&srv.socket);
        c.go("", mode, &["base:allocation", "qemu:allocation-depth"]);
        c.request(0, CMD_BLOCK_STATUS, 1, 0, 4 * MIB, &[]);
        let chunks = c.reply(0);
        let statuses: Vec<(u32, Vec<(u64, u64)>)> = chunks
            .iter()
            .filter(|c| c.kind != CHUNK_NONE)
            .map(status_of)
            .collect();
        assert_eq!(statuses.len(), 2, "one chunk per context");
        let alloc = &statuses.iter().find(|s| s.0 == 1).unwrap().1;
        assert_eq!(alloc, &[(MIB, 3), (MIB, 0), (2 * MIB, 3)]);
        let depth = &statuses.iter().find(|s| s.0 == 2).unwrap().1;
        assert_eq!(depth, &[(MIB, 0), (MIB, 1), (2 * MIB, 0)]);
        c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 2, MIB / 2, MIB, &[]);
        for chunk in c.reply(0).iter().filter(|c| c.kind != CHUNK_NONE) {
            let (_, d) = status_of(chunk);
            assert_eq!(d.len(), 1);
            assert!(d[0].0 <= MIB);
        }
    }
}

#[test]
fn block_status_payload_selects_contexts() {
    let Some((_dir, srv)) = serve_sparse_qcow2() else {
        return;
    };
    let mut c = Client::connect(&srv.socket);
    c.go(
        "",
        Mode::Extended,
        &["base:allocation", "qemu:allocation-depth"],
    );
    assert_ne!(c.flags & 0x1000, 0, "BLOCK_STAT_PAYLOAD advertised");
    let payload = |effect: u64, ids: &[u32]| {
        let mut v = effect.to_be_bytes().to_vec();
        ids.iter()
            .for_each(|id| v.extend_from_slice(&id.to_be_bytes()));
        v
    };
    // Only context 2 (allocation depth), over the effect length of the payload, not the
    // header's length (the payload's size).
    let p = payload(4 * MIB, &[2]);
    c.request(0x20, CMD_BLOCK_STATUS, 1, 0, p.len() as u64, &p);
    let chunks: Vec<_> = c
        .reply(0)
        .into_iter()
        .filter(|c| c.kind != CHUNK_NONE)
        .collect();
    assert_eq!(chunks.len(), 1, "one context asked for");
    let (id, depth) = status_of(&chunks[0]);
    assert_eq!(id, 2);
    assert_eq!(depth, [(MIB, 0), (MIB, 1), (2 * MIB, 0)]);
    // A repeated id, an unknown id or a ragged payload: EINVAL, and the connection goes on.
    for bad in [
        payload(MIB, &[1, 1]),
        payload(MIB, &[7]),
        payload(MIB, &[1])[..10].to_vec(),
    ] {
        assert_eq!(
            c.error_of(0x20, CMD_BLOCK_STATUS, 0, bad.len() as u64, &bad),
            EINVAL
        );
    }
    let (buf, _) = c.read(MIB, 4096);
    assert!(buf.iter().all(|&b| b == 0xab));
    // Without contexts there is nothing to select: the flag is not offered.
    let mut plain = Client::connect(&srv.socket);
    plain.go("", Mode::Extended, &[]);
    assert_eq!(plain.flags & 0x1000, 0);
}

#[test]
fn extended_headers_carry_writes_and_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, dev) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Extended, &[]);
    // PAYLOAD_LEN (bit 5) set as the spec asks; without it qemu-style WRITEs also work.
    assert_eq!(c.error_of(0x20, CMD_WRITE, 512, 5, b"hello"), 0);
    assert_eq!(c.error_of(0, CMD_WRITE, 1024, 5, b"world"), 0);
    assert_eq!(c.read(512, 5).0, b"hello");
    assert_eq!(&dev.contents()[1024..1029], b"world");
    // A payload on a command that takes none is consumed, then refused.
    assert_eq!(c.error_of(0x20, CMD_TRIM, 0, 4, b"junk"), EINVAL);
    assert_eq!(c.error_of(0, CMD_FLUSH, 0, 0, &[]), 0);
}

#[test]
fn soft_disconnect_flushes_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, dev) = mem_server(dir.path(), MIB);
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Simple, &[]);
    c.request(0, CMD_WRITE, 1, 0, 3, b"xyz");
    c.request(0, CMD_DISC, 2, 0, 0, &[]);
    // The outstanding write is answered before the server closes.
    assert_eq!(c.chunk(0).error, 0);
    assert!(c.closed());
    assert_eq!(&dev.contents()[..3], b"xyz");
}

#[test]
fn client_dying_mid_write_does_not_disturb_another() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, dev) = mem_server(dir.path(), 8 * MIB);
    let path = srv.socket.clone();
    let worker = thread::spawn(move || {
        let mut c = Client::connect(&path);
        c.go("", Mode::Structured, &[]);
        for i in 0..200u64 {
            let data = vec![(i % 251) as u8; 4096];
            assert_eq!(c.error_of(0, CMD_WRITE, 4 * MIB + i * 4096, 4096, &data), 0);
            assert_eq!(c.read(4 * MIB + i * 4096, 4096).0, data);
        }
    });
    for _ in 0..5 {
        let mut dying = Client::connect(&srv.socket);
        dying.go("", Mode::Simple, &[]);
        dying.request(0, CMD_WRITE, 1, 0, MIB, &[0x99; 100_000]);
        drop(dying);
    }
    worker.join().unwrap();
    // The partial writes were never applied.
    assert!(dev.contents()[..MIB as usize].iter().all(|&b| b == 0));
    still_serving(&srv);
}

/// A device whose reads at offset 0 take a while, to show that replies overtake each other.
#[derive(Debug)]
struct SlowStart(MemDev);

impl BlockDev for SlowStart {
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk_formats::Result<()> {
        if offset == 0 {
            thread::sleep(Duration::from_millis(300));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vdisk_formats::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> vdisk_formats::Result<()> {
        self.0.flush()
    }
    fn write_zeroes(&self, o: u64, l: u64, f: ZeroFlags) -> vdisk_formats::Result<()> {
        self.0.write_zeroes(o, l, f)
    }
    fn discard(&self, o: u64, l: u64) -> vdisk_formats::Result<()> {
        self.0.discard(o, l)
    }
    fn extent(&self, o: u64, l: u64) -> vdisk_formats::Result<Extent> {
        self.0.extent(o, l)
    }
    fn info(&self) -> vdisk_formats::Result<NodeInfo> {
        self.0.info()
    }
}

#[test]
fn requests_run_concurrently_and_reply_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let srv = serve_unix(
        server_for(Arc::new(SlowStart(MemDev::new(MIB as usize)))),
        dir.path(),
    );
    let mut c = Client::connect(&srv.socket);
    c.go("", Mode::Simple, &[]);
    let start = Instant::now();
    c.request(0, CMD_READ, 100, 0, 512, &[]);
    c.request(0, CMD_READ, 200, 4096, 512, &[]);
    let first = c.chunk(512);
    let second = c.chunk(512);
    assert_eq!((first.cookie, second.cookie), (200, 100));
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[test]
fn slow_handshakes_are_cut_off_without_affecting_others() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Arc::new(MemDev::new(MIB as usize));
    let srv = serve_unix(
        server_for(dev).handshake_limit(Some(Duration::from_millis(300))),
        dir.path(),
    );
    let start = Instant::now();
    let mut idle = Client::connect(&srv.socket);
    // A client that finished its handshake is not subject to the limit.
    let mut busy = Client::connect(&srv.socket);
    busy.go("", Mode::Structured, &[]);
    assert!(idle.closed());
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    thread::sleep(Duration::from_millis(400));
    assert_eq!(busy.error_of(0, CMD_READ, 0, 512, &[]), 0);
}
