//! TLS to PostgreSQL, as libpq does it: `sslmode` (disable, prefer, require, verify-ca,
//! verify-full) and a root certificate (`sslrootcert` in the URL, or
//! `--database-ca-file`), over rustls with the ring provider.
//!
//! tokio-postgres knows neither `sslrootcert` nor the `verify-*` modes and refuses
//! unknown URL parameters, so [`configure`] takes them off the URL first, then decides
//! once how server certificates are checked; every connection uses the resulting
//! [`MakeRustlsConnect`].
//!
//! | sslmode       | encrypted             | server certificate checked                   |
//! |---------------|-----------------------|----------------------------------------------|
//! | `disable`     | never                 | —                                            |
//! | `prefer`      | if the server can     | only if a root certificate is given (chain)  |
//! | `require`     | always                | only if a root certificate is given (chain)  |
//! | `verify-ca`   | always                | chain, not the host name                     |
//! | `verify-full` | always                | chain and host name                          |
//!
//! Without a root certificate setting, `verify-*` trust the system roots and the bundled
//! webpki roots. `sslrootcert=system` means exactly those and, as in libpq, needs
//! `verify-full` (the default with it).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use percent_encoding::percent_decode_str;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// The settings' names, for error messages.
const URL_ROOT_CERT: &str = "sslrootcert in DATABASE_URL";
const CA_FILE: &str = "--database-ca-file (AGENTRUN_DATABASE_CA_FILE)";

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, SettingError> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return Err(SettingError::UnknownSslMode(value.to_owned())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A database connection setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingError {
    #[error(
        "unknown sslmode {0:?} in DATABASE_URL: use disable, prefer, require, verify-ca or \
         verify-full"
    )]
    UnknownSslMode(String),
    #[error("{0} in DATABASE_URL is not valid UTF-8 once percent-decoded")]
    NotUtf8(&'static str),
    #[error("invalid DATABASE_URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("sslrootcert in DATABASE_URL and {CA_FILE} are both set: set only one")]
    TwoRootCerts,
    #[error(
        "sslmode={0} may not be used with sslrootcert=system: use verify-full (as libpq \
         requires)"
    )]
    WeakModeWithSystemRoots(SslMode),
    #[error("cannot read {setting} {path:?}: {source}")]
    ReadRootCert {
        setting: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{setting} {path:?} holds no PEM certificate")]
    NoCertificate {
        setting: &'static str,
        path: PathBuf,
    },
    #[error("{setting} {path:?} holds an invalid certificate: {reason}")]
    BadCertificate {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Where trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    /// The system's roots and the bundled webpki roots.
    System,
    /// A PEM file, named by `setting`.
    File {
        setting: &'static str,
        path: PathBuf,
    },
}

/// The connection settings in `url` (a `postgres://` URL or libpq key/value string) with
/// libpq's TLS parameters applied, and the connector every connection must use.
/// `ca_file` is `--database-ca-file`, an alternative to `sslrootcert`.
pub fn configure(
    url: &str,
    ca_file: Option<&Path>,
) -> Result<(tokio_postgres::Config, SslMode, MakeRustlsConnect), SettingError> {
    let params = TlsParams::split_off(url)?;
    let mut config: tokio_postgres::Config = params.rest.parse().map_err(SettingError::Url)?;
    let roots = match (params.root_cert, ca_file) {
        (Some(_), Some(_)) => return Err(SettingError::TwoRootCerts),
        (Some(cert), None) if cert == "system" => Some(Roots::System),
        (Some(cert), None) => Some(Roots::File {
            setting: URL_ROOT_CERT,
            path: cert.into(),
        }),
        (None, Some(path)) => Some(Roots::File {
            setting: CA_FILE,
            path: path.to_owned(),
        }),
        (None, None) => None,
    };
    let mode = match (params.mode, &roots) {
        (Some(mode), _) => SslMode::parse(&mode)?,
        (None, Some(Roots::System)) => SslMode::VerifyFull,
        // A key/value string's sslmode was parsed by tokio-postgres.
        (None, _) => match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        },
    };
    if roots == Some(Roots::System) && mode != SslMode::VerifyFull {
        return Err(SettingError::WeakModeWithSystemRoots(mode));
    }
    config.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let check = match (mode, roots) {
        (SslMode::Disable, _) => Check::Nothing,
        // As libpq: with a root certificate, prefer and require verify the chain too.
        (SslMode::Prefer | SslMode::Require, None) => Check::Nothing,
        (SslMode::Prefer | SslMode::Require | SslMode::VerifyCa, roots) => {
            Check::Chain(roots.unwrap_or(Roots::System))
        }
        (SslMode::VerifyFull, roots) => Check::ChainAndName(roots.unwrap_or(Roots::System)),
    };
    Ok((config, mode, MakeRustlsConnect::new(check)?))
}

