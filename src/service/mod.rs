//! The process around the daemon: logging, signals, sd-notify and orderly shutdown. Block data
//! never passes through here; this module decides *when* the daemon starts, reloads and stops,
//! and tells systemd and the admin about it.

pub mod allocator;
pub mod fdstore;
pub mod logging;
pub mod notify;
pub mod shutdown;
pub mod signals;
pub mod watchdog;

use crate::config::Config;
use crate::daemon::{Daemon, Handover};
use fdstore::FdStore;
use notify::Notifier;
use signals::{Request, Signals};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// How often `STATUS=` is refreshed for `systemctl status`.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Runs `nbd-s3 serve` to completion. Exit codes: 0 = stopped with everything flushed (or
/// handed over to a process that took over), 1 = could not start, or data could not be
/// flushed, 2 = a second signal aborted the flush. `takeover`: take listeners and clients
/// over from a daemon answering on the control socket, if one does. What the service
/// manager's fd store passed to this process (a restart under systemd) is taken over first.
pub fn run(config: Config, config_path: Option<PathBuf>, takeover: bool) -> ExitCode {
    let output = logging::init();
    allocator::tune();
    tracing::debug!("log output: {output:?}");
    // Before any thread exists: nothing may read these sockets before they leave the store.
    let stored = fdstore::inherit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nbd-s3-worker")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(serve(config, config_path, takeover, stored));
    // Tasks still running (an aborted flush, stuck connections) must not delay exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn serve(
    config: Config,
    config_path: Option<PathBuf>,
    takeover: bool,
    stored: Option<Handover>,
) -> ExitCode {
    let notifier = Notifier::from_env();
    let store = FdStore::from_env();
    if let Some(store) = &store {
        info!("{store}: a stop keeps clients connected for the next process");
    }
    let inherited = match stored {
        Some(h) => Some(h),
        None if takeover => match take_over(&config).await {
            Ok(h) => h,
            Err(e) => {
                error!("takeover failed: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // Only a takeover has an old process still holding the control socket and metrics port.
    let took_over = takeover && inherited.is_some();
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Watch before starting, so an edit made while exports open (or right after READY=1) is
    // not missed.
    let mut watcher = config_path.as_deref().and_then(start_watcher);
    // A SIGTERM while exports are still opening ends the process at once: no client has
    // written anything yet, so there is nothing to flush.
    let daemon = tokio::select! {
        started = Daemon::start_inheriting(config, config_path.clone(), |config, observed| {
            let addr = config.server.metrics;
            async move {
                if took_over {
                    crate::metrics::spawn_after_takeover(addr, observed);
                } else {
                    crate::metrics::spawn(addr, observed).await;
                }
            }
        }, inherited.unwrap_or_default()) => match started {
            Ok(d) => d,
            Err(e) => {
                error!("startup failed: {e}");
                return ExitCode::FAILURE;
            }
        },
        name = signals.next_stop() => {
            info!("{name} during startup: exiting");
            return ExitCode::SUCCESS;
        }
    };
    // Bound once the exports are open, so a command never sees a half-started daemon; kept
    // (and its socket file) until the process ends.
    let _control = daemon
        .config()
        .server
        .control
        .as_deref()
        .and_then(|path| crate::control::server::spawn(path, Arc::clone(&daemon), took_over));
    let status = daemon.status();
    info!("ready: {status}");
    notifier.ready(&status);

    let mut background = tokio::task::JoinSet::new();
    if let Some(interval) = notifier.watchdog_interval() {
        background.spawn(watchdog::run(
            Arc::clone(&daemon),
            notifier.clone(),
            interval,
        ));
    }
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    // The last reload's failure stays in the status line until a reload succeeds.
    let mut reload_error: Option<String> = None;
    let stop = loop {
        tokio::select! {
            request = signals.next() => match request {
                Request::Reload => {
                    info!("SIGHUP: reloading the configuration");
                    match reload_unless_stopped(&daemon, &notifier, &mut signals).await {
                        Ok(outcome) => reload_error = outcome,
                        Err(name) => break name,
                    }
                }
                Request::Stop(name) => break name,
            },
            Some(()) = next_change(&mut watcher) => {
                info!("configuration file changed: reloading");
                match reload_unless_stopped(&daemon, &notifier, &mut signals).await {
                    Ok(outcome) => reload_error = outcome,
                    Err(name) => break name,
                }
            }
            _ = status_tick.tick() => {
                notifier.status(&status_line(&daemon, reload_error.as_deref()));
            }
            delivered = daemon.wait_handed_over() => {
                background.abort_all();
                // Exports were flushed and leases released before anything was passed on.
                return if delivered {
                    notifier.status("handed over to a new process");
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                };
            }
        }
    };
    info!("{stop}: shutting down");
    drop(watcher);
    let code = shutdown::run(Arc::clone(&daemon), &notifier, &mut signals, store.as_ref()).await;
    background.abort_all();
    code
}

/// Asks the daemon on the control socket to hand over; `None` when none answers there.
async fn take_over(config: &Config) -> Result<Option<crate::daemon::Handover>, String> {
    let Some(path) = config.server.control.clone() else {
        return Err("--takeover needs [server] control (the socket it asks on)".to_owned());
    };
    let received =
        tokio::task::spawn_blocking(move || crate::control::handover::receive(&path)).await;
    match received {
        Ok(Ok(None)) => {
            info!("takeover: no daemon answers on the control socket; starting afresh");
            Ok(None)
        }
        Ok(Ok(Some((handover, waited)))) => {
            info!(
                "takeover: received {} listener(s) and {} connection(s) after {} ms",
                handover.listeners.len(),
                handover.connections.len(),
                waited.as_millis()
            );
            Ok(Some(handover))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// A reload that a SIGTERM/SIGINT cancels: opening exports may wait on a slow S3, and the
/// flush must not wait for it (systemd would SIGKILL us at TimeoutStopSec). Cancelling is safe:
/// the registry swap is one synchronous step, so it either happened or did not.
async fn reload_unless_stopped(
    daemon: &Daemon,
    notifier: &Notifier,
    signals: &mut Signals,
) -> Result<Option<String>, &'static str> {
    tokio::select! {
        outcome = reload(daemon, notifier) => Ok(outcome),
        name = signals.next_stop() => {
            warn!("{name} during a reload: reload abandoned");
            Err(name)
        }
    }
}

/// One reload, framed by RELOADING=1 … READY=1 (READY even when the file was refused: the
/// daemon keeps serving the previous configuration). Returns the failure, if any.
async fn reload(daemon: &Daemon, notifier: &Notifier) -> Option<String> {
    notifier.reloading();
    let failure = match daemon.reload().await {
        Ok(()) => None,
        Err(e) => Some(e.to_string().lines().next().unwrap_or_default().to_owned()),
    };
    notifier.ready(&status_line(daemon, failure.as_deref()));
    failure
}

fn status_line(daemon: &Daemon, reload_error: Option<&str>) -> String {
    match reload_error {
        Some(e) => format!("{}; last reload failed: {e}", daemon.status()),
        None => daemon.status(),
    }
}

fn start_watcher(path: &std::path::Path) -> Option<crate::reload::ConfigWatcher> {
    match crate::reload::ConfigWatcher::new(path) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(
                "not watching {} for changes ({e}); SIGHUP still reloads",
                path.display()
            );
            None
        }
    }
}

/// The watcher's next debounced "reload now"; pending forever without a watcher.
async fn next_change(watcher: &mut Option<crate::reload::ConfigWatcher>) -> Option<()> {
    match watcher {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}
