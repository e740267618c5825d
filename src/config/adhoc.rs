//! The ad-hoc single-export mode kept from the original Python server for containers: one
//! export described entirely by flags / environment, no file. It produces the same validated
//! `Config` a file would, so the daemon has one code path.

use super::size::parse_size;
use super::validate::{check_bucket, check_endpoint, check_name, check_prefix};
use super::{CacheConfig, Config, ConfigError, ExportConfig, ListenAddr, S3Config, ServerConfig};
use super::{DEFAULT_BLOCK_SIZE, DEFAULT_DIRTY, DEFAULT_FLUSH_TIMEOUT, DEFAULT_MEMORY};

/// The flags of ad-hoc mode (already merged with their environment variables by clap).
#[derive(Clone, Default)]
pub struct AdHoc {
    pub export_name: String,
    pub host: String,
    pub port: u16,
    /// Size as written (`1GB`, `20GiB`, `1073741824`).
    pub size: String,
    pub s3_endpoint: Option<String>,
    pub s3_access_key: Option<String>,
    /// Redacted in `Debug` (clap's derived `Debug` of the parsed flags included).
    pub s3_secret_key: Option<super::Secret>,
    pub s3_bucket: String,
    pub s3_region: Option<String>,
}

impl std::fmt::Debug for AdHoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdHoc")
            .field("export_name", &self.export_name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("size", &self.size)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_access_key", &self.s3_access_key)
            .field("s3_secret_key", &self.s3_secret_key)
            .field("s3_bucket", &self.s3_bucket)
            .field("s3_region", &self.s3_region)
            .finish()
    }
}

fn flag_err(flag: &str, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError::Flag(format!("{flag}: {msg}"))
}

impl AdHoc {
    /// Builds and validates the one-export configuration (prefix `<export-name>/`).
    pub fn into_config(self) -> Result<Config, ConfigError> {
        check_name(&self.export_name).map_err(|m| flag_err("--export-name", m))?;
        let size = parse_size(&self.size).map_err(|e| flag_err("--size", e))?;
        if size == 0 || size % 512 != 0 || size > i64::MAX as u64 {
            return Err(flag_err(
                "--size",
                format!("{size} bytes is not a positive multiple of 512"),
            ));
        }
        check_bucket(&self.s3_bucket).map_err(|m| flag_err("--s3-bucket", m))?;
        let prefix = format!("{}/", self.export_name);
        check_prefix(&prefix).map_err(|m| flag_err("--export-name", m))?;
        if let Some(e) = &self.s3_endpoint {
            check_endpoint(e).map_err(|m| flag_err("--s3-endpoint", m))?;
        }
        let (access_key_id, secret_access_key) = match (self.s3_access_key, self.s3_secret_key) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.expose().is_empty() => {
                (Some(id), Some(secret.into_inner()))
            }
            (None, None) => (None, None),
            _ => {
                return Err(flag_err(
                    "--s3-access-key/--s3-secret-key",
                    "give both (or neither, to use the AWS credential chain)",
                ))
            }
        };
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host
        };
        Ok(Config {
            server: ServerConfig {
                listen: vec![ListenAddr::Tcp(format!("{host}:{}", self.port))],
                metrics: None,
                tls: None,
                control: Some(super::DEFAULT_CONTROL.into()),
            },
            s3: S3Config {
                path_style: self.s3_endpoint.is_some(),
                endpoint: self.s3_endpoint,
                region: self.s3_region.filter(|r| !r.is_empty()),
                access_key_id,
                secret_access_key,
                adaptive_concurrency: true,
            },
            cache: CacheConfig {
                memory: DEFAULT_MEMORY,
                dirty: DEFAULT_DIRTY,
                flush_timeout: DEFAULT_FLUSH_TIMEOUT,
                journal: None,
            },
            exports: vec![ExportConfig {
                name: self.export_name,
                size,
                bucket: self.s3_bucket,
                prefix,
                block_size: DEFAULT_BLOCK_SIZE,
                read_only: false,
                description: None,
                allow: None,
                lease: super::LeaseMode::On {
                    ttl: super::DEFAULT_LEASE_TTL,
                },
                codec: super::CodecConfig::default(),
                base: None,
                auto_snapshots: None,
                durability: super::Durability::S3,
            }],
        })
    }
}
