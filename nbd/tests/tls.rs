//! STARTTLS with X.509 certificates made by certtool, checked with nbdinfo and nbdcopy.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::client::*;
use common::*;
use vdisk_nbd::{Export, Server, TlsConfig};

/// Makes a CA, a server certificate for localhost/127.0.0.1 and a client certificate in `dir`,
/// laid out as libnbd and qemu expect (`ca-cert.pem`, `server-*.pem`, `client-*.pem`).
fn make_certs(dir: &Path) {
    let certtool = |args: &[&str]| {
        run(Command::new("certtool").current_dir(dir).args(args));
    };
    fs::write(
        dir.join("ca.info"),
        "cn = vdisk test CA\nca\ncert_signing_key\nexpiration_days = 2\n",
    )
    .unwrap();
    fs::write(
        dir.join("server.info"),
        "organization = vdisk\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n\
         tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n",
    )
    .unwrap();
    fs::write(
        dir.join("client.info"),
        "organization = vdisk\ncn = client\ntls_www_client\nencryption_key\nsigning_key\n\
         expiration_days = 2\n",
    )
    .unwrap();
    for key in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        // RSA: certtool (gnutls 3.7) writes some ECDSA keys with a 33-byte scalar that ring
        // rejects.
        certtool(&[
            "--generate-privkey",
            "--key-type=rsa",
            "--bits=2048",
            "--outfile",
            key,
        ]);
    }
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        "ca-key.pem",
        "--template",
        "ca.info",
        "--outfile",
        "ca-cert.pem",
    ]);
    for who in ["server", "client"] {
        certtool(&[
            "--generate-certificate",
            "--load-ca-certificate",
            "ca-cert.pem",
            "--load-ca-privkey",
            "ca-key.pem",
            "--load-privkey",
            &format!("{who}-key.pem"),
            "--template",
            &format!("{who}.info"),
            "--outfile",
            &format!("{who}-cert.pem"),
        ]);
    }
}

/// A directory with only the CA (a client without a certificate of its own).
fn ca_only(certs: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::copy(certs.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
}

fn tls_uri(srv: &Running, certs: &Path) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        srv.socket.display(),
        certs.display()
    )
}

fn fixture(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let certs = dir.join("certs");
    fs::create_dir(&certs).unwrap();
    make_certs(&certs);
    let img = dir.join("disk.raw");
    qemu_img_create(&img, "raw", "8M", &[]);
    qemu_io(&img, "raw", &["write -P 0x42 1M 2M"]);
    (certs, img)
}

#[test]
fn nbdinfo_and_nbdcopy_over_tls() {
    if !have("certtool") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (certs, img) = fixture(dir.path());
    let tls = TlsConfig::from_dir(&certs, false).unwrap();
    let srv = serve_unix(
        Server::new(vec![Export::new("", open_image(&img, true))]).tls(tls, false),
        dir.path(),
    );
    let out = stdout(
        Command::new("nbdinfo")
            .arg("--json")
            .arg(tls_uri(&srv, &certs)),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["TLS"], true);
    assert_eq!(v["exports"][0]["export-size"], 8 << 20);
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy")
        .arg(tls_uri(&srv, &certs))
        .arg(&copy));
    run(Command::new("cmp").arg(&copy).arg(&img));
    // TLS is optional here: a plain-text client is served too.
    let plain = stdout(Command::new("nbdinfo").arg("--size").arg(srv.uri()));
    assert_eq!(plain.trim(), "8388608");
}

#[test]
fn required_tls_refuses_plain_text_clients() {
    if !have("certtool") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (certs, img) = fixture(dir.path());
    let tls = TlsConfig::from_dir(&certs, false).unwrap();
    let srv = serve_unix(
        Server::new(vec![Export::new("", open_image(&img, false))]).tls(tls, true),
        dir.path(),
    );
    let plain = Command::new("nbdinfo").arg(srv.uri()).output().unwrap();
    // libnbd reports NBD_REP_ERR_TLS_REQD to GO as a failed opt_go.
    assert!(!plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("opt_go"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    // FORCEDTLS: every option but STARTTLS/ABORT gets TLS_REQD, EXPORT_NAME hangs up.
    let mut c = Client::connect(&srv.socket);
    assert_eq!(c.option(OPT_LIST, &[]), REP_ERR_TLS_REQD);
    assert_eq!(c.option(OPT_GO, &info_data("", &[])), REP_ERR_TLS_REQD);
    assert_eq!(c.option(0x4242, &[]), REP_ERR_TLS_REQD);
    // Even malformed or oversized options get TLS_REQD, not INVALID or TOO_BIG.
    assert_eq!(c.option(OPT_LIST, b"junk"), REP_ERR_TLS_REQD);
    assert_eq!(c.option(OPT_INFO, &vec![0; 70_000]), REP_ERR_TLS_REQD);
    c.send_option(OPT_EXPORT_NAME, b"");
    assert!(c.closed());
    let mut c = Client::connect(&srv.socket);
    assert_eq!(c.option(OPT_ABORT, &[]), REP_ACK);
    // With TLS the same export works.
    let out = stdout(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(tls_uri(&srv, &certs)),
    );
    assert_eq!(out.trim(), "8388608");
}

#[test]
fn client_certificates_are_verified_when_configured() {
    if !have("certtool") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (certs, img) = fixture(dir.path());
    let tls = TlsConfig::from_dir(&certs, true).unwrap();
    let srv = serve_unix(
        Server::new(vec![Export::new("", open_image(&img, true))]).tls(tls, true),
        dir.path(),
    );
    let out = stdout(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(tls_uri(&srv, &certs)),
    );
    assert_eq!(out.trim(), "8388608");
    let anonymous = dir.path().join("anonymous");
    ca_only(&certs, &anonymous);
    let refused = Command::new("nbdinfo")
        .arg("--size")
        .arg(tls_uri(&srv, &anonymous))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a client without a certificate got in"
    );
    // The refused handshake did not hurt the server.
    let again = stdout(
        Command::new("nbdinfo")
            .arg("--size")
            .arg(tls_uri(&srv, &certs)),
    );
    assert_eq!(again.trim(), "8388608");
}

#[test]
fn bad_credentials_are_reported_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = TlsConfig::from_dir(dir.path(), false).unwrap_err();
    assert!(err.to_string().contains("server-cert.pem"), "{err}");
    fs::write(dir.path().join("server-cert.pem"), "not pem").unwrap();
    fs::write(dir.path().join("server-key.pem"), "not pem").unwrap();
    let err = TlsConfig::from_dir(dir.path(), false).unwrap_err();
    assert!(err.to_string().contains("server-cert.pem"), "{err}");
}