/// libpq's TLS parameters taken off a URL, and the URL without them.
#[derive(Debug, PartialEq, Eq)]
struct TlsParams {
    rest: String,
    mode: Option<String>,
    root_cert: Option<String>,
}

impl TlsParams {
    /// Takes `sslmode` and `sslrootcert` (percent-decoded; the last one wins, as in
    /// tokio-postgres) off a `postgres://` or `postgresql://` URL. A key/value string is
    /// left alone: tokio-postgres parses its sslmode (disable, prefer, require).
    fn split_off(url: &str) -> Result<Self, SettingError> {
        let mut params = Self {
            rest: url.to_owned(),
            mode: None,
            root_cert: None,
        };
        let is_url = ["postgres://", "postgresql://"]
            .iter()
            .any(|scheme| url.starts_with(scheme));
        let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
            return Ok(params);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (name, slot) = match key {
                "sslmode" => ("sslmode", &mut params.mode),
                "sslrootcert" => ("sslrootcert", &mut params.root_cert),
                _ => {
                    kept.push(pair);
                    continue;
                }
            };
            let decoded = percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| SettingError::NotUtf8(name))?;
            *slot = Some(decoded.into_owned());
        }
        params.rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(params)
    }
}

/// How much of the server's certificate is checked.
enum Check {
    /// Nothing (encryption only): `require` and `prefer` without a root certificate.
    Nothing,
    /// Signed by a trusted root, whatever host it names: `verify-ca`.
    Chain(Roots),
    /// Signed by a trusted root and naming the host connected to: `verify-full`.
    ChainAndName(Roots),
}

/// Makes rustls connectors for tokio-postgres; cheap to clone (one shared config).
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
}

impl MakeRustlsConnect {
    fn new(check: Check) -> Result<Self, SettingError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            Check::Nothing => Arc::new(AnyCertificate(provider.signature_verification_algorithms)),
            Check::Chain(roots) => Arc::new(AnyHostName(webpki_verifier(&roots, &provider)?)),
            Check::ChainAndName(roots) => webpki_verifier(&roots, &provider)?,
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // What libpq sends; PostgreSQL 17 requires it for direct TLS (sslnegotiation=direct).
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

fn webpki_verifier(
    roots: &Roots,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, SettingError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            // Unreadable system stores are no error: the webpki roots are always there.
            let native = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(native.certs);
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        Roots::File { setting, path } => {
            let (setting, path) = (*setting, path.clone());
            let pem = std::fs::read(&path).map_err(|source| SettingError::ReadRootCert {
                setting,
                path: path.clone(),
                source,
            })?;
            let bad = |reason: String| SettingError::BadCertificate {
                setting,
                path: path.clone(),
                reason,
            };
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|err| bad(err.to_string()))?;
                store.add(cert).map_err(|err| bad(err.to_string()))?;
            }
            if store.is_empty() {
                return Err(SettingError::NoCertificate { setting, path });
            }
        }
    }
    // Building fails only on an empty store (ruled out above: the webpki roots are never
    // empty) or on revocation lists, which are not used.
    Ok(
        WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
            .build()
            .expect("a non-empty root store without CRLs builds a verifier"),
    )
}

/// `require`/`prefer` without a root certificate: any certificate, but the handshake's
/// signatures are still checked against it.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the full webpki check, except that a certificate for another host name
/// passes. webpki checks the chain (signature, validity, usage) before the name, so a
/// name error means the chain was good.
#[derive(Debug)]
struct AnyHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::convert::Infallible;

    /// `domain` is empty for Unix sockets, where tokio-postgres never uses TLS: a name
    /// that cannot be one is only an error if a handshake is attempted.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            server_name: ServerName::try_from(domain.to_owned()).ok(),
        })
    }
}

