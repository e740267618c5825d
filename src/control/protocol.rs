//! The documents on the control socket. Requests are tagged by `command`; every reply is
//! `{"ok": true, "result": …}` or `{"ok": false, "error": "…"}`. The result of each command is
//! a typed value here, so the daemon and the command line cannot disagree on field names.

use serde::{Deserialize, Serialize};

/// Longest request line the daemon reads (names are at most a few KiB).
pub const MAX_REQUEST: usize = 64 * 1024;

/// One admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// Every export's state, clients, dirty bytes and lease holder.
    Status,
    /// Takes a snapshot.
    SnapshotCreate { export: String, snapshot: String },
    /// Lists the snapshots of one export, or of all.
    SnapshotList {
        #[serde(default)]
        export: Option<String>,
    },
    /// Deletes a snapshot and what nothing else needs.
    SnapshotDelete { export: String, snapshot: String },
    /// Makes an export read as one of its snapshots.
    SnapshotRollback { export: String, snapshot: String },
    /// A clone copies what it reads from its base.
    Flatten { export: String },
    /// Deletes objects of an export nothing needs.
    Gc { export: String },
    /// Hand listeners and client connections to the process asking (`handover`); answered
    /// with handover records instead of a `Reply`.
    Takeover,
}

/// The answer to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A successful reply carrying `result`.
    pub fn done(result: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    /// A refusal saying why.
    pub fn refused(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
}

/// `status`: one entry per configured export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub exports: Vec<ExportStatus>,
}

/// One export in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStatus {
    pub name: String,
    /// `serving` or `refused`.
    pub state: String,
    /// Why it is refused (`None` while serving).
    pub reason: Option<String>,
    /// Connections in transmission phase on this export.
    pub clients: usize,
    /// Bytes written by clients and not yet stored in S3.
    pub dirty_bytes: u64,
    /// Who holds the export lease: this daemon, another one (refused), or nobody (`None`).
    pub lease_holder: Option<String>,
    /// `durability = "local"`: bytes in the local journal not yet known to be in S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_bytes: Option<u64>,
    /// Object-store requests made for the export since the daemon started (retries count).
    #[serde(default)]
    pub s3_requests: u64,
    /// Bytes clients wrote to the export (WRITE) since the daemon started.
    #[serde(default)]
    pub bytes_written: u64,
}

impl ExportStatus {
    /// Object-store requests per GiB clients wrote (all requests, reads and leases too), or
    /// `None` before anything was written: what the export's writes cost.
    pub fn requests_per_gib_written(&self) -> Option<u64> {
        (self.bytes_written > 0).then(|| {
            let per = u128::from(self.s3_requests) * (1u128 << 30) / u128::from(self.bytes_written);
            u64::try_from(per).unwrap_or(u64::MAX)
        })
    }
}

/// One snapshot in `snapshot list` and `snapshot create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub export: String,
    pub snapshot: String,
    /// RFC 3339.
    pub created: String,
    /// The export's size when the snapshot was taken.
    pub size: u64,
    /// Bytes stored for this snapshot alone: what deleting it frees.
    pub bytes_held_only: u64,
    /// Exports cloned from this snapshot.
    pub clones: Vec<String>,
}

/// `snapshot list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotEntry>,
}

/// `snapshot delete` and `gc`: how many objects were deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted_objects: u64,
}

/// `flatten`: how many blocks were copied from the base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copied {
    pub copied_blocks: u64,
}
