//! Passing the daemon's sockets on to the next process. Two routes share the parking: a
//! takeover over the control socket (`Daemon::hand_over`, refused and undone when a flush
//! fails) and a stop that leaves the sockets with the service manager (`stop_keeping`,
//! which cannot be undone: the manager stops us either way). The receiving process counts
//! what it received (`Handovers`).

use super::{show_addr, Daemon, Handover, ShutdownReport};
use crate::config::ListenAddr;
use crate::server::handover::ParkedConnection;
use crate::server::{Listener, ListenerHandle};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tracing::{error, warn};

/// Handovers this process received: how many happened since the chain of processes began
/// (carried over from the sender), and how long clients waited in the latest one.
#[derive(Debug, Default)]
pub struct Handovers {
    total: AtomicU64,
    last_pause_us: AtomicU64,
    last_connections: AtomicU64,
}

/// `Handovers` as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverSnapshot {
    /// Handovers so far, this process's own included.
    pub total: u64,
    /// From the sender's stopping to read until this process served again; `None` before
    /// any handover.
    pub last_pause: Option<Duration>,
    /// Client connections taken over in the latest handover.
    pub last_connections: u64,
}

impl Handovers {
    /// Counts a received handover: `before` earlier ones, the sender parked at `parked_at_ns`
    /// (`monotonic_ns`), `connections` taken over.
    pub fn received(&self, before: u64, parked_at_ns: u64, connections: usize) {
        let pause_us = monotonic_ns().saturating_sub(parked_at_ns) / 1000;
        self.last_pause_us.store(pause_us, Relaxed);
        self.last_connections
            .store(u64::try_from(connections).unwrap_or(u64::MAX), Relaxed);
        self.total.store(before.saturating_add(1), Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> HandoverSnapshot {
        let total = self.total.load(Relaxed);
        HandoverSnapshot {
            total,
            last_pause: (total > 0)
                .then(|| Duration::from_micros(self.last_pause_us.load(Relaxed))),
            last_connections: self.last_connections.load(Relaxed),
        }
    }
}

/// Nanoseconds of `CLOCK_MONOTONIC`: unlike `Instant`, comparable between two processes on
/// the same host, and unaffected by wall-clock steps.
pub fn monotonic_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(t) => u64::try_from(t.tv_sec())
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0)),
        // Cannot fail on Linux; a zero only makes the measured pause look long.
        Err(_) => 0,
    }
}

impl Daemon {
    /// Stops the background tasks that would open exports or write manifests (they would
    /// take leases or write after the final flush).
    pub(super) fn stop_background(&self) {
        if let Some(reopener) = self.reopener.lock().take() {
            reopener.abort();
        }
        if let Some(auto) = self.auto_snapshots.lock().take() {
            auto.abort();
        }
    }

    /// Stops accepting and reading: every accept loop hands its listener back and every
    /// connection parks once its in-flight requests are answered (within `grace`).
    pub(super) async fn park(
        &self,
        handles: &mut HashMap<ListenAddr, ListenerHandle>,
        grace: Duration,
    ) -> (Vec<(ListenAddr, Listener)>, Vec<ParkedConnection>) {
        let connections = self.server.hand_over(grace).await;
        let mut listeners = Vec::new();
        for (addr, handle) in handles.drain() {
            if let Some(l) = handle.into_listener().await {
                listeners.push((addr, l));
            }
        }
        (listeners, connections)
    }

    /// A stop (SIGTERM) whose sockets outlive the process, kept by the service manager for
    /// the process it starts next: like `shutdown`, except that connections are parked
    /// instead of closed and the listeners are kept. Flushed exports release their leases so
    /// the next process can open them at once. A connection to an export that could not be
    /// flushed is closed, not kept: its client was told its writes were taken, they are
    /// lost with this process, and carrying on over the same connection would hide that.
    pub async fn stop_keeping(&self, grace: Duration) -> ShutdownReport {
        self.stop_background();
        let parked_at_ns = monotonic_ns();
        let mut handles = self.listeners.lock().await;
        let (listeners, connections) = self.park(&mut handles, grace).await;
        drop(handles);
        let failed = self.flush_all(true).await;
        let (kept, lost): (Vec<_>, Vec<_>) = connections
            .into_iter()
            .partition(|c| !failed.iter().any(|f| f.export == c.state.export));
        if !lost.is_empty() {
            let mut names: Vec<&str> = lost.iter().map(|c| c.state.export.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            error!(
                "closing {} connection(s) to exports not flushed ({}) instead of keeping \
                 them: their clients must see that writes were lost",
                lost.len(),
                names.join(", ")
            );
        }
        ShutdownReport {
            failed,
            kept: Handover {
                listeners: listener_fds(listeners),
                connections: kept,
                parked_at_ns: Some(parked_at_ns),
                handovers: self.handovers.snapshot().total,
            },
        }
    }

    /// Handovers this process received.
    pub fn handovers(&self) -> HandoverSnapshot {
        self.handovers.snapshot()
    }
}

/// The listening sockets as descriptors, by address as configured.
pub(super) fn listener_fds(listeners: Vec<(ListenAddr, Listener)>) -> Vec<(String, OwnedFd)> {
    let mut out = Vec::with_capacity(listeners.len());
    for (addr, l) in listeners {
        match l.into_fd() {
            Ok(fd) => out.push((show_addr(&addr), fd)),
            Err(e) => warn!("listener {} not handed over: {e}", show_addr(&addr)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_received_handover_counts_on_from_the_sender_and_measures_the_pause() {
        let h = Handovers::default();
        assert_eq!(h.snapshot().total, 0);
        assert_eq!(h.snapshot().last_pause, None);
        let parked = monotonic_ns().saturating_sub(250_000_000);
        h.received(2, parked, 3);
        let s = h.snapshot();
        assert_eq!(s.total, 3);
        assert_eq!(s.last_connections, 3);
        let pause = s.last_pause.expect("a pause after a handover");
        assert!(pause >= Duration::from_millis(250), "{pause:?}");
        assert!(pause < Duration::from_secs(60), "{pause:?}");
    }

    #[test]
    fn the_monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
