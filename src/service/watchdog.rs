//! systemd's watchdog: `WATCHDOG=1` only when a round trip through the runtime shows the
//! daemon can still do work. A timer alone would keep a wedged daemon alive forever.

use super::notify::Notifier;
use crate::daemon::Daemon;
use std::sync::Arc;
use std::time::Duration;

/// How long one liveness probe may take before the ping is skipped (systemd then restarts us
/// once `WatchdogSec` passes without one).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pings every `interval` (half of `WatchdogSec`) while the probe succeeds. Runs until aborted.
pub async fn run(daemon: Arc<Daemon>, notifier: Notifier, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(PROBE_TIMEOUT, probe(&daemon)).await {
            Ok(Ok(())) => notifier.watchdog(),
            Ok(Err(why)) => tracing::warn!("watchdog probe failed: {why}; not pinging systemd"),
            Err(_) => tracing::warn!(
                "watchdog probe took longer than {PROBE_TIMEOUT:?}; not pinging systemd"
            ),
        }
    }
}

/// A worker task and a blocking-pool thread both answer, and the registry can be read: the
/// scheduler, the blocking pool (file I/O, DNS) and export lookup all work.
async fn probe(daemon: &Arc<Daemon>) -> Result<(), String> {
    let d = Arc::clone(daemon);
    let exports = tokio::spawn(async move { d.registry().list().len() })
        .await
        .map_err(|e| format!("worker task: {e}"))?;
    tokio::task::spawn_blocking(move || exports)
        .await
        .map_err(|e| format!("blocking pool: {e}"))?;
    Ok(())
}
