//! TLS for NBD_OPT_STARTTLS: the rustls server configuration built from `[server.tls]`, and
//! the live acceptor connections take it from. Credentials are loaded at start and again on
//! every reload, so a renewed certificate is picked up without a restart; a reload whose files
//! do not load keeps the credentials already in service (clients keep working) and logs why.

use crate::config::{TlsConfig, TlsMode};
use crate::tls::{TlsError, TlsFiles};
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

/// The rustls configuration `[server.tls]` describes (see `crate::tls::server_config`).
fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    crate::tls::server_config(TlsFiles {
        cert: &cfg.cert,
        key: &cfg.key,
        client_ca: cfg.client_ca.as_deref(),
    })
}

/// What one connection sees of TLS: whether it is offered or required, and how to start it.
pub(crate) struct TlsPolicy {
    pub mode: TlsMode,
    /// `None` when the credentials never loaded: STARTTLS is refused and, in `Require` mode,
    /// so is everything else (failing closed rather than falling back to clear text).
    pub acceptor: Option<TlsAcceptor>,
}

/// The TLS credentials in service, swapped whole on reload; connections take a snapshot when
/// they start, so a reload never changes the rules under a handshake in progress.
#[derive(Default)]
pub struct TlsAcceptorSource {
    current: ArcSwapOption<TlsPolicy>,
}

impl TlsAcceptorSource {
    /// Applies `[server.tls]` (or its absence). Files that do not load leave the previous
    /// credentials in service under the new mode; the error is logged and returned.
    pub fn apply(&self, cfg: Option<&TlsConfig>) -> Result<(), TlsError> {
        let Some(cfg) = cfg else {
            if self.current.swap(None).is_some() {
                info!("TLS turned off: STARTTLS is refused from now on");
            }
            return Ok(());
        };
        let built = server_config(cfg);
        let previous = self.current.load_full();
        let acceptor = match &built {
            Ok(config) => {
                info!("TLS credentials loaded from {}", cfg.cert.display());
                Some(TlsAcceptor::from(Arc::clone(config)))
            }
            Err(e) => {
                error!("TLS credentials not loaded, keeping the previous ones: {e}");
                previous.as_ref().and_then(|p| p.acceptor.clone())
            }
        };
        self.current.store(Some(Arc::new(TlsPolicy {
            mode: cfg.mode,
            acceptor,
        })));
        built.map(|_| ())
    }

    /// The policy a new connection negotiates under; `None` when TLS is not configured.
    pub(crate) fn snapshot(&self) -> Option<Arc<TlsPolicy>> {
        self.current.load_full()
    }
}

impl std::fmt::Debug for TlsAcceptorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current.load();
        f.debug_struct("TlsAcceptorSource")
            .field("mode", &current.as_ref().map(|p| p.mode))
            .finish()
    }
}

#[cfg(test)]
mod tests;
