//! The store's own error type. It names what went wrong in store terms ([`ErrorKind`]); the
//! server decides what a client sees for each kind, so the store knows nothing of the wire.

use crate::backend::BackendError;
use std::time::Duration;

/// Why a block-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store: {0}")]
    Backend(#[from] BackendError),
    #[error("export's stored block size {stored} differs from configured block size {configured}")]
    BlockSizeMismatch { stored: u32, configured: u32 },
    /// The export's blocks were written with another compression or encryption setting.
    #[error("{setting} changed: the export's blocks were written with {setting} {stored:?}, the configuration says {configured:?} (fixed once the export holds data)")]
    CodecMismatch {
        setting: &'static str,
        stored: String,
        configured: String,
    },
    /// The configured key is not the one the export's blocks were encrypted with.
    #[error("wrong key: {key_file} is not the key this export was encrypted with (its fingerprint is {configured}, the export's is {stored})")]
    WrongKey {
        key_file: String,
        stored: String,
        configured: String,
    },
    #[error("flush did not complete within {0:?}; data stays dirty and is retried")]
    FlushTimeout(Duration),
    #[error("export metadata is invalid: {0}")]
    BadManifest(String),
    #[error("store is shutting down")]
    ShuttingDown,
    /// The server should have refused this request; a bug upstream, not a client problem.
    #[error("range {offset}+{len} is outside the export (size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A change to a read-only export.
    #[error("export is read-only")]
    ReadOnly,
    /// The export lease is not (or no longer) held: this daemon must not change the objects.
    #[error("export lease not held: {0}")]
    Fenced(String),
    /// An admin request that cannot be done as asked (names what is in the way).
    #[error("{0}")]
    Refused(String),
    /// The export's metadata changed under a conditional write; nothing was done.
    #[error("{0}")]
    Conflict(String),
    /// The local journal could not be read or written (FLUSH cannot promise durability).
    #[error("local journal: {0}")]
    Journal(String),
    /// Shutdown could not store everything: these blocks' latest data is not in S3.
    #[error("{count} dirty blocks could not be stored: {blocks}")]
    Unflushed { count: usize, blocks: String },
}

/// What kind of failure a [`StoreError`] is: the few distinctions a caller acts on (a client
/// protocol maps each to its own error code; everything about data is `Io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The data could not be read or stored (object store failure, timeout, bad metadata).
    Io,
    /// The request itself is wrong (a range outside the export).
    Invalid,
    /// A change to an export that is read-only.
    ReadOnly,
    /// This daemon may not change the export's objects now (lease lost or not held).
    Fenced,
    /// The store is going away.
    ShuttingDown,
}

impl StoreError {
    /// The kind of failure, for callers that map it to their own error codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::ShuttingDown => ErrorKind::ShuttingDown,
            StoreError::OutOfRange { .. } | StoreError::Refused(_) => ErrorKind::Invalid,
            StoreError::ReadOnly => ErrorKind::ReadOnly,
            StoreError::Fenced(_) => ErrorKind::Fenced,
            StoreError::Backend(_)
            | StoreError::BlockSizeMismatch { .. }
            | StoreError::CodecMismatch { .. }
            | StoreError::WrongKey { .. }
            | StoreError::FlushTimeout(_)
            | StoreError::BadManifest(_)
            | StoreError::Conflict(_)
            | StoreError::Journal(_)
            | StoreError::Unflushed { .. } => ErrorKind::Io,
        }
    }
}
