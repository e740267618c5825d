//! The process around the daemon: logging, signals, sd-notify and orderly shutdown. Block data
//! never passes through here; this module decides *when* the daemon starts, reloads and stops,
//! and tells systemd and the admin about it.

pub mod logging;
pub mod notify;
pub mod shutdown;
pub mod signals;
pub mod watchdog;

use crate::config::Config;
use crate::daemon::Daemon;
use notify::Notifier;
use signals::{Request, Signals};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// How often `STATUS=` is refreshed for `systemctl status`.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Runs `nbd-s3 serve` to completion. Exit codes: 0 = stopped with everything flushed,
/// 1 = could not start, or data could not be flushed, 2 = a second signal aborted the flush.
pub fn run(config: Config, config_path: Option<PathBuf>) -> ExitCode {
    let output = logging::init();
    tracing::debug!("log output: {output:?}");
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
    let code = runtime.block_on(serve(config, config_path));
    // Tasks still running (an aborted flush, stuck connections) must not delay exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn serve(config: Config, config_path: Option<PathBuf>) -> ExitCode {
    let notifier = Notifier::from_env();
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = match Daemon::start(config, config_path.clone()).await {
        Ok(d) => d,
        Err(e) => {
            error!("startup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    let mut watcher = config_path.as_deref().and_then(start_watcher);
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let stop = loop {
        tokio::select! {
            request = signals.next() => match request {
                Request::Reload => {
                    info!("SIGHUP: reloading the configuration");
                    reload(&daemon, &notifier).await;
                }
                Request::Stop(name) => break name,
            },
            Some(()) = next_change(&mut watcher) => {
                info!("configuration file changed: reloading");
                reload(&daemon, &notifier).await;
            }
            _ = status_tick.tick() => notifier.status(&daemon.status()),
        }
    };
    info!("{stop}: shutting down");
    drop(watcher);
    let code = shutdown::run(Arc::clone(&daemon), &notifier, &mut signals).await;
    background.abort_all();
    code
}

/// One reload, framed by RELOADING=1 … READY=1 (READY even when the file was refused: the
/// daemon keeps serving the previous configuration).
async fn reload(daemon: &Daemon, notifier: &Notifier) {
    notifier.reloading();
    let status = match daemon.reload().await {
        Ok(()) => daemon.status(),
        Err(e) => {
            let first = e.to_string().lines().next().unwrap_or_default().to_owned();
            format!("{}; last reload failed: {first}", daemon.status())
        }
    };
    notifier.ready(&status);
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
