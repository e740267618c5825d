//! The access bed: exports with different `allow` lists (everyone, loopback, IPv6 loopback
//! only, Unix-socket clients only), served on TCP and on a Unix socket, for tests of who sees
//! and opens what.

use super::{ExportSpec, NbdS3, S3Server};

/// Exports with different allow lists, served on TCP and a Unix socket.
pub struct AccessBed {
    pub nbd: NbdS3,
    /// The Unix-socket listener, `unix:/path`.
    pub sock: String,
    _dir: tempfile::TempDir,
    _s3: S3Server,
}

impl AccessBed {
    pub fn start() -> AccessBed {
        let s3 = S3Server::start();
        let dir = tempfile::Builder::new()
            .prefix("nbd-s3-access.")
            .tempdir()
            .expect("tempdir");
        let sock = format!("unix:{}", dir.path().join("nbd.sock").display());
        let export = |name: &str, allow: Option<&str>| {
            let e = ExportSpec::new(name).size("4MiB");
            match allow {
                Some(list) => e.line(&format!("allow = {list}")),
                None => e,
            }
        };
        let nbd = NbdS3::builder(&s3)
            .listen(&["127.0.0.1:0", &sock])
            .export(export("open", None))
            .export(export(
                "loopback",
                Some(r#"["127.0.0.0/8", "2001:db8::/32"]"#),
            ))
            .export(export("v6only", Some(r#"["::1"]"#)))
            .export(export("unixonly", Some(r#"["unix"]"#)))
            .start();
        AccessBed {
            nbd,
            sock,
            _dir: dir,
            _s3: s3,
        }
    }

    /// `127.0.0.1:PORT` of the TCP listener.
    pub fn tcp(&self) -> String {
        format!("127.0.0.1:{}", self.nbd.port())
    }
}
