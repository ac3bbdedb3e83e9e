//! The NBD server fed a client byte stream: the input is everything a client sends (client
//! flags, options, then requests with their payloads). The real server runs the handshake and
//! the transmission phase over a socketpair against small in-memory exports; its replies are
//! drained and discarded. The server must not panic, and must finish once the input ends and
//! the client side is shut down.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Once};

use libfuzzer_sys::fuzz_target;
use vdisk_formats::mem::MemDev;
use vdisk_formats::BlockDev;
use vdisk_nbd::{Export, Server};

const DISK: usize = 1 << 20;

fn server() -> Server {
    let dev = Arc::new(MemDev::new(DISK));
    let pattern: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
    dev.write_at(&pattern, 0).unwrap();
    let ro = Arc::new(MemDev::new(64 << 10));
    Server::new(vec![
        Export::new("", dev)
            .description("fuzz disk")
            .allocation_depth(true),
        Export::new("ro", ro).read_only(true),
    ])
    .handshake_limit(None)
    .workers(2)
}

fuzz_target!(|data: &[u8]| {
    static IGNORE_SIGPIPE: Once = Once::new();
    IGNORE_SIGPIPE.call_once(|| {
        // SAFETY: setting a signal disposition to SIG_IGN installs no handler code; writes to a
        // socket the server has closed then fail with EPIPE instead of killing the fuzzer.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
    let (client, server_end) = UnixStream::pair().expect("socketpair");
    let server = server();
    let serving = std::thread::spawn(move || {
        let _ = server.serve_connection(server_end);
    });
    let mut reader = client.try_clone().expect("clone the client socket");
    let draining = std::thread::spawn(move || {
        let mut sink = [0u8; 64 << 10];
        while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
    });
    // The server may hang up early (a protocol violation): the rest of the input is then lost.
    let _ = (&client).write_all(data);
    let _ = client.shutdown(Shutdown::Write);
    serving.join().expect("the server thread panicked");
    drop(client);
    draining.join().expect("the drain thread panicked");
});
