//! Counters of one export's store, for metrics and the status line.

use super::Inner;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Monotonic event counters, bumped on the hot paths (relaxed atomics, no locks).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub gets: AtomicU64,
    pub get_retries: AtomicU64,
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    pub write_back_failures: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub readahead: AtomicU64,
    /// Durations of `BlockStore::flush` (metrics).
    pub flushes: crate::histogram::Histogram,
}

impl Counters {
    /// Adds one to `c`.
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

/// A snapshot of one export's store activity (Prometheus counters and gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Dirty bytes of this export not yet in the object store.
    pub dirty_bytes: u64,
    /// Blocks currently cached (clean, dirty or loading).
    pub cached_blocks: u64,
    /// Blocks that hold data (objects, or dirty data not yet written).
    pub present_blocks: u64,
    /// GET requests sent (retries included).
    pub gets: u64,
    /// GETs that failed and were retried.
    pub get_retries: u64,
    /// PUT requests that succeeded.
    pub puts: u64,
    /// DELETE requests that succeeded.
    pub deletes: u64,
    /// Failed write-back attempts (each is retried).
    pub write_back_failures: u64,
    /// Block reads served from memory or the presence map.
    pub cache_hits: u64,
    /// Block reads that needed a GET.
    pub cache_misses: u64,
    /// Blocks fetched ahead of sequential readers.
    pub readahead_blocks: u64,
    /// Block bytes written back (block_size per PUT): what the client's data costs before
    /// compression and encryption.
    pub put_logical_bytes: u64,
    /// Object bytes those PUTs stored (after compression, with header and tag).
    pub put_stored_bytes: u64,
    /// PUTs stored compressed.
    pub compressed_blocks: u64,
    /// Block objects that did not decrypt with the export's key (each read got EIO).
    pub decrypt_errors: u64,
    /// Block objects that were not valid block objects of the export (each read got EIO).
    pub decode_errors: u64,
    /// `durability = "local"`: bytes held in journal segments (not yet known to be in S3).
    pub journal_bytes: u64,
    /// Age in seconds of the oldest journal record not yet known to be in S3 (0: none).
    pub journal_oldest_secs: u64,
}

impl Inner {
    /// Current counters and gauges.
    pub(crate) fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let o = self.objects.counters();
        let journal = self.journal.as_ref().map(|j| j.stats()).unwrap_or_default();
        StoreStats {
            dirty_bytes: self.wb.dirty.load(Relaxed),
            journal_bytes: journal.bytes,
            journal_oldest_secs: journal.oldest.map_or(0, |d| d.as_secs()),
            cached_blocks: self
                .cache
                .shards()
                .map(|s| s.lock().slots.len() as u64)
                .sum(),
            present_blocks: self.presence.count(),
            gets: c.gets.load(Relaxed),
            get_retries: c.get_retries.load(Relaxed),
            puts: c.puts.load(Relaxed),
            deletes: c.deletes.load(Relaxed),
            write_back_failures: c.write_back_failures.load(Relaxed),
            cache_hits: c.hits.load(Relaxed),
            cache_misses: c.misses.load(Relaxed),
            readahead_blocks: c.readahead.load(Relaxed),
            put_logical_bytes: o.logical_bytes.load(Relaxed),
            put_stored_bytes: o.stored_bytes.load(Relaxed),
            compressed_blocks: o.compressed_blocks.load(Relaxed),
            decrypt_errors: o.decrypt_errors.load(Relaxed),
            decode_errors: o.decode_errors.load(Relaxed),
        }
    }
}
