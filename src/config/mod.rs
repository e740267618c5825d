//! The configuration: `/etc/nbd-s3/exports.toml` as README documents it, parsed into
//! validated, typed values. Nothing downstream re-checks what this module has validated.

mod adhoc;
mod codec;
mod error;
mod locate;
mod raw;
mod secrets;
mod security;
pub mod size;
mod summary;
mod validate;

#[cfg(test)]
mod tests;

pub use adhoc::AdHoc;
pub use codec::{CodecConfig, Compression, EncryptionKey, KEY_LEN};
pub use error::{ConfigError, Diagnostic};
pub use secrets::{command_line_warnings, file_warnings, Secret};
pub use summary::{summary_table, table};
pub use validate::{
    check_name, check_snapshot_name, parse_listen, read_secret, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
pub use validate::{DEFAULT_DIRTY, DEFAULT_MEMORY};

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `serve` and `check-config` look without `--config` / `NBD_S3_CONFIG`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nbd-s3/exports.toml";
/// The listen address when `[server] listen` is absent (the IANA NBD port).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:10809";
/// The admin commands' socket when `[server] control` is absent.
pub const DEFAULT_CONTROL: &str = "/run/nbd-s3/control.sock";
/// Default `[cache] flush_timeout`: long enough to ride out an S3 hiccup, short enough that a
/// client's FLUSH does not hang forever.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

impl Config {
    /// Reads and validates the file at `path`. Errors name `path` as given, so they match the
    /// admin's command line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        // Absolute, so files named relative to the config ([server.tls], the secret) are
        // found again at reload whatever the working directory is by then.
        let base = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        Self::parse(&src, &shown, &base)
    }

    /// Parses and validates `src` (the contents of the file shown as `path`); relative
    /// `secret_access_key_file` paths are resolved against `base_dir`.
    pub fn parse(src: &str, path: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        if src.trim().is_empty() {
            // Almost always a file caught mid-save (truncated, not yet written): applying it
            // would withdraw every export.
            return Err(ConfigError::Invalid(vec![Diagnostic {
                path: path.to_string(),
                line: 1,
                message:
                    "the file is empty (an empty configuration needs at least a [server] section)"
                        .into(),
            }]));
        }
        let raw = raw::parse(src)
            .map_err(|e| ConfigError::Invalid(vec![locate::diagnose(path, src, &e)]))?;
        let mut checker = validate::Checker::new(path, src, base_dir);
        match checker.config(raw) {
            Some(cfg) => Ok(cfg),
            None => Err(ConfigError::Invalid(checker.errors)),
        }
    }

    /// The export named `name`, if configured.
    pub fn export(&self, name: &str) -> Option<&ExportConfig> {
        self.exports.iter().find(|e| e.name == name)
    }
}

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
    /// `[server.tls]`: NBD_OPT_STARTTLS with these credentials; plain text when absent.
    pub tls: Option<TlsConfig>,
    /// The admin commands' Unix socket (`control`); `None` when `"off"`.
    pub control: Option<PathBuf>,
}

/// `[server.tls]`. Paths are absolute (relative ones resolved against the config file's
/// directory) so a reload can re-read the files wherever the daemon's working directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key of `cert` (not world-readable).
    pub key: PathBuf,
    /// PEM CA bundle: when set, only clients with a certificate from it are admitted (mTLS).
    pub client_ca: Option<PathBuf>,
    pub mode: TlsMode,
}

/// Whether plain-text clients are still served once TLS is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Every option but STARTTLS and ABORT gets ERR_TLS_REQD until TLS is up (the default:
    /// configuring TLS and still leaking data in clear text would surprise an admin).
    Require,
    /// TLS is offered; plain-text clients are served too.
    Allow,
}

/// One entry of an export's `allow` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowRule {
    /// Clients whose address is in this network (a bare address is a /32 or /128).
    Net(ipnet::IpNet),
    /// Clients on any Unix-socket listener.
    Unix,
}

impl AllowRule {
    /// Whether a TCP client at `ip` matches; IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`,
    /// what a dual-stack listener reports) match IPv4 rules.
    pub fn matches_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        matches!(self, AllowRule::Net(net) if net.contains(&ip))
    }
}

/// An export's `lease`: whether this daemon must hold `<prefix>nbd-s3.lock` to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseMode {
    /// No lease: the admin promises that only one daemon writes this export (required for
    /// object stores without conditional writes).
    Off,
    /// Hold the lease, valid for `ttl` after each renewal.
    On { ttl: Duration },
}

/// Default lease time: a crashed holder on another host blocks takeover at most this long;
/// long enough that a 30 s S3 outage does not fence the export (see `lease::RENEWALS_PER_TTL`),
/// and renewals (every 10 s) cost one small PUT.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

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
    /// Whether throttling answers (503 SlowDown) lower each export's object calls in flight.
    pub adaptive_concurrency: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("adaptive_concurrency", &self.adaptive_concurrency)
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
    /// `journal` and `journal_size`: the local journal of `durability = "local"` exports.
    pub journal: Option<JournalConfig>,
}

/// `[cache] journal` (a directory on a local disk) and `journal_size` (shared by all exports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    pub dir: std::path::PathBuf,
    pub size: u64,
}

/// Default `[cache] journal_size`.
pub const DEFAULT_JOURNAL_SIZE: u64 = 8 << 30;

/// What a FLUSH reply promises for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Stored in S3 (the default).
    #[default]
    S3,
    /// fsynced in the local journal; uploaded behind it in flush order.
    Local,
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
    /// Who may see and open the export; `None` admits everyone.
    pub allow: Option<Vec<AllowRule>>,
    /// Irrelevant for read-only exports, which never take a lease.
    pub lease: LeaseMode,
    /// `compression` and `encryption_key_file`: fixed once the export holds data.
    pub codec: CodecConfig,
    /// `base = "EXPORT@SNAP"`: a clone starts as that snapshot's content.
    pub base: Option<BaseRef>,
    /// `snapshot_every` / `snapshot_keep`: automatic snapshots.
    pub auto_snapshots: Option<AutoSnapshots>,
    /// `durability`: what FLUSH waits for.
    pub durability: Durability,
}

/// `snapshot_every` (at least 10 s) and `snapshot_keep` (how many automatic snapshots stay;
/// `None`: all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoSnapshots {
    pub every: Duration,
    pub keep: Option<u32>,
}

/// A clone's `base`: a snapshot of another export of the same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    pub export: String,
    pub snapshot: String,
    /// Where EXPORT's objects are (bucket, prefix), when EXPORT is configured: needed only
    /// to create the clone; afterwards the clone's own manifest records it.
    pub location: Option<(String, String)>,
}

/// Default block size: 128 KiB objects balance request rate against read amplification.
pub const DEFAULT_BLOCK_SIZE: u32 = 128 * 1024;
