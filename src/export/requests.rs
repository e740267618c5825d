//! NBD request counters of one export, per command. They belong to the export (every version
//! of it a reload makes shares them), so whoever serves an export counts into it directly and
//! whoever reports reads them from the export: no table keyed by name, no process-wide state.
//! A connection takes its export's counters once and then pays a few relaxed atomic adds per
//! request, with no lock and no lookup.

use crate::histogram::{Histogram, Snapshot};
use crate::proto::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Every command, each with its own counters.
pub const COMMANDS: [Command; 8] = [
    Command::Read,
    Command::Write,
    Command::Flush,
    Command::Trim,
    Command::WriteZeroes,
    Command::Cache,
    Command::BlockStatus,
    Command::Disconnect,
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
    /// Whether a connection ever took these counters: exports nobody used have no request
    /// series, which keeps the scrape small on daemons with many idle exports.
    used: AtomicBool,
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
    /// The counters for a new connection to count into (once per connection, not per
    /// request); from now on the export counts as used.
    pub fn for_connection(self: &Arc<Self>) -> Arc<Self> {
        self.used.store(true, Relaxed);
        Arc::clone(self)
    }

    /// Whether a connection ever counted into these counters.
    pub fn used(&self) -> bool {
        self.used.load(Relaxed)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_bytes_errors_and_latency_per_command() {
        let counters = Arc::new(ExportRequests::default());
        assert!(!counters.used());
        let a = counters.for_connection();
        assert!(counters.used() && Arc::ptr_eq(&a, &counters));
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
    }

    #[test]
    fn every_command_has_its_own_slot() {
        let slots: std::collections::BTreeSet<usize> = COMMANDS.iter().map(|c| slot(*c)).collect();
        assert_eq!(slots.len(), COMMANDS.len());
        assert!(slots.iter().all(|&s| s < COMMANDS.len()));
    }
}
