//! Why an export is not served, and whether the daemon tries again by itself. Each reason is
//! typed, so the reopen schedule, the log and the client's error message all read the same
//! value; `Display` gives the message clients (ERR_UNKNOWN) and the log see.

use crate::backend::BackendError;
use crate::lease::LeaseError;
use crate::retry::{Classify, Kind};
use crate::store::StoreError;
use std::fmt;
use std::time::Duration;

/// Whether a refused export is worth opening again without a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Refused for a reason only an admin can fix (block-size mismatch, a store without
    /// conditional writes): retrying would only spin.
    Never,
    /// The store could not be reached: retry soon, backing off (`Policy::REOPEN`).
    Backoff,
    /// Waiting on something slow (another daemon's lease, a missing bucket): retry this often.
    Every(Duration),
}

/// Longest wait between retries of a refused export whose store refused for good (a missing
/// bucket or credentials): an admin fixing it sees the export come up within this.
pub const SLOW_RETRY: Duration = Duration::from_secs(60);

impl Retry {
    /// For an export whose lease another daemon holds: asked about every third of the lease
    /// time, so its expiry is noticed (and taken over) about as fast as a renewal would be.
    pub fn lease_held(ttl: Duration) -> Retry {
        Retry::Every((ttl / 3).max(Duration::from_secs(1)))
    }
}

/// Which step of opening an export an object-store call failed in; it prefixes the message,
/// as the admin needs to know whether the lease or the export's own objects were the trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Binding the bucket (before any request).
    Bucket,
    /// Taking the export lease.
    Lease,
    /// Reading or writing the manifest, listing the blocks.
    Open,
}

impl Step {
    fn prefix(self) -> &'static str {
        match self {
            Step::Bucket => "",
            Step::Lease => "cannot take the export lease: ",
            Step::Open => "object store: ",
        }
    }
}

/// Why an export is refused.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// The object store could not be reached, or answered with a passing error.
    Unreachable { step: Step, error: BackendError },
    /// The object store refused for good: credentials, a missing bucket, a feature it lacks.
    Denied { step: Step, error: BackendError },
    /// An object read back was not what was written (checksum or length).
    Corrupt { step: Step, error: BackendError },
    /// Another daemon holds the export lease.
    LeaseHeld {
        holder: String,
        bucket: String,
        key: String,
        ttl: Duration,
    },
    /// The bucket ignores conditional writes, so a lease cannot protect it.
    NoConditionalWrites { bucket: String },
    /// The export's objects were written with another block size.
    BlockSizeMismatch { stored: u32, configured: u32 },
    /// The export's blocks were written with another compression or encryption setting.
    CodecMismatch {
        setting: &'static str,
        stored: String,
        configured: String,
    },
    /// The configured key is not the one the export was encrypted with.
    WrongKey {
        key_file: String,
        stored: String,
        configured: String,
    },
    /// The manifest does not parse or has a format this version does not know.
    BadManifest(String),
    /// The export's objects overlap a removed export that clients still use.
    OverlapsAttached { other: String, clients: usize },
    /// The export's objects overlap a removed export whose data is not all stored yet.
    OverlapsUnflushed { other: String, error: String },
    /// Anything else opening the store reported (its message).
    Other(String),
}

impl Refusal {
    /// An object-store failure during `step`, sorted by what it means.
    pub fn backend(step: Step, error: BackendError) -> Self {
        match error.kind() {
            Kind::Transient => Refusal::Unreachable { step, error },
            Kind::Corrupt => Refusal::Corrupt { step, error },
            Kind::Permanent => Refusal::Denied { step, error },
        }
    }

    /// Why the lease could not be taken; `ttl` is the export's lease time.
    pub fn lease(e: LeaseError, ttl: Duration) -> Self {
        match e {
            LeaseError::Held {
                holder,
                bucket,
                key,
            } => Refusal::LeaseHeld {
                holder,
                bucket,
                key,
                ttl,
            },
            LeaseError::Unsupported { bucket } => Refusal::NoConditionalWrites { bucket },
            LeaseError::Backend(b) => Refusal::backend(Step::Lease, b),
            LeaseError::Lost(why) => Refusal::Other(why),
        }
    }

