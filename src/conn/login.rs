//! Reaching the backend and logging in: the link (TCP, TLS per sslmode)
//! with the startup sent and a first answer, then either the proxy's own
//! login (certificate clients of `backend_auth = "proxy"` rules) followed
//! by AuthenticationOk to the client, or the backend's authentication
//! relayed ([`super::auth_relay`]); both up to the backend's ReadyForQuery,
//! under `limits.auth_timeout`.

use std::time::Instant as StdInstant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout_at, Instant};
use tracing::{info, warn};

use super::auth_relay::{relay_authentication, ExchangeError, IssueKey, Outcome};
use super::error::{Phase, SessionError};
use super::record::CloseReason;
use super::Conn;
use super::scram::Proved;
use crate::backend::login::{self, LoginError};
use crate::backend::scram_login;
use crate::policy::scram::client::BackendScramError;
use crate::backend::{BackendError, Purpose};
use crate::config::{BackendAuth, SslMode};
use crate::sys::fdlimit::FdPermit;
use crate::wire::encode::{negotiate_protocol_version, AUTHENTICATION_OK};
use crate::wire::stream::{BackendStream, ClientStream};
use crate::wire::{MessageReader, ReadError, StartupPacket, MAX_AUTH_PHASE_MESSAGE};

/// A backend that answered the startup: the link, what it has sent so far,
/// the descriptor the link holds, and how the proxy will log in.
pub(super) struct Link {
    backend: BackendStream,
    reader: MessageReader,
    _fd: FdPermit,
    auth: BackendAuth,
}

/// Bytes each side sent past the login, for the relay to send on first.
pub(super) struct Surplus {
    pub to_client: BytesMut,
    pub to_backend: BytesMut,
}

/// How the login ended.
pub(super) enum Login {
    /// ReadyForQuery reached the client: relay from here.
    Ready {
        backend: LinkedBackend,
        surplus: Surplus,
        /// The proxy's own login to the backend, when it ran one.
        method: Option<&'static str>,
    },
    /// A peer ended the connection (the backend's refusal was relayed).
    Ended(CloseReason),
    /// Failed; the client may still be told why.
    Failed(SessionError),
}

/// The backend link during the relay; holds its descriptor permit.
pub(super) struct LinkedBackend {
    stream: BackendStream,
    _fd: FdPermit,
}

impl std::ops::Deref for LinkedBackend {
    type Target = BackendStream;
    fn deref(&self) -> &BackendStream {
        &self.stream
    }
}

impl std::ops::DerefMut for LinkedBackend {
    fn deref_mut(&mut self) -> &mut BackendStream {
        &mut self.stream
    }
}

/// Reaching the backend means: a descriptor for the link, the link itself
/// (TCP, and TLS per sslmode) under the handshake deadline, the startup
/// message sent, and the server's first answer within
/// `backend.connect_timeout`. A server that accepts connections and then
/// says nothing is as unreachable as one that refuses them: both count as
/// backend failures for `/ready`.
pub(super) async fn reach_backend(
    conn: &Conn<'_>,
    deadline: Instant,
    auth: BackendAuth,
    startup: &StartupPacket,
) -> Result<Link, SessionError> {
    let ctx = conn.ctx;
    let address = || conn.route.connector.address().to_string();
    let Some(fd) = ctx.fds.try_take() else {
        ctx.out_of_descriptors("backend");
        return Err(BackendError::OutOfDescriptors(address()).into());
    };
    let purpose = match auth {
        BackendAuth::Proxy => Purpose::ProxyLogin,
        BackendAuth::Passthrough => Purpose::Passthrough,
    };
    let started = StdInstant::now();
    let attempt = async {
        let mut backend = timeout_at(deadline, conn.route.connector.connect(purpose))
            .await
            .map_err(|_| SessionError::Timeout(Phase::BackendConnect))??;
        backend
            .write_all(&startup.for_backend())
            .await
            .map_err(|e| backend_io(conn, e))?;
        let mut reader = MessageReader::new(MAX_AUTH_PHASE_MESSAGE);
        match tokio::time::timeout(conn.route.connector.connect_timeout(), reader.fill(&mut backend)).await
        {
            Err(_) => Err(BackendError::NoAnswer(address()).into()),
            Ok(Err(ReadError::Eof)) => Err(BackendError::Closed(address()).into()),
            Ok(Err(ReadError::Io(e))) => Err(backend_io(conn, e)),
            Ok(Err(ReadError::Protocol(p))) => Err(SessionError::Protocol(p)),
            Ok(Ok(())) => Ok((backend, reader)),
        }
    };
    let result = attempt.await;
    let sslmode = conn.route.connector.sslmode().as_str();
    let m = &ctx.metrics;
    let label = match &result {
        Ok(_) => {
            m.backend_connect_duration
                .with_label_values(&[sslmode])
                .observe(started.elapsed().as_secs_f64());
            "ok"
        }
        Err(SessionError::Timeout(_)) => "timeout",
        Err(SessionError::Backend(e)) => e.kind(),
        Err(_) => "io",
    };
    m.backend_connects
        .with_label_values(&[label, sslmode])
        .inc();
    if label == "fd_exhausted" {
        ctx.out_of_descriptors("backend");
    } else {
        ctx.backend_health.record(label == "ok");
    }
    result.map(|(backend, reader)| Link {
        backend,
        reader,
        _fd: fd,
        auth,
    })
}

