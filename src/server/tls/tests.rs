//! Applying `[server.tls]`: a failed reload keeps the credentials in use, and credentials that
//! never loaded fail closed.

use super::*;
use crate::config::{TlsConfig, TlsMode};
use crate::tls::test_pki::{write_file, write_server, ServerFiles, TestCa};

fn config(files: &ServerFiles, mutual: bool) -> TlsConfig {
    TlsConfig {
        cert: files.cert.clone(),
        key: files.key.clone(),
        client_ca: mutual.then(|| files.ca.clone()),
        mode: TlsMode::Require,
    }
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
