//! Why one connection failed: [`SessionError`] gathers the errors of each
//! phase with a closed [`SessionError::kind`] for logs and metrics, and
//! [`SessionError::client_error`] is the one place that decides what a
//! client sees (through the allow-list types in [`crate::error`]).

use crate::backend::BackendError;
use crate::error::{ClientError, UserFacing};
use crate::wire::{ProtocolError, ReadError};

/// The phase a deadline expired in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Negotiation,
    TlsHandshake,
    Startup,
    BackendConnect,
    Authentication,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Negotiation => "negotiation",
            Phase::TlsHandshake => "tls_handshake",
            Phase::Startup => "startup",
            Phase::BackendConnect => "backend_connect",
            Phase::Authentication => "authentication",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client closed the connection during {0}")]
    ClientEof(&'static str),
    #[error("client i/o error: {0}")]
    ClientIo(std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("bytes arrived after the SSLRequest before the server's answer")]
    EarlyData,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    DirectTlsWithoutAlpn,
    #[error("no route for the server name, and no default route")]
    UnknownServerName,
    /// Routing after the startup: what is wrong, for the client.
    #[error("{0}")]
    Route(RouteError),
    #[error("plaintext startup refused (tls.allow_plaintext = false)")]
    PlaintextRefused,
    #[error("no user name in the startup packet")]
    NoUser,
    #[error("invalid value for startup parameter replication: {0:?}")]
    InvalidReplication(String),
    #[error("deadline expired during {}", .0.as_str())]
    Timeout(Phase),
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error(
        "client asked for SCRAM channel binding, which cannot pass through a TLS backend link"
    )]
    ChannelBindingThroughTls,
    #[error("too many connections")]
    TooManyConnections,
    #[error("no client certificate, and client_auth.mode is required")]
    ClientCertRequired,
    #[error("unreadable client certificate: {0}")]
    BadClientCertificate(String),
    #[error("certificate {identity:?} denied for role {user:?}, database {database:?}: {}", reason.as_str())]
    RoleDenied {
        identity: String,
        user: String,
        database: String,
        reason: crate::policy::rolemap::DenyReason,
    },
    #[error("terminated by the proxy's shutdown")]
    AdminShutdown,
    #[error("idle session timeout")]
    IdleTimeout,
    #[error("password authentication failed for user {0:?}")]
    PasswordFailed(String),
    #[error("SCRAM: {0}")]
    Scram(crate::policy::scram::ScramError),
    #[error("the verifier lookup (scram.auth_query) failed")]
    VerifierLookup,
    #[error("proxy login as {user:?} failed: {source}")]
    ProxyLogin {
        user: String,
        source: crate::backend::login::LoginError,
    },
}

impl From<crate::wire::NamesError> for SessionError {
    fn from(e: crate::wire::NamesError) -> Self {
        match e {
            crate::wire::NamesError::NoUser => SessionError::NoUser,
            crate::wire::NamesError::InvalidReplication(v) => SessionError::InvalidReplication(v),
        }
    }
}

impl From<ReadError> for SessionError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Eof => SessionError::ClientEof("negotiation"),
            ReadError::Io(e) => SessionError::ClientIo(e),
            ReadError::Protocol(p) => SessionError::Protocol(p),
        }
    }
}

