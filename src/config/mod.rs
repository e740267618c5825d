//! The configuration: `/etc/nbd-s3/exports.toml` as design.md §1 fixes it, parsed into
//! validated, typed values. Nothing downstream re-checks what this module has validated.

use std::path::PathBuf;
use std::time::Duration;

/// A fully validated configuration snapshot; reloads replace it whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub s3: S3Config,
    pub cache: CacheConfig,
    pub exports: Vec<ExportConfig>,
}

/// `[server]`: where clients reach us.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: Vec<ListenAddr>,
    /// Prometheus `/metrics` endpoint; off when absent.
    pub metrics: Option<std::net::SocketAddr>,
}

/// One listening address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `host:port` as written (resolved at bind time).
    Tcp(String),
    /// `unix:/path`.
    Unix(PathBuf),
}

/// `[s3]`: the object store every export uses.
#[derive(Clone, PartialEq)]
pub struct S3Config {
    /// `None` for AWS; `file:///dir` selects the local-directory store.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub access_key_id: Option<String>,
    /// Loaded from `secret_access_key_file`; never printed.
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `[cache]`: one budget shared by all exports.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Clean + dirty bytes held for all exports together.
    pub memory: u64,
    /// Most dirty bytes held; writers wait above it.
    pub dirty: u64,
    /// How long a FLUSH may wait for S3 before it fails with EIO (data stays dirty).
    pub flush_timeout: Duration,
}

/// One `[[export]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    pub size: u64,
    pub bucket: String,
    pub prefix: String,
    pub block_size: u32,
    pub read_only: bool,
    pub description: Option<String>,
}

/// Default block size: 128 KiB objects balance request rate against read amplification.
pub const DEFAULT_BLOCK_SIZE: u32 = 128 * 1024;
