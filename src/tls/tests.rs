//! Loading TLS files: good credentials build (with and without a client CA), and each kind of
//! bad file is reported naming it.

use super::test_pki::{write_file, write_server, ServerFiles, TestCa};
use super::*;

impl ServerFiles {
    /// These files as `TlsFiles`, with the CA as `client_ca` when `mutual`.
    fn tls(&self, mutual: bool) -> TlsFiles<'_> {
        TlsFiles {
            cert: &self.cert,
            key: &self.key,
            client_ca: mutual.then_some(self.ca.as_path()),
        }
    }
}

#[test]
fn good_credentials_build_with_and_without_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    server_config(files.tls(false)).unwrap();
    server_config(files.tls(true)).unwrap();
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_server(dir.path(), &TestCa::new("ca"));
    let good = std::fs::read_to_string(&files.cert).unwrap();
    let key = std::fs::read_to_string(&files.key).unwrap();

    write_file(&files.cert, "not a certificate\n", 0o644);
    let e = server_config(files.tls(false)).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    assert!(e.to_string().contains("server-cert.pem"), "{e}");

    write_file(&files.cert, &good, 0o644);
    write_file(&files.key, &good, 0o600);
    let e = server_config(files.tls(false)).unwrap_err();
    assert!(matches!(e, TlsError::NoKey { .. }), "{e}");

    // A key from another certificate.
    let other = TestCa::new("other").issue_server();
    write_file(&files.key, &other.key_pem, 0o600);
    let e = server_config(files.tls(false)).unwrap_err();
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(e.to_string().contains("does not belong"), "{e}");

    write_file(&files.key, &key, 0o600);
    write_file(&files.ca, "-----BEGIN CERTIFICATE-----\n!!!\n", 0o644);
    let e = server_config(files.tls(true)).unwrap_err();
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
}
