//! Client-side TLS for the runner and the CLI: which CA to trust and which certificate
//! (if any) to present, loaded from PEM files and applied to a tonic [`Endpoint`].
//!
//! TLS is used for `https://` manager URLs. Without a CA the system roots (and the
//! bundled webpki roots) are trusted; with one, only that CA. TLS settings given for a
//! plaintext `http://` URL are refused rather than silently ignored.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// What went wrong preparing a TLS connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {setting} {path:?}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("invalid TLS configuration for {url}: {source}")]
    Transport {
        url: String,
        source: tonic::transport::Error,
    },
}

/// The TLS settings of a client: a CA to trust and an optional client identity.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificate(s) to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (chain), presented to managers that verify clients.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// Whether any TLS setting is given.
    pub fn is_configured(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The rustls client configuration: trust `ca` (or the system and webpki roots), and
    /// present `cert`/`key` when both are given.
    pub fn config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read("TLS CA", ca)?)),
            None => config.with_enabled_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("TLS certificate", cert)?,
                    read("TLS key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::Invalid(
                    "a TLS client certificate needs both --tls-cert and --tls-key".into(),
                ));
            }
        }
        Ok(config)
    }

    /// An endpoint for `url`, with TLS when it is `https://`. TLS settings with an
    /// `http://` URL are an error: the caller asked for TLS and would not get it.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let endpoint =
            Endpoint::from_shared(url.to_owned()).map_err(|source| TlsError::Transport {
                url: url.to_owned(),
                source,
            })?;
        let https = url
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"));
        if !https {
            if self.is_configured() {
                return Err(TlsError::Invalid(format!(
                    "TLS settings (--tls-ca, --tls-cert, --tls-key) are given but the manager \
                     URL {url} is not https://"
                )));
            }
            return Ok(endpoint);
        }
        endpoint
            .tls_config(self.config()?)
            .map_err(|source| TlsError::Transport {
                url: url.to_owned(),
                source,
            })
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}
