//! TLS for NBD_OPT_STARTTLS: the rustls server configuration built from `[server.tls]`, and
//! the live acceptor connections take it from. Credentials are loaded at start and again on
//! every reload, so a renewed certificate is picked up without a restart; a reload whose files
//! do not load keeps the credentials already in service (clients keep working) and logs why.

use crate::config::{TlsConfig, TlsMode};
use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info};

/// Why `[server.tls]` files cannot be turned into a TLS configuration; the admin fixes the
/// named file (check-config and startup fail, a reload keeps the old credentials).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it")]
    NoKey { path: PathBuf },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cert {cert} with key {key}: {reason}")]
    Credentials {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("client_ca {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

/// Builds the rustls configuration `[server.tls]` describes: its certificate chain and key,
/// and with `client_ca`, a verifier that admits only clients with a certificate from that CA.
/// Also run by config validation, so check-config and reloads catch unusable files.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certificates(&cfg.cert)?;
    let key = private_key(&cfg.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| credentials_error(cfg, e))?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: cfg.cert.clone(),
                key: cfg.key.clone(),
            }
        }
        other => credentials_error(cfg, other),
    })?;
    Ok(Arc::new(config))
}

fn credentials_error(cfg: &TlsConfig, e: rustls::Error) -> TlsError {
    TlsError::Credentials {
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
        reason: e.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order (server chains start with the leaf).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        other => TlsError::Pem {
            path: path.to_owned(),
            reason: other.to_string(),
        },
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

/// Test certificates (shared with the integration tests).
#[cfg(test)]
#[path = "../../tests/common/tls.rs"]
pub(crate) mod test_pki;

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