/// One TLS handshake with the server named `server_name`.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.server_name.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the database host is not a valid TLS server name",
                )
            })?;
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// No `tls-server-end-point` binding: SCRAM then authenticates without channel
    /// binding (tokio-postgres's default `channel_binding=prefer` allows that).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> TlsParams {
        TlsParams::split_off(url).unwrap()
    }

    #[test]
    fn tls_parameters_are_taken_off_the_url_and_the_rest_kept() {
        let params = split(
            "postgres://u:p@db.example.com:5432/app?application_name=m&sslmode=verify-full\
             &connect_timeout=5&sslrootcert=%2Fetc%2Fssl%2Frds%20ca.pem",
        );
        assert_eq!(
            params,
            TlsParams {
                rest: "postgres://u:p@db.example.com:5432/app?application_name=m&connect_timeout=5"
                    .into(),
                mode: Some("verify-full".into()),
                root_cert: Some("/etc/ssl/rds ca.pem".into()),
            }
        );
        let only = split("postgresql://h/db?sslmode=require");
        assert_eq!(only.rest, "postgresql://h/db");
        assert_eq!(only.mode.as_deref(), Some("require"));
        assert_eq!(split("postgres://h/db").rest, "postgres://h/db");
        // The last one wins, as tokio-postgres does for its own parameters.
        assert_eq!(
            split("postgres://h/db?sslmode=disable&sslmode=verify-ca")
                .mode
                .as_deref(),
            Some("verify-ca")
        );
    }

    #[test]
    fn a_key_value_string_is_left_to_tokio_postgres() {
        let params = split("host=db sslmode=require dbname=app");
        assert_eq!(params.rest, "host=db sslmode=require dbname=app");
        assert_eq!(params.mode, None);
        let (config, mode, _) = configure("host=db sslmode=require dbname=app", None).unwrap();
        assert_eq!(mode, SslMode::Require);
        assert_eq!(
            config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn every_libpq_sslmode_is_accepted_and_prefer_is_the_default() {
        use tokio_postgres::config::SslMode as Wire;
        for (value, mode, wire) in [
            ("disable", SslMode::Disable, Wire::Disable),
            ("prefer", SslMode::Prefer, Wire::Prefer),
            ("require", SslMode::Require, Wire::Require),
            ("verify-ca", SslMode::VerifyCa, Wire::Require),
            ("verify-full", SslMode::VerifyFull, Wire::Require),
        ] {
            let (config, got, _) =
                configure(&format!("postgres://h/db?sslmode={value}"), None).unwrap();
            assert_eq!((got, config.get_ssl_mode()), (mode, wire), "{value}");
            assert_eq!(got.as_str(), value);
        }
        let (config, mode, _) = configure("postgres://u@h:6543/db", None).unwrap();
        assert_eq!(mode, SslMode::Prefer);
        assert_eq!(config.get_ports(), &[6543]);
    }

    #[test]
    fn bad_settings_say_which_setting_and_what_is_wrong() {
        let err = |url: &str, ca: Option<&Path>| configure(url, ca).err().unwrap().to_string();
        assert_eq!(
            err("postgres://h/db?sslmode=verify_full", None),
            "unknown sslmode \"verify_full\" in DATABASE_URL: use disable, prefer, require, \
             verify-ca or verify-full"
        );
        let missing = err(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            None,
        );
        assert!(
            missing
                .starts_with("cannot read sslrootcert in DATABASE_URL \"/nonexistent/ca.pem\": "),
            "{missing}"
        );
        let missing = err("postgres://h/db", Some(Path::new("/nonexistent/ca.pem")));
        assert!(
            missing.starts_with(
                "cannot read --database-ca-file (AGENTRUN_DATABASE_CA_FILE) \"/nonexistent/ca.pem\""
            ),
            "{missing}"
        );
        let not_pem = std::env::temp_dir().join(format!("agentrun-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let empty = err("postgres://h/db", Some(&not_pem));
        std::fs::remove_file(&not_pem).unwrap();
        assert!(empty.ends_with("holds no PEM certificate"), "{empty}");
        assert!(
            err(
                "postgres://h/db?sslrootcert=/a.pem",
                Some(Path::new("/b.pem"))
            )
            .contains("both set")
        );
        assert!(
            err("postgres://h/db?sslmode=require&sslrootcert=system", None).contains("verify-full")
        );
        assert!(err("postgres://h/db?bogus=1", None).starts_with("invalid DATABASE_URL: "));
    }

    #[test]
    fn sslrootcert_system_defaults_to_verify_full() {
        let (_, mode, _) = configure("postgres://h/db?sslrootcert=system", None).unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
    }
}
