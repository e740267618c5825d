//! The local journal of a `durability = "local"` export: every change is appended here
//! before its reply, and a FLUSH returns once the journal is fsynced, so a commit costs a
//! local fsync instead of an S3 round trip. The store uploads behind it in flush order and
//! tells the journal how far S3 has caught up; whole segments are then deleted.
//!
//! - `record`: the on-disk record (header, CRC-32C, payload) and its decoder
//! - `space`: the journal size shared by all exports; writers wait when it is full
//! - `segments`: segment files in a directory; the writer thread that appends and fsyncs
//! - `scan`: reads the segments left by a previous process, up to the first torn record
//!
//! Speaks no NBD and knows no blocks: offsets, lengths and the store's change numbers only.

pub mod record;
mod scan;
mod segments;
pub mod space;

pub use record::{Entry, Kind, Record};
pub use scan::{has_segments, scan, set_aside, Scanned};
pub use segments::{Journal, JournalStats};
pub use space::{Reservation, Space};

use std::path::{Path, PathBuf};

/// The journal directory of one export under the configured root: readable, and distinct
/// for every bucket and prefix (two exports never share one, whatever their names).
pub fn export_dir(root: &Path, bucket: &str, prefix: &str) -> PathBuf {
    let readable: String = format!("{bucket}-{prefix}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    // FNV-1a: stable across Rust versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bucket.bytes().chain([0]).chain(prefix.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    root.join(format!("{readable}.{h:016x}"))
}

#[cfg(test)]
mod tests;
