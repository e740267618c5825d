//! A throw-away PKI for TLS tests: a CA, server certificates for 127.0.0.1 / ::1 / localhost
//! and client certificates, written as PEM files where nbd-s3 (`[server.tls]`) and the clients
//! look for them (libnbd/GnuTLS and qemu: a directory with `ca-cert.pem`, `client-cert.pem`,
//! `client-key.pem`). Self-contained (rcgen + std) so the crate's unit tests include it too.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A certificate authority that issues server and client certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its private key, as PEM text.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where `write_server` put the server's files (absolute paths, for `[server.tls]`).
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA clients must present certificates from (for `client_ca`).
    pub ca: PathBuf,
}

fn params(common_name: &str, sans: &[&str]) -> CertificateParams {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(sans).expect("certificate parameters");
    // Distinct subjects: a leaf whose subject equals its issuer's looks self-signed.
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.distinguished_name
        .push(DnType::OrganizationName, "nbd-s3 tests");
    p
}

impl TestCa {
    /// A new CA named `name` (its own key).
    pub fn new(name: &str) -> TestCa {
        let mut p = params(name, &[]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        TestCa { cert, key }
    }

    /// The CA certificate (what clients trust, or `client_ca`).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate valid for 127.0.0.1, ::1 and localhost.
    pub fn issue_server(&self) -> Issued {
        self.issue(
            "nbd-s3 test server",
            &["127.0.0.1", "::1", "localhost"],
            false,
        )
    }

    /// A client certificate (TLS client authentication).
    pub fn issue_client(&self, name: &str) -> Issued {
        self.issue(name, &[], true)
    }

    fn issue(&self, name: &str, sans: &[&str], client: bool) -> Issued {
        let mut p = params(name, sans);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Writes `text` to `path` with `mode`.
pub fn write_file(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A server certificate from `ca` in `dir`: `server-cert.pem`, `server-key.pem` (0600) and
/// `ca-cert.pem`.
pub fn write_server(dir: &Path, ca: &TestCa) -> ServerFiles {
    std::fs::create_dir_all(dir).expect("server cert dir");
    let issued = ca.issue_server();
    let files = ServerFiles {
        cert: dir.join("server-cert.pem"),
        key: dir.join("server-key.pem"),
        ca: dir.join("ca-cert.pem"),
    };
    write_file(&files.cert, &issued.cert_pem, 0o644);
    write_file(&files.key, &issued.key_pem, 0o600);
    write_file(&files.ca, &ca.cert_pem(), 0o644);
    files
}

/// A libnbd/qemu client certificate directory in `dir`: `ca-cert.pem` trusting `trust`, and
/// with `client` a `client-cert.pem` / `client-key.pem` issued by that CA.
pub fn write_client_dir(dir: &Path, trust: &TestCa, client: Option<&TestCa>) -> PathBuf {
    std::fs::create_dir_all(dir).expect("client cert dir");
    write_file(&dir.join("ca-cert.pem"), &trust.cert_pem(), 0o644);
    if let Some(issuer) = client {
        let issued = issuer.issue_client("nbd-s3 test client");
        write_file(&dir.join("client-cert.pem"), &issued.cert_pem, 0o644);
        write_file(&dir.join("client-key.pem"), &issued.key_pem, 0o600);
    }
    dir.to_path_buf()
}

/// The `[server.tls]` section for `files`, as `DaemonConfig::extra_server` lines.
pub fn server_tls_lines(files: &ServerFiles, mode: &str, mutual: bool) -> Vec<String> {
    let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let mut lines = vec![
        "[server.tls]".to_string(),
        format!("cert = {}", q(&files.cert)),
        format!("key = {}", q(&files.key)),
        format!("mode = \"{mode}\""),
    ];
    if mutual {
        lines.push(format!("client_ca = {}", q(&files.ca)));
    }
    lines
}