/// Sends NegotiateProtocolVersion when the client asked for a newer
/// minor version than 3.2 or for `_pq_.` options (none are supported),
/// exactly when PostgreSQL 18 does (libpq 18 refuses one that changes
/// nothing).
pub(super) async fn negotiate_version(
    client: &mut ClientStream,
    startup: &StartupPacket,
) -> Result<(), SessionError> {
    let options = startup.protocol_options();
    if startup.minor == startup.client_minor() && options.is_empty() {
        return Ok(());
    }
    let buf = negotiate_protocol_version(startup.client_minor(), options)?;
    client.write_all(&buf).await.map_err(SessionError::ClientIo)
}

/// The login, bounded as PostgreSQL's authentication_timeout bounds it: a
/// peer that stops answering cannot hold a session slot.
pub(super) async fn log_in(
    conn: &Conn<'_>,
    client: &mut ClientStream,
    link: Link,
    user: &str,
    proved: Option<Proved>,
    issue_key: &mut IssueKey<'_>,
) -> Login {
    let Link {
        mut backend,
        reader,
        _fd,
        auth,
    } = link;
    let how = match proved {
        Some(p) => How::Scram(p),
        None if auth == BackendAuth::Proxy => How::Proxy,
        None => How::Relay,
    };
    let exchange = authenticate(conn, client, &mut backend, reader, user, how, issue_key);
    let outcome = match tokio::time::timeout(conn.rt.auth_timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => return Login::Failed(SessionError::Timeout(Phase::Authentication)),
    };
    let rt = conn.rt;
    match outcome {
        Ok((
            Outcome::Ready {
                client_surplus,
                backend_surplus,
            },
            method,
        )) => Login::Ready {
            method,
            backend: LinkedBackend {
                stream: backend,
                _fd,
            },
            surplus: Surplus {
                to_client: backend_surplus,
                to_backend: client_surplus,
            },
        },
        Ok((Outcome::BackendClosed, _)) => Login::Ended(CloseReason::BackendEof),
        Ok((Outcome::ClientClosed, _)) => Login::Ended(CloseReason::ClientEof),
        Err(AuthError::Relay(ExchangeError::Session(e))) => Login::Failed(e),
        Err(AuthError::Relay(ExchangeError::BackendClosed)) => {
            warn!("the backend closed the connection during authentication");
            conn.ctx.backend_health.record(false);
            Login::Failed(BackendError::Closed(conn.route.connector.address().to_string()).into())
        }
        Err(AuthError::Relay(e)) => {
            warn!("authentication relay failed: {e}");
            Login::Failed(backend_io(conn, std::io::Error::other(e.to_string())))
        }
        Err(AuthError::Login(LoginError::Refused(frame))) => {
            let _ = client.write_all(&frame).await;
            Login::Ended(CloseReason::BackendEof)
        }
        // The client proved a password the backend no longer has: the
        // client is told what a wrong password gets; the log says why.
        Err(AuthError::Login(LoginError::ScramKey(e @ BackendScramError::VerifierMismatch { .. }))) => {
            warn!("SCRAM login refused before sending a proof: {e}");
            // A cached verifier is stale: the next login looks it up again.
            if let Some(query) = rt.scram.as_ref().and_then(|s| s.auth_query.as_ref()) {
                query.forget(user);
            }
            Login::Failed(SessionError::PasswordFailed(user.to_string()))
        }
        Err(AuthError::Login(source)) => {
            warn!("proxy login failed: {source}");
            Login::Failed(SessionError::ProxyLogin {
                user: user.to_string(),
                source,
            })
        }
    }
}

