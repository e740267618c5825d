//! NBD request counters per export and command. Nothing else in the daemon counts requests, so
//! these are the only counters kept here rather than read from elsewhere at scrape time.
//! A connection looks its export's counters up once (`for_export`) and then pays a few
//! relaxed atomic adds per request, with no lock and no name lookup.

use super::histogram::{Histogram, Snapshot};
use crate::proto::Command;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

/// Every command with its label value, in the order they are rendered.
pub const COMMANDS: [(Command, &str); 8] = [
    (Command::Read, "read"),
    (Command::Write, "write"),
    (Command::Flush, "flush"),
    (Command::Trim, "trim"),
    (Command::WriteZeroes, "write_zeroes"),
    (Command::Cache, "cache"),
    (Command::BlockStatus, "block_status"),
    (Command::Disconnect, "disc"),
];

fn slot(command: Command) -> usize {
    match command {
        Command::Read => 0,
        Command::Write => 1,
        Command::Flush => 2,
        Command::Trim => 3,
        Command::WriteZeroes => 4,
        Command::Cache => 5,
        Command::BlockStatus => 6,
        Command::Disconnect => 7,
    }
}

#[derive(Debug, Default)]
struct PerCommand {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

/// Request counters of one export (shared by all its connections).
#[derive(Debug, Default)]
pub struct ExportRequests {
    commands: [PerCommand; COMMANDS.len()],
}

/// One command's counters as read at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandSnapshot {
    /// Requests finished (answered, successfully or not).
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes the requests covered (`length`): data moved for READ and WRITE.
    pub bytes: u64,
    /// Time from the request being read to its reply being ready.
    pub latency: Snapshot,
}

impl ExportRequests {
    /// Starts one request; it is counted, with its length and latency, when the guard drops,
    /// so every exit path of the command (early return, error, cancellation) is covered.
    pub fn start(&self, command: Command, length: u32) -> RequestTimer<'_> {
        RequestTimer {
            stats: &self.commands[slot(command)],
            length,
            started: Instant::now(),
        }
    }

    /// Counts a request answered with an error.
    pub fn failed(&self, command: Command) {
        self.commands[slot(command)].errors.fetch_add(1, Relaxed);
    }

    /// Counters of `command`.
    pub fn snapshot(&self, command: Command) -> CommandSnapshot {
        let c = &self.commands[slot(command)];
        CommandSnapshot {
            requests: c.requests.load(Relaxed),
            errors: c.errors.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            latency: c.latency.snapshot(),
        }
    }
}

/// Counts one request when dropped.
#[derive(Debug)]
pub struct RequestTimer<'a> {
    stats: &'a PerCommand,
    length: u32,
    started: Instant,
}

impl Drop for RequestTimer<'_> {
    fn drop(&mut self) {
        self.stats.latency.observe(self.started.elapsed());
        self.stats.requests.fetch_add(1, Relaxed);
        self.stats.bytes.fetch_add(u64::from(self.length), Relaxed);
    }
}

/// Counters of every export that had connections, by export name.
#[derive(Debug, Default)]
pub struct RequestTable {
    exports: Mutex<BTreeMap<String, Arc<ExportRequests>>>,
}

impl RequestTable {
    /// The counters of `export`, created on first use.
    pub fn for_export(&self, export: &str) -> Arc<ExportRequests> {
        let mut exports = self.exports.lock();
        if let Some(found) = exports.get(export) {
            return Arc::clone(found);
        }
        let made = Arc::new(ExportRequests::default());
        exports.insert(export.to_owned(), Arc::clone(&made));
        made
    }

    /// Counters of the exports in `live`, plus exports still used by a connection. Counters
    /// of an export that was removed and has no connection left are dropped here, so hot
    /// reloads that come and go do not grow the table (or the scrape) forever.
    pub fn collect(&self, live: &BTreeSet<&str>) -> Vec<(String, Arc<ExportRequests>)> {
        let mut exports = self.exports.lock();
        exports.retain(|name, stats| live.contains(name.as_str()) || Arc::strong_count(stats) > 1);
        exports
            .iter()
            .map(|(name, stats)| (name.clone(), Arc::clone(stats)))
            .collect()
    }
}

/// The process's table: connections and the scrape find it without plumbing through every
/// layer, like a Prometheus client library's default registry.
static TABLE: LazyLock<RequestTable> = LazyLock::new(RequestTable::default);

/// The request counters of `export` in the process table (one lookup per connection).
pub fn for_export(export: &str) -> Arc<ExportRequests> {
    TABLE.for_export(export)
}

/// The process table.
pub fn table() -> &'static RequestTable {
    &TABLE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_bytes_errors_and_latency_per_command() {
        let table = RequestTable::default();
        let a = table.for_export("a");
        drop(a.start(Command::Write, 4096));
        drop(a.start(Command::Write, 512));
        {
            let _t = a.start(Command::Read, 65536);
            a.failed(Command::Read);
        }
        let w = a.snapshot(Command::Write);
        assert_eq!((w.requests, w.errors, w.bytes), (2, 0, 4608));
        assert_eq!(w.latency.count, 2);
        let r = a.snapshot(Command::Read);
        assert_eq!((r.requests, r.errors, r.bytes), (1, 1, 65536));
        assert_eq!(
            a.snapshot(Command::Flush),
            CommandSnapshot {
                latency: Histogram::default().snapshot(),
                ..CommandSnapshot::default()
            }
        );
        assert!(
            Arc::ptr_eq(&a, &table.for_export("a")),
            "one table entry per export"
        );
    }

    #[test]
    fn removed_exports_leave_once_unused() {
        let table = RequestTable::default();
        let held = table.for_export("gone-but-attached");
        drop(table.for_export("gone"));
        drop(table.for_export("kept"));
        let live = BTreeSet::from(["kept"]);
        let names: Vec<String> = table.collect(&live).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["gone-but-attached", "kept"]);
        drop(held);
        let names: Vec<String> = table.collect(&live).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["kept"]);
    }

    #[test]
    fn every_command_has_its_own_slot() {
        let slots: BTreeSet<usize> = COMMANDS.iter().map(|(c, _)| slot(*c)).collect();
        assert_eq!(slots.len(), COMMANDS.len());
        assert!(slots.iter().all(|&s| s < COMMANDS.len()));
    }
}
