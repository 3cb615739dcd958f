//! Links to the PostgreSQL server: TCP connect under a timeout, then, for a
//! TLS `sslmode`, the SSLRequest exchange and a rustls client handshake.
//!
//! The proxy is itself a client here and applies the same rule as libpq:
//! any byte after the server's `S` and before its TLS handshake aborts the
//! link ("received unencrypted data after SSL response").

pub mod auth_query;
pub mod cancel;
pub mod health;
pub mod login;
pub mod scram_login;
pub mod tls;

use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{self, SslMode};
use crate::error::{sqlstate, ClientError, UserFacing};
use crate::tls::pem::FileError;
use crate::wire::stream::{BackendStream, MaybeTls};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        address: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("server at {0} does not accept TLS (answered the SSLRequest with {1:?})")]
    TlsRefused(String, char),
    #[error("received unencrypted data after SSL response from {0}")]
    EarlyData(String),
    #[error("TLS handshake with {address} failed: {source}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("i/o error with {address}: {source}")]
    Io {
        address: String,
        source: std::io::Error,
    },
    #[error("server at {0} did not answer the startup message in time")]
    NoAnswer(String),
    #[error("server at {0} closed the connection during authentication")]
    Closed(String),
    /// The proxy's own shortage, not the backend's: never counted as a
    /// backend failure.
    #[error("no file descriptor left for a link to {0}")]
    OutOfDescriptors(String),
}

impl BackendError {
    /// Closed label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Resolve { .. } => "resolve",
            BackendError::Connect { .. } => "connect",
            BackendError::Timeout(_) => "timeout",
            BackendError::TlsRefused(..) => "tls_refused",
            BackendError::EarlyData(_) => "early_data",
            BackendError::Tls { .. } => "tls",
            BackendError::Io { .. } => "io",
            BackendError::NoAnswer(_) => "no_answer",
            BackendError::Closed(_) => "closed",
            BackendError::OutOfDescriptors(_) => "fd_exhausted",
        }
    }
}

impl UserFacing for BackendError {
    /// 08006 with a safe description of which step failed and why; the
    /// address and OS error text stay in the log.
    fn client_error(&self) -> ClientError {
        let what = match self {
            BackendError::OutOfDescriptors(_) => {
                return ClientError::fatal(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    "sorry, too many clients already",
                )
                .with_detail("pg-tls-proxy has no file descriptor left for another session.")
            }
            BackendError::Resolve { .. } => "its address does not resolve".to_string(),
            BackendError::Connect { source, .. } => match source.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                _ => "connection failed".to_string(),
            },
            BackendError::Timeout(_) => "connection timed out".to_string(),
            BackendError::TlsRefused(..) => {
                "the server does not accept TLS, which backend.sslmode requires".to_string()
            }
            BackendError::EarlyData(_) => {
                "the server sent unencrypted data after its SSL response".to_string()
            }
            BackendError::Tls { source, .. } => tls_reason(source),
            BackendError::Io { .. } => "the connection failed".to_string(),
            BackendError::NoAnswer(_) => "the PostgreSQL server did not answer".to_string(),
            BackendError::Closed(_) => "the server closed the connection unexpectedly".to_string(),
        };
        ClientError::fatal(
            sqlstate::CONNECTION_FAILURE,
            format!("pg-tls-proxy could not reach the PostgreSQL server: {what}"),
        )
    }
}

/// The rustls reason for a failed backend handshake, in words safe for a client.
fn tls_reason(err: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "TLS handshake failed".to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => {
            let why = match cert {
                C::UnknownIssuer => "it is not signed by a CA in backend.sslrootcert",
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "it does not match the backend server name"
                }
                C::Expired | C::ExpiredContext { .. } => "it has expired",
                C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet",
                C::Revoked => "it has been revoked",
                _ => "it is invalid",
            };
            format!("the server's certificate was rejected: {why}")
        }
        rustls::Error::AlertReceived(alert) => {
            format!("the server refused the TLS handshake (alert: {alert:?})")
        }
        _ => "TLS handshake failed".to_string(),
    }
}

/// Everything needed to open backend links; built once from `[backend]`.
pub struct Connector {
    address: String,
    sslmode: SslMode,
    tls: Option<(tls::ClientConfigs, ServerName<'static>)>,
    /// `backend.sslcert_scope = "all"`: the proxy's certificate on every link.
    cert_on_every_link: bool,
    connect_timeout: Duration,
}

/// What a backend link is for; decides whether the proxy presents its own
/// client certificate. A passthrough session's login must rest on the
/// client's own credentials, so by default it gets a link without the
/// proxy's certificate: otherwise a pg_hba `cert` line meant for proxy
/// logins would let any client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Passthrough,
    ProxyLogin,
    Cancel,
}

