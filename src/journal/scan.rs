//! Reading what a previous process left: segment files in number order, records checked one
//! by one, stopping at the first torn or out-of-sequence record (nothing after it was ever
//! fsynced before it, so nothing after it may be applied).

use super::record::{self, Record, Stop};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

/// File name suffix of a segment; the stem is the first record's number in 16 hex digits.
pub(super) const SUFFIX: &str = ".nbj";

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scanned {
    /// Whole records in order.
    pub records: Vec<Record>,
    /// Segment files found (all of them, also those after a tear): deleted once the records
    /// are safe in S3.
    pub files: Vec<PathBuf>,
    /// Why the scan stopped early, if it did (logged; the rest is discarded).
    pub torn: Option<String>,
    /// The number the next record must get.
    pub next_number: u64,
    /// A first record number no existing segment file is named after (a new journal starts
    /// here, so it never collides with a file left after a tear).
    pub first_free: u64,
}

/// Segment files of `dir` by first record number, oldest first.
pub(super) fn segment_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(SUFFIX) else {
            continue;
        };
        if stem.len() != 16 {
            continue;
        }
        if let Ok(n) = u64::from_str_radix(stem, 16) {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every whole record of the journal in `dir` (an absent directory is an empty
/// journal). Records are held in memory: at most the journal size, bounded by config.
pub fn scan(dir: &Path) -> io::Result<Scanned> {
    let files = segment_files(dir)?;
    let mut out = Scanned {
        next_number: files.first().map_or(0, |(n, _)| *n),
        ..Scanned::default()
    };
    out.first_free = files.last().map_or(0, |(n, _)| n + 1);
    for (first, path) in &files {
        out.files.push(path.clone());
        if out.torn.is_some() {
            continue;
        }
        if *first != out.next_number {
            out.torn = Some(format!(
                "segment {} starts at record {first}, expected {}",
                path.display(),
                out.next_number
            ));
            continue;
        }
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            // Deleted since the listing (a writer freeing it): as if never listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut r = BufReader::with_capacity(1 << 20, file);
        loop {
            match record::read(&mut r)? {
                Ok(rec) if rec.number == out.next_number => {
                    out.next_number += 1;
                    out.records.push(rec);
                }
                Ok(rec) => {
                    out.torn = Some(format!(
                        "record {} in {} out of sequence (expected {})",
                        rec.number,
                        path.display(),
                        out.next_number
                    ));
                    break;
                }
                Err(Stop::End) => break,
                Err(Stop::Torn(why)) => {
                    out.torn = Some(format!("{}: {why}", path.display()));
                    break;
                }
            }
        }
    }
    out.first_free = out.first_free.max(out.next_number);
    Ok(out)
}

/// Whether `dir` holds any segment file (a journal left by a previous process).
pub fn has_segments(dir: &Path) -> bool {
    segment_files(dir).map(|f| !f.is_empty()).unwrap_or(true)
}

/// Moves every segment file of `dir` into a new subdirectory `stale-<unix seconds>` (kept for
/// an admin to inspect, never replayed) and returns it.
pub fn set_aside(dir: &Path) -> io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let aside = dir.join(format!("stale-{secs}"));
    std::fs::create_dir_all(&aside)?;
    for (_, path) in segment_files(dir)? {
        if let Some(name) = path.file_name() {
            std::fs::rename(&path, aside.join(name))?;
        }
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(aside)
}
