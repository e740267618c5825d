//! Loading `[server.tls]` files: good credentials build (with and without a client CA), each
//! kind of bad file is reported naming it, and a failed reload keeps the credentials in use.

use super::test_pki::{write_file, write_server, TestCa};
use super::*;
use crate::config::{TlsConfig, TlsMode};

fn config(files: &super::test_pki::ServerFiles, mutual: bool) -> TlsConfig {
    TlsConfig {
        cert: files.cert.clone(),
        key: files.key.clone(),
        client_ca: mutual.then(|| files.ca.clone()),
        mode: TlsMode::Require,
    }
}

#[test]
fn good_credentials_build_with_and_without_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    server_config(&config(&files, false)).unwrap();
    server_config(&config(&files, true)).unwrap();
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    let good = std::fs::read_to_string(&files.cert).unwrap();
    let key = std::fs::read_to_string(&files.key).unwrap();

    write_file(&files.cert, "not a certificate\n", 0o644);
    let e = server_config(&config(&files, false)).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    assert!(e.to_string().contains("server-cert.pem"), "{e}");

    write_file(&files.cert, &good, 0o644);
    write_file(&files.key, &good, 0o600);
    let e = server_config(&config(&files, false)).unwrap_err();
    assert!(matches!(e, TlsError::NoKey { .. }), "{e}");

    // A key from another certificate.
    let other = TestCa::new("other").issue_server();
    write_file(&files.key, &other.key_pem, 0o600);
    let e = server_config(&config(&files, false)).unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(e.to_string().contains("does not belong"), "{e}");

    write_file(&files.key, &key, 0o600);
    write_file(&files.ca, "-----BEGIN CERTIFICATE-----\n!!!\n", 0o644);
    let e = server_config(&config(&files, true)).unwrap_err();
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
}

#[test]
fn failed_reload_keeps_the_credentials_in_service() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    let source = TlsAcceptorSource::default();
    assert!(source.snapshot().is_none(), "TLS off until configured");
    source.apply(Some(&config(&files, false))).unwrap();
    assert!(source.snapshot().unwrap().acceptor.is_some());

    write_file(&files.cert, "garbage\n", 0o644);
    let mut allow = config(&files, false);
    allow.mode = TlsMode::Allow;
    assert!(source.apply(Some(&allow)).is_err());
    let kept = source.snapshot().unwrap();
    assert!(kept.acceptor.is_some(), "old credentials dropped");
    assert_eq!(kept.mode, TlsMode::Allow, "the new mode applies");

    source.apply(None).unwrap();
    assert!(source.snapshot().is_none());
}

#[test]
fn credentials_that_never_loaded_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    write_file(&files.key, "garbage\n", 0o600);
    let source = TlsAcceptorSource::default();
    assert!(source.apply(Some(&config(&files, false))).is_err());
    let policy = source.snapshot().expect("TLS stays configured");
    assert!(policy.acceptor.is_none());
    assert_eq!(policy.mode, TlsMode::Require);
}
