//! Handshake limits: how many options a client may send, and how long its strings may be; and
//! how many descriptors one block-status reply holds. Each limit is a named constant; a client at
//! the limit is served, one past it gets the spec's error (or a hang-up, or a shorter reply) and
//! the server keeps serving others.

mod common;

use std::sync::Arc;

use common::client::*;
use common::*;
use vdisk_formats::mem::MemDev;
use vdisk_nbd::proto::{MAX_EXTENTS, MAX_OPTIONS, MAX_STRING};

const MIB: usize = 1 << 20;

fn mem_server(dir: &std::path::Path) -> Running {
    serve_unix(server_for(Arc::new(MemDev::new(MIB))), dir)
}

/// Sends `count` options the server does not know; each gets `NBD_REP_ERR_UNSUP`.
fn unknown_options(c: &mut Client, count: usize) {
    for _ in 0..count {
        assert_eq!(c.option(0x1234, b"x"), REP_ERR_UNSUP);
    }
}

#[test]
fn a_handshake_of_max_options_options_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());
    let mut c = Client::connect(&srv.socket);
    // GO is the last option the server accepts.
    unknown_options(&mut c, MAX_OPTIONS - 1);
    c.go("", Mode::Simple, &[]);
    assert_eq!(c.size, MIB as u64);
    assert_eq!(c.error_of(0, CMD_READ, 0, 512, &[]), 0);
}

#[test]
fn one_option_past_max_options_hangs_up() {
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());
    let mut c = Client::connect(&srv.socket);
    unknown_options(&mut c, MAX_OPTIONS);
    // The server may hang up before this option arrives (it stops reading after the limit), so
    // the send itself may fail with a broken pipe.
    let mut go = b"IHAVEOPT".to_vec();
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    let data = info_data("", &[]);
    go.extend_from_slice(&(data.len() as u32).to_be_bytes());
    go.extend_from_slice(&data);
    let _ = std::io::Write::write_all(&mut c.s, &go);
    assert!(
        c.closed(),
        "the server must hang up after {MAX_OPTIONS} options"
    );
    let mut other = Client::connect(&srv.socket);
    other.go("", Mode::Structured, &[]);
    assert_eq!(other.error_of(0, CMD_READ, 0, 512, &[]), 0);
}

#[test]
fn export_names_longer_than_max_string_are_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let srv = mem_server(dir.path());
    let mut c = Client::connect(&srv.socket);
    // At the limit the name is valid (there is just no such export).
    let at_limit = "n".repeat(MAX_STRING);
    assert_eq!(
        c.option(OPT_INFO, &info_data(&at_limit, &[])),
        REP_ERR_UNKNOWN
    );
    let over = "n".repeat(MAX_STRING + 1);
    assert_eq!(c.option(OPT_INFO, &info_data(&over, &[])), REP_ERR_INVALID);
    assert_eq!(c.option(OPT_GO, &info_data(&over, &[])), REP_ERR_INVALID);
    // The negotiation goes on.
    c.go("", Mode::Structured, &[]);
    assert_eq!(c.error_of(0, CMD_READ, 0, 512, &[]), 0);
}

/// The `base:allocation` descriptors of one block-status request for the whole disk.
fn whole_disk_status(c: &mut Client, size: u64) -> Vec<(u64, u64)> {
    c.request(0, CMD_BLOCK_STATUS, 1, 0, size, &[]);
    let chunks = c.reply(0);
    let status: Vec<_> = chunks.iter().filter(|c| c.kind != CHUNK_NONE).collect();
    assert_eq!(status.len(), 1, "one context, one chunk");
    status_of(status[0]).1
}

#[test]
fn block_status_replies_hold_at_most_max_extents_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    for stripes in [MAX_EXTENTS, MAX_EXTENTS + 1] {
        let size = stripes as u64 * 512;
        let srv = serve_unix(
            server_for(Arc::new(WatchedDisk::new(size as usize, Some(512)))),
            dir.path(),
        );
        let mut c = Client::connect(&srv.socket);
        c.go("", Mode::Structured, &["base:allocation"]);
        let d = whole_disk_status(&mut c, size);
        // Every stripe is one descriptor, alternating data (0) and zero (3), up to the limit.
        assert_eq!(d.len(), MAX_EXTENTS, "{stripes} stripes");
        for (i, &(len, state)) in d.iter().enumerate() {
            assert_eq!((len, state), (512, if i % 2 == 0 { 0 } else { 3 }));
        }
        // One stripe over, the reply covers a prefix (the client asks again from its end), and
        // the connection goes on.
        let covered: u64 = d.iter().map(|x| x.0).sum();
        assert_eq!(covered, MAX_EXTENTS as u64 * 512);
        assert_eq!(covered < size, stripes > MAX_EXTENTS);
        assert_eq!(c.error_of(0, CMD_READ, 0, 512, &[]), 0);
    }
}
