//! Prometheus metrics on `[server] metrics` (`GET /metrics`, text format 0.0.4).
//!
//! Nothing is counted here: every number lives where the work happens — `BackendStats` per
//! bucket, `StoreStats` and request counters per export, reload outcomes in the daemon, the
//! server's connection count, the cache budget — and is read at scrape time (`collector`).
//! Nothing but the process entry point depends on this module; it depends on what it observes.
//!
//! Metrics are an observer: the endpoint failing to bind is logged and the daemon serves on.

mod collector;
mod exports;
pub mod http;

#[cfg(test)]
mod tests;

use crate::daemon::Observed;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{error, info};

/// Starts the endpoint on `addr` (`[server] metrics`) if set; logs `metrics on <addr>` (with
/// the real port, so `127.0.0.1:0` works for tests). Returns the bound address. A failure to
/// bind is logged, not returned: an observer must not keep block devices from being served.
pub async fn spawn(addr: Option<SocketAddr>, observed: Observed) -> Option<SocketAddr> {
    let addr = addr?;
    match serve(addr, observed).await {
        Ok(bound) => Some(bound),
        Err(e) => {
            error!("cannot serve metrics on {addr}: {e}; continuing without metrics");
            None
        }
    }
}

/// `spawn` for a process that took over from a daemon still holding the port until it
/// exits: binding is retried in the background (`Policy::PORT_TAKEOVER`).
pub fn spawn_after_takeover(addr: Option<SocketAddr>, observed: Observed) {
    let Some(addr) = addr else { return };
    tokio::spawn(async move {
        let mut backoff = crate::retry::Policy::PORT_TAKEOVER.backoff();
        loop {
            let e = match serve(addr, observed.clone()).await {
                Ok(_) => return,
                Err(e) => e,
            };
            match backoff.next_delay() {
                Some(d) if e.kind() == std::io::ErrorKind::AddrInUse => tokio::time::sleep(d).await,
                _ => {
                    return error!(
                        "cannot serve metrics on {addr}: {e}; continuing without metrics"
                    )
                }
            }
        }
    });
}

/// Binds `addr` and serves the metrics of `observed` there until the runtime stops.
pub async fn serve(addr: SocketAddr, observed: Observed) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!("metrics on {bound}");
    tokio::spawn(http::serve(listener, renderer(observed)));
    Ok(bound)
}

/// The text of one scrape of `registry`.
pub fn render(registry: &prometheus_client::registry::Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

/// A prometheus-client registry around the daemon collector, as the HTTP responder's renderer.
pub fn renderer(observed: Observed) -> http::Render {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector::DaemonCollector(observed)));
    Arc::new(move || render(&registry))
}
