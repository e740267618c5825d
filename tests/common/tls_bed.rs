//! The TLS bed: the daemon serving one export with `[server.tls]` from a fresh test CA, and
//! the certificate directories libnbd clients need.

use super::tls::{server_tls_lines, write_client_dir, write_server, ServerFiles, TestCa};
use super::{ExportSpec, NbdS3, S3Server};
use std::path::{Path, PathBuf};

/// The one export of the bed.
pub const EXPORT: &str = "secure";

/// A daemon serving `EXPORT` with `[server.tls]` from a fresh CA (fields drop in order).
pub struct TlsBed {
    pub nbd: NbdS3,
    pub ca: TestCa,
    pub files: ServerFiles,
    _certs: tempfile::TempDir,
    _s3: S3Server,
}

impl TlsBed {
    /// Starts S3 and the daemon with TLS `mode` (`require`, `allow`), asking clients for a
    /// certificate from the same CA when `mutual`.
    pub fn start(mode: &str, mutual: bool) -> TlsBed {
        let s3 = S3Server::start();
        let ca = TestCa::new("nbd-s3 test CA");
        let certs = tempfile::Builder::new()
            .prefix("nbd-s3-tls.")
            .tempdir()
            .expect("tempdir");
        let files = write_server(certs.path(), &ca);
        let lines = server_tls_lines(&files, mode, mutual);
        let nbd = NbdS3::builder(&s3)
            .export(ExportSpec::new(EXPORT).size("16MiB"))
            .config(|c| c.extra_server.extend(lines))
            .start();
        TlsBed {
            nbd,
            ca,
            files,
            _certs: certs,
            _s3: s3,
        }
    }

    /// `127.0.0.1:PORT` of the listener.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd.port())
    }

    /// `nbds://` URI with a libnbd certificate directory.
    pub fn tls_uri(&self, certs: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/{EXPORT}?tls-certificates={}",
            self.nbd.port(),
            certs.display()
        )
    }

    /// A client certificate directory under the daemon's scratch dir.
    pub fn client_dir(&self, name: &str, trust: &TestCa, client: Option<&TestCa>) -> PathBuf {
        write_client_dir(&self.nbd.scratch().join(name), trust, client)
    }
}