    /// Whether and when the daemon opens the export again by itself.
    pub fn retry(&self) -> Retry {
        match self {
            // A test or factory that cannot even bind the bucket is a configuration matter.
            Refusal::Unreachable {
                step: Step::Bucket, ..
            } => Retry::Every(SLOW_RETRY),
            Refusal::Unreachable { .. } => Retry::Backoff,
            // The lease object is rewritten in place by its holder: a read that caught it
            // half-written is a torn read, gone on the next try.
            Refusal::Corrupt {
                step: Step::Lease, ..
            } => Retry::Backoff,
            Refusal::Denied { .. } | Refusal::Corrupt { .. } => Retry::Every(SLOW_RETRY),
            Refusal::LeaseHeld { ttl, .. } => Retry::lease_held(*ttl),
            Refusal::NoConditionalWrites { .. }
            | Refusal::BlockSizeMismatch { .. }
            | Refusal::CodecMismatch { .. }
            | Refusal::WrongKey { .. }
            | Refusal::BadManifest(_)
            | Refusal::OverlapsAttached { .. }
            | Refusal::OverlapsUnflushed { .. }
            | Refusal::Other(_) => Retry::Never,
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Backend(b) => Refusal::backend(Step::Open, b),
            StoreError::BlockSizeMismatch { stored, configured } => {
                Refusal::BlockSizeMismatch { stored, configured }
            }
            StoreError::CodecMismatch {
                setting,
                stored,
                configured,
            } => Refusal::CodecMismatch {
                setting,
                stored,
                configured,
            },
            StoreError::WrongKey {
                key_file,
                stored,
                configured,
            } => Refusal::WrongKey {
                key_file,
                stored,
                configured,
            },
            StoreError::BadManifest(m) => Refusal::BadManifest(m),
            other => Refusal::Other(other.to_string()),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unreachable { step, error }
            | Refusal::Denied { step, error }
            | Refusal::Corrupt { step, error } => write!(f, "{}{error}", step.prefix()),
            Refusal::LeaseHeld {
                holder,
                bucket,
                key,
                ..
            } => {
                let held = LeaseError::Held {
                    holder: holder.clone(),
                    bucket: bucket.clone(),
                    key: key.clone(),
                };
                write!(f, "{held}")
            }
            Refusal::NoConditionalWrites { bucket } => {
                let unsupported = LeaseError::Unsupported {
                    bucket: bucket.clone(),
                };
                write!(f, "{unsupported}")
            }
            Refusal::BlockSizeMismatch { stored, configured } => write!(
                f,
                "{}",
                StoreError::BlockSizeMismatch {
                    stored: *stored,
                    configured: *configured
                }
            ),
            Refusal::CodecMismatch {
                setting,
                stored,
                configured,
            } => {
                let e = StoreError::CodecMismatch {
                    setting,
                    stored: stored.clone(),
                    configured: configured.clone(),
                };
                write!(f, "{e}")
            }
            Refusal::WrongKey {
                key_file,
                stored,
                configured,
            } => {
                let e = StoreError::WrongKey {
                    key_file: key_file.clone(),
                    stored: stored.clone(),
                    configured: configured.clone(),
                };
                write!(f, "{e}")
            }
            Refusal::BadManifest(m) => write!(f, "{}", StoreError::BadManifest(m.clone())),
            Refusal::OverlapsAttached { other, clients } => write!(
                f,
                "objects overlap removed export {other:?}, which still has {clients} client(s) attached; reload again after they disconnect"
            ),
            Refusal::OverlapsUnflushed { other, error } => write!(
                f,
                "objects overlap removed export {other:?}, whose data is not all in S3 yet ({error}); reload again later"
            ),
            Refusal::Other(m) => f.write_str(m),
        }
    }
}
