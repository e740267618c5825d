//! `<prefix>nbd-s3.json`: the export's self-description. It pins the block size, because data
//! written with one block size is garbage when read with another.

use super::{BlockStoreConfig, StoreError};
use crate::backend::{BackendError, DynObjectStore};
use crate::retry::Policy;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Name of the manifest object under the export's prefix.
pub(crate) const MANIFEST_NAME: &str = "nbd-s3.json";

/// The JSON document stored in the manifest object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub format: u32,
    pub block_size: u64,
    pub size: u64,
    #[serde(default)]
    pub created: String,
}

/// Reads the manifest (writing it when absent and writable) and checks the block size.
/// Returns the manifest in effect (`None` for a read-only export that has none).
pub(crate) async fn check_or_create(
    objects: &DynObjectStore,
    cfg: &BlockStoreConfig,
) -> Result<Option<Manifest>, StoreError> {
    let key = format!("{}{MANIFEST_NAME}", cfg.prefix);
    match retry(|| objects.get(&key)).await? {
        Some(raw) => {
            let m: Manifest = serde_json::from_slice(&raw)
                .map_err(|e| StoreError::BadManifest(format!("{key}: {e}")))?;
            if m.format != 1 {
                return Err(StoreError::BadManifest(format!(
                    "{key}: unsupported format {}",
                    m.format
                )));
            }
            if m.block_size != u64::from(cfg.block_size) {
                return Err(StoreError::BlockSizeMismatch {
                    stored: u32::try_from(m.block_size).unwrap_or(u32::MAX),
                    configured: cfg.block_size,
                });
            }
            Ok(Some(m))
        }
        None if cfg.read_only => Ok(None),
        None => {
            let m = Manifest {
                format: 1,
                block_size: u64::from(cfg.block_size),
                size: cfg.size,
                created: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
            };
            let body = serde_json::to_vec_pretty(&m)
                .map_err(|e| StoreError::BadManifest(e.to_string()))?;
            let body = Bytes::from(body);
            retry(|| objects.put(&key, body.clone())).await?;
            tracing::info!(key = %key, block_size = cfg.block_size, "wrote export manifest");
            Ok(Some(m))
        }
    }
}

/// Bounded retries for the calls made while opening an export: a transient fault at start-up
/// should not refuse the export, a persistent one should.
pub(crate) async fn retry<T, F, Fut>(op: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let warn =
        |e: &BackendError, _, _| tracing::warn!(error = %e, "object store call failed; retrying");
    Policy::MANIFEST.run_observed(op, warn).await
}
