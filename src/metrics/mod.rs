//! Prometheus metrics on `[server] metrics` (`GET /metrics`, text format 0.0.4).
//!
//! Most numbers already exist where the work happens — `BackendStats` per bucket, `StoreStats`
//! per export, the server's connection count, the cache budget — and are read at scrape time
//! (`collector`). Only what nobody else counts lives here: NBD requests per export and command
//! (`requests`, fed by one call in `server::command::execute`), reload outcomes (`reloads`)
//! and the lock-free `histogram` the store uses for flush durations.
//!
//! Metrics are an observer: the endpoint failing to bind is logged and the daemon serves on.

mod collector;
mod exports;
pub mod histogram;
pub mod http;
pub mod reloads;
pub mod requests;

#[cfg(test)]
mod tests;

pub use collector::Sources;
pub use requests::{for_export, ExportRequests};

use crate::backend::StoreFactory;
use crate::config::Config;
use crate::export::Registry;
use crate::server::Server;
use crate::store::CacheBudget;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::{error, info};

/// Starts the endpoint if `[server] metrics` is set; logs `metrics on <addr>` (with the real
/// port, so `127.0.0.1:0` works for tests). Returns the bound address. A failure to bind is
/// logged, not returned: an observer must not keep block devices from being served.
pub async fn spawn(
    config: &Config,
    registry: &Arc<Registry>,
    server: &Server,
    factory: &StoreFactory,
    budget: &Arc<CacheBudget>,
) -> Option<SocketAddr> {
    let addr = config.server.metrics?;
    let sources = Sources {
        registry: Arc::clone(registry),
        server: server.clone(),
        factory: factory.clone(),
        budget: Arc::clone(budget),
    };
    match serve(addr, sources).await {
        Ok(bound) => Some(bound),
        Err(e) => {
            error!("cannot serve metrics on {addr}: {e}; continuing without metrics");
            None
        }
    }
}

/// Binds `addr` and serves the metrics of `sources` there until the runtime stops.
pub async fn serve(addr: SocketAddr, sources: Sources) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!("metrics on {bound}");
    tokio::spawn(http::serve(listener, renderer(sources)));
    Ok(bound)
}

/// The text of one scrape of `sources`.
pub fn render(registry: &prometheus_client::registry::Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(16 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

/// A prometheus-client registry around the daemon collector, as the HTTP responder's renderer.
pub fn renderer(sources: Sources) -> http::Render {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector::DaemonCollector(sources)));
    Arc::new(move || render(&registry))
}