enum AuthError {
    Login(LoginError),
    Relay(ExchangeError),
}

/// How the proxy gets the client logged in.
enum How {
    /// The backend's own authentication, relayed.
    Relay,
    /// The certificate was the authentication: the proxy logs in.
    Proxy,
    /// SCRAM terminated: the client proved its password to the proxy.
    Scram(Proved),
}

/// The proxy's own login (then AuthenticationOk to the client) or the
/// backend's, relayed; either way up to the backend's ReadyForQuery.
async fn authenticate(
    conn: &Conn<'_>,
    client: &mut ClientStream,
    backend: &mut BackendStream,
    mut from_backend: MessageReader,
    user: &str,
    how: How,
    issue_key: &mut IssueKey<'_>,
) -> Result<(Outcome, Option<&'static str>), AuthError> {
    let mut method = None;
    let client_io = |e| AuthError::Relay(ExchangeError::Session(SessionError::ClientIo(e)));
    match how {
        How::Relay => {}
        How::Proxy => {
            let m = proxy_login(conn, &mut from_backend, backend, user)
                .await
                .map_err(AuthError::Login)?;
            method = Some(m.as_str());
            client.write_all(&AUTHENTICATION_OK).await.map_err(client_io)?;
        }
        How::Scram(proved) => {
            let m = scram_login(conn, &mut from_backend, backend, &proved)
                .await
                .map_err(AuthError::Login)?;
            method = Some(m.as_str());
            // Only now does the client learn the proxy knew its verifier.
            client
                .write_all(&super::scram::final_and_ok(&proved.verified.server_final))
                .await
                .map_err(client_io)?;
        }
    }
    let backend_tls = backend.is_tls();
    relay_authentication(client, backend, from_backend, backend_tls, issue_key)
        .await
        .map(|outcome| (outcome, method))
        .map_err(AuthError::Relay)
}

async fn proxy_login(
    conn: &Conn<'_>,
    reader: &mut MessageReader,
    backend: &mut BackendStream,
    user: &str,
) -> Result<login::Method, LoginError> {
    let end_point = backend.peer_leaf().and_then(crate::tls::end_point);
    let secret = conn.route.credentials.get(user);
    let verified = matches!(
        conn.route.connector.sslmode(),
        SslMode::VerifyCa | SslMode::VerifyFull
    );
    let result = login::login(reader, backend, user, secret, end_point, verified).await;
    let logins = &conn.ctx.metrics.backend_logins;
    match &result {
        Ok(method) => {
            logins.with_label_values(&[method.as_str(), "ok"]).inc();
            info!(method = method.as_str(), "proxy logged in to the backend");
        }
        Err(_) => logins.with_label_values(&["unknown", "failed"]).inc(),
    }
    result
}

/// The backend's leg of a terminated SCRAM login, counted for both legs.
async fn scram_login(
    conn: &Conn<'_>,
    reader: &mut MessageReader,
    backend: &mut BackendStream,
    proved: &Proved,
) -> Result<login::Method, LoginError> {
    let end_point = backend.peer_leaf().and_then(crate::tls::end_point);
    let result = scram_login::login_with_key(
        reader,
        backend,
        &proved.verified.client_key,
        &proved.verifier,
        end_point,
    )
    .await;
    let outcome = match &result {
        Ok(method) => {
            conn.ctx
                .metrics
                .backend_logins
                .with_label_values(&[method.as_str(), "ok"])
                .inc();
            info!(
                client = proved.method(),
                backend = method.as_str(),
                "SCRAM terminated: client verified, proxy logged in to the backend"
            );
            "ok"
        }
        Err(LoginError::Refused(_)) => "backend_refused",
        Err(LoginError::ScramKey(BackendScramError::VerifierMismatch { .. })) => "verifier_mismatch",
        Err(_) => "backend_failed",
    };
    super::scram::count(conn, proved.method(), outcome);
    result
}

fn backend_io(conn: &Conn<'_>, source: std::io::Error) -> SessionError {
    BackendError::Io {
        address: conn.route.connector.address().to_string(),
        source,
    }
    .into()
}
