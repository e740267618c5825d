//! Orderly stop: stop accepting, let in-flight requests finish, flush every export with
//! progress in the log and in systemd's status, and pick the exit code that tells the admin
//! whether every acknowledged write reached S3.

use super::fdstore::FdStore;
use super::notify::Notifier;
use super::signals::Signals;
use crate::daemon::{format_mib, Daemon, ShutdownReport};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info};

/// How long in-flight requests may run before they are answered with ESHUTDOWN.
pub const REQUEST_GRACE: Duration = Duration::from_secs(10);
/// How often flush progress is logged and the stop timeout extended.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Each sign of progress buys this much more time from systemd's TimeoutStopSec.
const EXTEND_BY: Duration = Duration::from_secs(60);

/// Exit code when a second signal aborted the flush.
pub const EXIT_ABORTED: u8 = 2;

/// Runs the shutdown; a second SIGTERM/SIGINT aborts it. Exit 0 = everything stored. With
/// a `store`, clients are parked instead of disconnected and their sockets left there.
pub async fn run(
    daemon: Arc<Daemon>,
    notifier: &Notifier,
    signals: &mut Signals,
    store: Option<&FdStore>,
) -> ExitCode {
    let dirty = daemon.dirty_bytes();
    let status = format!("stopping: flushing {} to S3", format_mib(dirty));
    info!("{status}");
    notifier.stopping(&status);
    let d = Arc::clone(&daemon);
    let keep = store.is_some();
    let mut work = tokio::spawn(async move {
        if keep {
            d.stop_keeping(REQUEST_GRACE).await
        } else {
            d.shutdown(REQUEST_GRACE).await
        }
    });
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    let mut last = dirty;
    loop {
        tokio::select! {
            done = &mut work => {
                return match done {
                    Ok(report) => finish(report, notifier, store),
                    Err(e) => {
                        error!("shutdown task failed: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            name = signals.next_stop() => {
                work.abort();
                return abort(&daemon, name);
            }
            _ = tick.tick() => {
                let now = daemon.dirty_bytes();
                let status = format!("stopping: {} left to flush", format_mib(now));
                if now < last {
                    notifier.extend_timeout(EXTEND_BY, &status);
                } else {
                    notifier.status(&status);
                }
                if now > 0 {
                    info!("{status}");
                }
                last = now;
            }
        }
    }
}

fn finish(mut report: ShutdownReport, notifier: &Notifier, store: Option<&FdStore>) -> ExitCode {
    let kept = std::mem::take(&mut report.kept);
    let kept = match store {
        Some(store) => match store.keep(kept) {
            Ok(k) => {
                info!(
                    "kept {} listener(s) and {} client connection(s) in the service manager's \
                     fd store for the next process",
                    k.listeners, k.connections
                );
                format!("; {} client(s) kept for the next process", k.connections)
            }
            Err(e) => {
                error!("cannot keep the sockets in the fd store ({e}): clients are disconnected");
                String::new()
            }
        },
        None => String::new(),
    };
    if report.failed.is_empty() {
        info!("all exports flushed; exiting");
        notifier.status(&format!("stopped: all exports flushed{kept}"));
        return ExitCode::SUCCESS;
    }
    for f in &report.failed {
        error!(
            export = %f.export,
            "NOT flushed: {} of dirty data is not in S3: {}",
            format_mib(f.dirty_bytes),
            f.error
        );
    }
    let names: Vec<&str> = report.failed.iter().map(|f| f.export.as_str()).collect();
    let status = format!("stopped with unflushed data in: {}", names.join(", "));
    error!("{status}");
    notifier.status(&status);
    ExitCode::FAILURE
}

/// Second signal: the admin chose to lose what is still dirty. Say exactly what that is.
fn abort(daemon: &Daemon, signal: &str) -> ExitCode {
    let dirty = daemon.dirty_exports();
    if dirty.is_empty() {
        error!("second {signal}: aborting shutdown; no dirty data was left");
    } else {
        let list: Vec<String> = dirty
            .iter()
            .map(|(name, bytes)| format!("{name} ({})", format_mib(*bytes)))
            .collect();
        error!(
            "second {signal}: aborting shutdown; NOT flushed to S3, writes since the last \
             FLUSH are lost: {}",
            list.join(", ")
        );
    }
    ExitCode::from(EXIT_ABORTED)
}
