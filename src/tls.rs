//! Building a rustls server configuration from PEM files: a certificate chain, its private key
//! and optionally a CA whose client certificates are required. A leaf module: configuration
//! validation runs it so check-config and reloads reject files that would fail, and the server
//! runs it to serve them, without either depending on the other.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the files cannot be turned into a TLS configuration; each error names the file the
/// admin has to fix.
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

/// The PEM files a TLS server configuration is built from.
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    /// Certificate chain, leaf first.
    pub cert: &'a Path,
    /// The private key of the leaf certificate.
    pub key: &'a Path,
    /// When set, only clients with a certificate issued by this CA are admitted.
    pub client_ca: Option<&'a Path>,
}

/// Builds the rustls configuration `files` describe: the certificate chain and key, and with
/// `client_ca`, a verifier that admits only clients with a certificate from that CA.
pub fn server_config(files: TlsFiles<'_>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = certificates(files.cert)?;
    let key = private_key(files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| credentials_error(files, e))?;
    let builder = match files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: ca.to_owned(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: ca.to_owned(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch {
                cert: files.cert.to_owned(),
                key: files.key.to_owned(),
            }
        }
        other => credentials_error(files, other),
    })?;
    Ok(Arc::new(config))
}

fn credentials_error(files: TlsFiles<'_>, e: rustls::Error) -> TlsError {
    TlsError::Credentials {
        cert: files.cert.to_owned(),
        key: files.key.to_owned(),
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

/// Test certificates (shared with the integration tests).
#[cfg(test)]
#[path = "../tests/common/tls.rs"]
pub(crate) mod test_pki;

#[cfg(test)]
mod tests;
