//! Per-export series: what clients asked for (the export's request counters) and what its
//! block store did about it (`StoreStats`, flush durations). Every series carries an `export`
//! label.

use super::collector::{counters, gauges, histograms, label, Labels};
use crate::export::requests::{CommandSnapshot, COMMANDS};
use crate::export::Export;
use crate::histogram::Snapshot;
use crate::proto::Command;
use crate::store::{SnapshotStats, StoreStats};
use prometheus_client::encoding::DescriptorEncoder;
use std::fmt;
use std::sync::Arc;

/// The `command` label value of each command.
fn command_label(command: Command) -> &'static str {
    match command {
        Command::Read => "read",
        Command::Write => "write",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::WriteZeroes => "write_zeroes",
        Command::Cache => "cache",
        Command::BlockStatus => "block_status",
        Command::Disconnect => "disc",
    }
}

/// Writes every per-export family for `exports` (served and draining).
pub(crate) fn encode(enc: &mut DescriptorEncoder, exports: &[Arc<Export>]) -> fmt::Result {
    state(enc, exports)?;
    store(enc, exports)?;
    let mut rows = Vec::new();
    // Request series only for exports a client has used, in name order.
    for export in exports.iter().filter(|e| e.requests().used()) {
        let stats = export.requests();
        // DISC is never executed as a request: no series for it.
        for command in COMMANDS.into_iter().filter(|c| *c != Command::Disconnect) {
            rows.push((
                export.name(),
                command_label(command),
                stats.snapshot(command),
            ));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(b.0));
    commands(enc, &rows)
}

/// Whether each export is served, how big it is and who uses it.
fn state(enc: &mut DescriptorEncoder, exports: &[Arc<Export>]) -> fmt::Result {
    let each = |f: &dyn Fn(&Export) -> u64| {
        exports
            .iter()
            .map(|e| (label("export", e.name()), f(e)))
            .collect::<Vec<_>>()
    };
    gauges(
        enc,
        "nbd_s3_export_up",
        "1 when the export is served, 0 when it is refused (see the log for why)",
        each(&|e| u64::from(e.is_serving())),
    )?;
    gauges(
        enc,
        "nbd_s3_export_removed",
        "1 for an export a reload removed that still drains (clients attached or data to flush)",
        each(&|e| u64::from(e.is_removed())),
    )?;
    gauges(
        enc,
        "nbd_s3_export_size_bytes",
        "Size advertised to new connections",
        each(&|e| e.size()),
    )?;
    gauges(
        enc,
        "nbd_s3_export_clients",
        "Clients attached to the export",
        each(&|e| e.attached() as u64),
    )?;
    gauges(
        enc,
        "nbd_s3_export_lease",
        "Export lease: 1 held and writable, 0 fenced (renewals failing) or lost to another daemon; absent for exports without a lease",
        exports
            .iter()
            .filter_map(|e| {
                let lease = e.lease()?;
                let held = u64::from(lease.writable().is_ok());
                Some((label("export", e.name()), held))
            })
            .collect::<Vec<_>>(),
    )
}

/// One `StoreStats` field as a metric: name, help text, value.
type StoreField = (&'static str, &'static str, fn(&StoreStats) -> u64);

const STORE_GAUGES: [StoreField; 5] = [
    (
        "nbd_s3_export_dirty_bytes",
        "Data acknowledged to clients but not yet in the object store",
        |s| s.dirty_bytes,
    ),
    (
        "nbd_s3_export_cached_blocks",
        "Blocks in memory (clean, dirty or loading)",
        |s| s.cached_blocks,
    ),
    (
        "nbd_s3_export_present_blocks",
        "Blocks that hold data (the rest read as zeros)",
        |s| s.present_blocks,
    ),
    (
        "nbd_s3_export_journal_bytes",
        "durability = local: bytes held in the local journal, not yet known to be in the object store",
        |s| s.journal_bytes,
    ),
    (
        "nbd_s3_export_journal_oldest_seconds",
        "durability = local: age of the oldest journal record not yet known to be in the object store (0: none)",
        |s| s.journal_oldest_secs,
    ),
];

const STORE_COUNTERS: [StoreField; 12] = [
    (
        "nbd_s3_export_cache_hits",
        "Block reads served from memory or known holes",
        |s| s.cache_hits,
    ),
    (
        "nbd_s3_export_cache_misses",
        "Block reads that needed a GET",
        |s| s.cache_misses,
    ),
    (
        "nbd_s3_export_readahead_blocks",
        "Blocks fetched ahead of sequential readers",
        |s| s.readahead_blocks,
    ),
    (
        "nbd_s3_export_block_gets",
        "Block GETs sent, retries included",
        |s| s.gets,
    ),
    (
        "nbd_s3_export_block_puts",
        "Blocks written back (successful PUTs)",
        |s| s.puts,
    ),
    (
        "nbd_s3_export_block_deletes",
        "Blocks deleted (successful DELETEs of zeroed or trimmed blocks)",
        |s| s.deletes,
    ),
    (
        "nbd_s3_export_write_back_failures",
        "Failed write-back attempts (the data stays dirty and is retried)",
        |s| s.write_back_failures,
    ),
    (
        "nbd_s3_export_put_logical_bytes",
        "Block bytes written back (block size per PUT); divide by put_stored_bytes for the compression ratio",
        |s| s.put_logical_bytes,
    ),
    (
        "nbd_s3_export_put_stored_bytes",
        "Object bytes stored by those PUTs (after compression and encryption)",
        |s| s.put_stored_bytes,
    ),
    (
        "nbd_s3_export_compressed_blocks",
        "Blocks written back compressed (the others did not shrink or were not tried)",
        |s| s.compressed_blocks,
    ),
    (
        "nbd_s3_export_decrypt_errors",
        "Block objects that did not decrypt with the export's key (the read got EIO)",
        |s| s.decrypt_errors,
    ),
    (
        "nbd_s3_export_decode_errors",
        "Block objects that were not valid encoded blocks of the export (the read got EIO)",
        |s| s.decode_errors,
    ),
];

/// The block store of each served export: cache, dirty data, object traffic, flushes.
fn store(enc: &mut DescriptorEncoder, exports: &[Arc<Export>]) -> fmt::Result {
    let stores: Vec<(&str, StoreStats, Snapshot)> = exports
        .iter()
        .filter_map(|e| {
            let s = e.store()?;
            Some((e.name(), s.stats(), s.flush_durations()))
        })
        .collect();
    let each = |f: fn(&StoreStats) -> u64| {
        stores
            .iter()
            .map(|(name, s, _)| (label("export", name), f(s)))
            .collect::<Vec<_>>()
    };
    for (name, help, field) in STORE_GAUGES {
        gauges(enc, name, help, each(field))?;
    }
    for (name, help, field) in STORE_COUNTERS {
        counters(enc, name, help, each(field))?;
    }
    snapshots(enc, exports)?;
    let flushes = stores
        .iter()
        .map(|(name, _, h)| (label("export", name), h.clone()));
    histograms(
        enc,
        "nbd_s3_export_flush_duration_seconds",
        "Time for a flush to bring everything written before it into the object store",
        flushes,
    )
}

/// Snapshots of each served export and the bytes only they hold.
fn snapshots(enc: &mut DescriptorEncoder, exports: &[Arc<Export>]) -> fmt::Result {
    let stats: Vec<(&str, SnapshotStats)> = exports
        .iter()
        .filter_map(|e| Some((e.name(), e.store()?.snapshot_stats())))
        .collect();
    let each = |f: fn(&SnapshotStats) -> u64| {
        stats
            .iter()
            .map(|(name, s)| (label("export", name), f(s)))
            .collect::<Vec<_>>()
    };
    gauges(
        enc,
        "nbd_s3_snapshots",
        "Snapshots of the export",
        each(|s| s.snapshots),
    )?;
    gauges(
        enc,
        "nbd_s3_snapshot_bytes_held",
        "Block objects stored only because snapshots read them, in block-size bytes (before compression): what deleting every snapshot would free",
        each(|s| s.bytes_held),
    )
}

/// Requests by export and command.
fn commands(enc: &mut DescriptorEncoder, rows: &[(&str, &str, CommandSnapshot)]) -> fmt::Result {
    let labels = |export: &str, command: &str| -> Labels {
        vec![
            ("export", export.to_owned()),
            ("command", command.to_owned()),
        ]
    };
    let each = |f: fn(&CommandSnapshot) -> u64| {
        rows.iter()
            .map(|(e, c, s)| (labels(e, c), f(s)))
            .collect::<Vec<_>>()
    };
    counters(
        enc,
        "nbd_s3_requests",
        "NBD requests answered, by command",
        each(|s| s.requests),
    )?;
    counters(
        enc,
        "nbd_s3_request_errors",
        "NBD requests answered with an error",
        each(|s| s.errors),
    )?;
    counters(
        enc,
        "nbd_s3_request_bytes",
        "Bytes the requests covered (data moved for read and write)",
        each(|s| s.bytes),
    )?;
    // Latency only for commands in use: 20 lines per series, and most clients never send
    // CACHE or TRIM.
    let latency = rows
        .iter()
        .filter(|(_, _, s)| s.requests > 0)
        .map(|(e, c, s)| (labels(e, c), s.latency.clone()));
    histograms(
        enc,
        "nbd_s3_request_duration_seconds",
        "Time from reading a request to its reply being ready",
        latency,
    )
}