impl Connector {
    pub fn new(b: &config::Backend) -> Result<Connector, FileError> {
        let tls = match b.sslmode {
            SslMode::Disable => None,
            _ => {
                let name = tls::server_name(b).map_err(|reason| {
                    FileError::new("backend.server_name", std::path::Path::new("-"), reason)
                })?;
                Some((tls::client_configs(b)?, name))
            }
        };
        Ok(Connector {
            address: b.address.clone(),
            sslmode: b.sslmode,
            tls,
            cert_on_every_link: b.sslcert_scope == config::SslCertScope::All,
            connect_timeout: b.connect_timeout,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn sslmode(&self) -> SslMode {
        self.sslmode
    }

    /// `backend.connect_timeout`: also how long the server may take to
    /// answer the startup message.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Opens a link, TLS-wrapped per `sslmode`. Cancel-safe: dropping it
    /// drops the half-open socket.
    pub async fn connect(&self, purpose: Purpose) -> Result<BackendStream, BackendError> {
        let address = &self.address;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| BackendError::Timeout(address.clone()))?
            .map_err(|source| {
                if crate::sys::fdlimit::is_exhaustion(&source) {
                    BackendError::OutOfDescriptors(address.clone())
                } else if source.kind() == std::io::ErrorKind::InvalidInput {
                    BackendError::Resolve {
                        address: address.clone(),
                        source,
                    }
                } else {
                    BackendError::Connect {
                        address: address.clone(),
                        source,
                    }
                }
            })?;
        let _ = tcp.set_nodelay(true);
        let Some((configs, name)) = &self.tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let config = match (&configs.with_cert, purpose) {
            (Some(c), Purpose::ProxyLogin | Purpose::Cancel) => c,
            (Some(c), Purpose::Passthrough) if self.cert_on_every_link => c,
            _ => &configs.anonymous,
        };
        let tcp = self.negotiate_ssl(tcp).await?;
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let stream =
            tokio::time::timeout(self.connect_timeout, connector.connect(name.clone(), tcp))
                .await
                .map_err(|_| BackendError::Timeout(address.clone()))?
                .map_err(|source| BackendError::Tls {
                    address: address.clone(),
                    source,
                })?;
        Ok(MaybeTls::Tls(Box::new(stream)))
    }

    async fn negotiate_ssl(&self, mut tcp: TcpStream) -> Result<TcpStream, BackendError> {
        let address = &self.address;
        let io = |source| BackendError::Io {
            address: address.clone(),
            source,
        };
        tcp.write_all(&SSL_REQUEST).await.map_err(io)?;
        let answer = tokio::time::timeout(self.connect_timeout, tcp.read_u8())
            .await
            .map_err(|_| BackendError::Timeout(address.clone()))?
            .map_err(io)?;
        if answer != b'S' {
            return Err(BackendError::TlsRefused(address.clone(), answer as char));
        }
        let mut probe = [0u8; 1];
        match tcp.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(tcp),
            Ok(0) => Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Err(BackendError::EarlyData(address.clone())),
            Err(e) => Err(io(e)),
        }
    }

    /// Whether the server answers, for readiness probes: with TLS, a link
    /// (its handshake is an answer); without, an SSLRequest whose one-byte
    /// answer (`S` or `N`) must come within `connect_timeout`. PostgreSQL
    /// logs nothing for a connection that ends after that exchange.
    pub async fn probe(&self) -> Result<(), BackendError> {
        if self.tls.is_some() {
            return self.connect(Purpose::Passthrough).await.map(|_| ());
        }
        let address = &self.address;
        let mut tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| BackendError::Timeout(address.clone()))?
            .map_err(|source| BackendError::Connect {
                address: address.clone(),
                source,
            })?;
        let io = |source| BackendError::Io {
            address: address.clone(),
            source,
        };
        tcp.write_all(&SSL_REQUEST).await.map_err(io)?;
        match tokio::time::timeout(self.connect_timeout, tcp.read_u8()).await {
            Err(_) => Err(BackendError::NoAnswer(address.clone())),
            Ok(Err(e)) => Err(io(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Forwards a CancelRequest unchanged over a fresh link. PostgreSQL never
    /// answers one; the link is closed when the server closes it.
    pub async fn forward_cancel(&self, packet: &[u8]) -> Result<(), BackendError> {
        let mut link = self.connect(Purpose::Cancel).await?;
        let io = |source| BackendError::Io {
            address: self.address.clone(),
            source,
        };
        link.write_all(packet).await.map_err(io)?;
        link.flush().await.map_err(io)?;
        let mut sink = [0u8; 64];
        // Wait for the server to close, briefly, so the cancel is delivered
        // before our side goes away.
        let _ = tokio::time::timeout(self.connect_timeout, link.read(&mut sink)).await;
        Ok(())
    }
}