impl SessionError {
    /// A closed label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::ClientEof(_) => "client_eof",
            SessionError::ClientIo(_) => "client_io",
            SessionError::Protocol(_) => "protocol_violation",
            SessionError::EarlyData => "early_data",
            SessionError::Tls(_) => "tls_handshake",
            SessionError::DirectTlsWithoutAlpn => "alpn_mismatch",
            SessionError::UnknownServerName => "unrecognized_name",
            SessionError::Route(_) => "no_route",
            SessionError::PlaintextRefused => "plaintext_rejected",
            SessionError::NoUser => "protocol_violation",
            SessionError::InvalidReplication(_) => "protocol_violation",
            SessionError::Timeout(_) => "timeout",
            SessionError::Backend(_) => "backend",
            SessionError::ChannelBindingThroughTls => "channel_binding",
            SessionError::TooManyConnections => "limit",
            SessionError::ClientCertRequired => "no_client_cert",
            SessionError::BadClientCertificate(_) => "bad_certificate",
            SessionError::RoleDenied { .. } => "role_denied",
            SessionError::ProxyLogin { .. } => "proxy_login",
            SessionError::PasswordFailed(_) => "password",
            SessionError::Scram(_) => "scram",
            SessionError::VerifierLookup => "auth_query",
            SessionError::AdminShutdown => "shutdown",
            SessionError::IdleTimeout => "idle_timeout",
        }
    }

    /// The ErrorResponse to send, if the client can still receive one.
    pub fn client_error(&self) -> Option<ClientError> {
        use crate::error::sqlstate::*;
        Some(match self {
            SessionError::ClientEof(_)
            | SessionError::ClientIo(_)
            | SessionError::Tls(_)
            | SessionError::DirectTlsWithoutAlpn
            | SessionError::UnknownServerName => return None,
            SessionError::Route(r) => {
                let e = ClientError::fatal(SERVER_REJECTED_CONNECTION, r.to_string());
                match r {
                    RouteError::NoRoute => e.with_hint("Connect with the server name of a route (a host name, not an address), or name one with options='-c pgtls.route=NAME'."),
                    _ => e,
                }
            }
            SessionError::Protocol(p) => p.client_error(),
            SessionError::EarlyData => ClientError::fatal(
                PROTOCOL_VIOLATION,
                "received unencrypted data after SSL request",
            )
            .with_detail("This could be either a client-software bug or evidence of an attempted man-in-the-middle attack."),
            SessionError::PlaintextRefused => ClientError::fatal(
                INVALID_AUTHORIZATION,
                "pg-tls-proxy accepts only TLS connections",
            )
            .with_hint("Connect with sslmode=require or stronger (sslmode=verify-full is recommended)."),
            SessionError::NoUser => ClientError::fatal(
                INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in startup packet",
            ),
            // PostgreSQL's words and SQLSTATE (backend_startup.c).
            SessionError::InvalidReplication(value) => ClientError::fatal(
                INVALID_PARAMETER_VALUE,
                format!("invalid value for parameter \"replication\": \"{value}\""),
            )
            .with_hint("Valid values are: \"false\", 0, \"true\", 1, \"database\"."),
            SessionError::Timeout(Phase::BackendConnect) => ClientError::fatal(
                CONNECTION_FAILURE,
                "timed out connecting to the PostgreSQL server behind pg-tls-proxy",
            ),
            SessionError::Timeout(Phase::Authentication) => ClientError::fatal(
                QUERY_CANCELED,
                "canceling authentication due to timeout",
            ),
            SessionError::Timeout(phase) => ClientError::fatal(
                PROTOCOL_VIOLATION,
                format!("connection setup took too long ({})", phase.as_str()),
            ),
            SessionError::Backend(b) => b.client_error(),
            SessionError::ChannelBindingThroughTls => ClientError::fatal(
                INVALID_AUTHORIZATION,
                "SCRAM channel binding cannot pass through pg-tls-proxy to a TLS backend",
            )
            .with_detail("The client bound its SCRAM exchange to the proxy's certificate; the PostgreSQL server would check it against its own certificate and refuse it.")
            .with_hint("Connect with channel_binding=disable (the client link is still TLS), or use a plaintext backend link on a trusted network."),
            SessionError::TooManyConnections => ClientError::fatal(
                TOO_MANY_CONNECTIONS,
                "sorry, too many clients already",
            ),
            SessionError::AdminShutdown => ClientError::fatal(
                ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            )
            .with_detail("pg-tls-proxy is shutting down."),
            SessionError::IdleTimeout => ClientError::fatal(
                IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle-session timeout",
            ),
            SessionError::ClientCertRequired => ClientError::fatal(
                INVALID_AUTHORIZATION,
                "connection requires a valid client certificate",
            ),
            SessionError::BadClientCertificate(_) => ClientError::fatal(
                INVALID_AUTHORIZATION,
                "the client certificate cannot be read",
            ),
            SessionError::RoleDenied {
                identity,
                user,
                database,
                reason,
            } => match reason {
                crate::policy::rolemap::DenyReason::ReplicationNotAllowed => ClientError::fatal(
                    INVALID_AUTHORIZATION,
                    format!("certificate \"{identity}\" is not allowed to start a replication connection as role \"{user}\""),
                ),
                crate::policy::rolemap::DenyReason::DatabaseNotAllowed => ClientError::fatal(
                    INVALID_AUTHORIZATION,
                    format!("certificate \"{identity}\" is not allowed to connect to database \"{database}\" as role \"{user}\""),
                ),
                _ => ClientError::fatal(
                    INVALID_AUTHORIZATION,
                    format!("certificate \"{identity}\" is not allowed to connect as role \"{user}\""),
                ),
            },
            SessionError::PasswordFailed(user) => ClientError::fatal(
                INVALID_PASSWORD,
                format!("password authentication failed for user \"{user}\""),
            ),
            SessionError::Scram(e) => e.client_error(),
            SessionError::VerifierLookup => ClientError::fatal(
                CONNECTION_FAILURE,
                "pg-tls-proxy could not look up the role's password verifier",
            )
            .with_hint("The proxy's operator can see why in its log."),
            SessionError::ProxyLogin { user, source } => {
                use crate::backend::login::LoginError as L;
                match source {
                    L::Closed | L::Io(_) => ClientError::fatal(
                        CONNECTION_FAILURE,
                        "pg-tls-proxy lost the PostgreSQL server while logging in",
                    ),
                    _ => ClientError::fatal(
                        INVALID_AUTHORIZATION,
                        format!("pg-tls-proxy could not log in to the PostgreSQL server as role \"{user}\""),
                    )
                    .with_hint("The proxy's operator can see why in its log."),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_layout() {
        let bytes = SessionError::PlaintextRefused
            .client_error()
            .expect("client error")
            .to_bytes();
        assert_eq!(bytes[0], b'E');
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len + 1, bytes.len());
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("SFATAL"));
        assert!(text.contains("C28000"));
        assert!(text.contains("sslmode=require"));
        assert_eq!(*bytes.last().expect("non-empty"), 0);
    }
}

/// Why the startup selected no route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no route for this connection")]
    NoRoute,
    #[error("route \"{0}\" does not exist")]
    Unknown(String),
    #[error("the default route is off (routing.default = false)")]
    DefaultOff,
    #[error("route \"{named}\" named in options differs from the route of the server name (\"{sni}\")")]
    Mismatch { named: String, sni: String },
    #[error("route \"{0}\" can only be reached by its server name (it checks client certificates during the TLS handshake)")]
    NeedsServerName(String),
}
