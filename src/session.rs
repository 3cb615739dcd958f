//! One client connection, from accept to close:
//! negotiation (under the handshake deadline) → backend link (same
//! deadline) → authentication relay → byte relay.
//!
//! The handshake deadline covers everything until the backend has been
//! reached; after that the backend's own `authentication_timeout` bounds
//! the login, and the session lasts as long as both peers want.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use pgwire::messages::startup::NegotiateProtocolVersion;
use pgwire::messages::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn, Instrument};

use crate::app::Shared;
use crate::authorize::{authorize, Access};
use crate::backend::login::{self, LoginError};
use crate::config::BackendAuth;
use crate::error::{Phase, SessionError};
use crate::negotiate::{negotiate, Failed, Negotiated, Path};
use crate::protocol::StartupPacket;
use crate::protocol::{MessageReader, MAX_AUTH_PHASE_MESSAGE};
use crate::relay::{relay, Side};
use crate::startup::{relay_authentication, ExchangeError, Outcome};
use crate::stream::{BackendStream, ClientStream};

/// Drives one connection. Never panics on peer input; every failure is
/// logged once, with the reason, here.
pub async fn run(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let metrics = &shared.metrics;
    metrics.connections_accepted.inc();
    metrics.connections_active.inc();
    let _ = tcp.set_nodelay(true);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "conn",
        id,
        %peer,
        path = tracing::field::Empty,
        user = tracing::field::Empty,
        database = tracing::field::Empty
    );
    let reason = run_in_span(tcp, &shared, permit.is_some())
        .instrument(span)
        .await;
    drop(permit);
    metrics
        .connections_closed
        .with_label_values(&[reason])
        .inc();
    metrics.connections_active.dec();
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn run_in_span(tcp: TcpStream, shared: &Shared, admitted: bool) -> &'static str {
    match drive(tcp, shared, admitted).await {
        Ok(reason) => reason,
        Err(failed) => {
            report(&failed.error);
            if let (Some(mut stream), Some(err)) = (failed.stream, failed.error.client_error()) {
                let _ = stream.write_all(&err.to_bytes()).await;
                let _ = stream.shutdown().await;
            }
            if matches!(failed.error, SessionError::TooManyConnections) {
                "limit"
            } else {
                "error"
            }
        }
    }
}

fn report(error: &SessionError) {
    match error {
        SessionError::ClientEof(_) => debug!(kind = error.kind(), "{error}"),
        _ => warn!(kind = error.kind(), "connection refused: {error}"),
    }
}

/// Returns the close reason label on a normal end.
async fn drive(tcp: TcpStream, shared: &Shared, admitted: bool) -> Result<&'static str, Failed> {
    let deadline = Instant::now() + shared.handshake_timeout;
    let negotiated = negotiate(tcp, shared.tls.as_ref(), shared.allow_plaintext, deadline).await;
    let negotiated = negotiated.inspect_err(|f| {
        let label = match f.error {
            SessionError::PlaintextRefused => "plaintext_rejected",
            SessionError::EarlyData => "early_data",
            SessionError::Protocol(_) => "protocol_violation",
            _ => "failed",
        };
        shared
            .metrics
            .negotiations
            .with_label_values(&[label])
            .inc();
    })?;
    match negotiated {
        Negotiated::Cancel { packet, path } => {
            shared
                .metrics
                .negotiations
                .with_label_values(&["cancel"])
                .inc();
            debug!(path = path.as_str(), "forwarding CancelRequest");
            if let Err(e) = shared.connector.forward_cancel(&packet).await {
                warn!(kind = e.kind(), "cancel request not delivered: {e}");
            }
            Ok("client_eof")
        }
        Negotiated::Startup {
            stream,
            startup,
            path,
        } => {
            let label = match path {
                Path::Plaintext => "plaintext_allowed",
                p => p.as_str(),
            };
            shared
                .metrics
                .negotiations
                .with_label_values(&[label])
                .inc();
            if !admitted {
                return Err(Failed {
                    error: SessionError::TooManyConnections,
                    stream: Some(stream),
                });
            }
            session(stream, startup, path, shared, deadline).await
        }
    }
}

async fn session(
    mut client: ClientStream,
    startup: StartupPacket,
    path: Path,
    shared: &Shared,
    deadline: Instant,
) -> Result<&'static str, Failed> {
    let fail = |error, stream| {
        Err(Failed {
            error,
            stream: Some(stream),
        })
    };
    let Some(user) = startup.user().map(str::to_owned) else {
        return fail(SessionError::NoUser, client);
    };
    let database = startup.database().unwrap_or_default().to_owned();
    let span = tracing::Span::current();
    span.record("user", user.as_str());
    span.record("database", database.as_str());
    span.record("path", path.as_str());
    let access = match authorize(shared, &client, &user, &database) {
        Ok(a) => a,
        Err(e) => return fail(e, client),
    };
    let to_backend = match startup.for_backend() {
        Ok(bytes) => bytes,
        Err(e) => return fail(e.into(), client),
    };
    let mut backend = match connect_backend(shared, deadline).await {
        Ok(b) => b,
        Err(e) => return fail(e, client),
    };
    if let Err(error) = negotiate_version(&mut client, &startup).await {
        return Err(Failed {
            error,
            stream: None,
        });
    }
    if let Err(e) = backend.write_all(&to_backend).await {
        return fail(backend_io(shared, e), client);
    }
    let mut from_backend = MessageReader::new(MAX_AUTH_PHASE_MESSAGE);
    if let Access::Certificate {
        backend_auth: BackendAuth::Proxy,
        ..
    } = access
    {
        match proxy_login(shared, &mut from_backend, &mut backend, &user).await {
            Ok(()) => {
                if let Err(e) = client.write_all(&AUTHENTICATION_OK).await {
                    return Err(Failed {
                        error: SessionError::ClientIo(e),
                        stream: None,
                    });
                }
            }
            Err(LoginError::Refused(frame)) => {
                let _ = client.write_all(&frame).await;
                return Ok("backend_eof");
            }
            Err(source) => {
                warn!("proxy login failed: {source}");
                let error = SessionError::ProxyLogin { user, source };
                return fail(error, client);
            }
        }
    }
    let backend_tls = backend.is_tls();
    let outcome = relay_authentication(&mut client, &mut backend, from_backend, backend_tls).await;
    let (client_surplus, backend_surplus) = match outcome {
        Ok(Outcome::Ready {
            client_surplus,
            backend_surplus,
        }) => (client_surplus, backend_surplus),
        Ok(Outcome::BackendClosed) => return Ok("backend_eof"),
        Ok(Outcome::ClientClosed) => return Ok("client_eof"),
        Err(ExchangeError::Session(e)) => return fail(e, client),
        Err(e) => {
            warn!("authentication relay failed: {e}");
            return fail(
                backend_io(shared, std::io::Error::other(e.to_string())),
                client,
            );
        }
    };
    info!(
        backend = shared.connector.address(),
        sslmode = shared.connector.sslmode().as_str(),
        "session established"
    );
    Ok(relay_session(client, backend, client_surplus, backend_surplus, shared).await)
}

/// AuthenticationOk, sent by the proxy after it logged in on the client's
/// behalf.
const AUTHENTICATION_OK: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];

fn backend_io(shared: &Shared, source: std::io::Error) -> SessionError {
    crate::backend::BackendError::Io {
        address: shared.connector.address().to_string(),
        source,
    }
    .into()
}

async fn connect_backend(
    shared: &Shared,
    deadline: Instant,
) -> Result<BackendStream, SessionError> {
    let result = timeout_at(deadline, shared.connector.connect()).await;
    let label = match &result {
        Err(_) => "timeout",
        Ok(Err(e)) => e.kind(),
        Ok(Ok(_)) => "ok",
    };
    shared
        .metrics
        .backend_connects
        .with_label_values(&[label])
        .inc();
    match result {
        Err(_) => Err(SessionError::Timeout(Phase::BackendConnect)),
        Ok(r) => r.map_err(SessionError::from),
    }
}

async fn proxy_login(
    shared: &Shared,
    reader: &mut MessageReader,
    backend: &mut BackendStream,
    user: &str,
) -> Result<(), LoginError> {
    let end_point = backend.peer_leaf().map(login::tls_server_end_point);
    let secret = shared.credentials.get(user);
    let result = login::login(reader, backend, user, secret, end_point).await;
    let logins = &shared.metrics.backend_logins;
    match &result {
        Ok(method) => {
            logins.with_label_values(&[method.as_str(), "ok"]).inc();
            info!(method = method.as_str(), "proxy logged in to the backend");
        }
        Err(_) => logins.with_label_values(&["unknown", "failed"]).inc(),
    }
    result.map(|_| ())
}

/// Sends NegotiateProtocolVersion when the client asked for a minor
/// version or `_pq_.` options we do not support, as PostgreSQL does.
async fn negotiate_version(
    client: &mut ClientStream,
    startup: &StartupPacket,
) -> Result<(), SessionError> {
    let options = startup.protocol_options();
    if startup.minor == 0 && options.is_empty() {
        return Ok(());
    }
    let msg = NegotiateProtocolVersion::new(0, options);
    let mut buf = BytesMut::with_capacity(msg.message_length() + 1);
    msg.encode(&mut buf)
        .map_err(|_| crate::protocol::ProtocolError::Malformed("startup options"))?;
    client.write_all(&buf).await.map_err(SessionError::ClientIo)
}

async fn relay_session(
    mut client: ClientStream,
    mut backend: BackendStream,
    client_surplus: BytesMut,
    backend_surplus: BytesMut,
    shared: &Shared,
) -> &'static str {
    if !backend_surplus.is_empty() && client.write_all(&backend_surplus).await.is_err() {
        return "error";
    }
    if !client_surplus.is_empty() && backend.write_all(&client_surplus).await.is_err() {
        return "error";
    }
    let started = std::time::Instant::now();
    let result = relay(&mut client, &mut backend).await;
    let bytes = &shared.metrics.bytes_relayed;
    match result {
        Ok(stats) => {
            bytes
                .with_label_values(&["client_to_backend"])
                .inc_by(stats.client_to_backend);
            bytes
                .with_label_values(&["backend_to_client"])
                .inc_by(stats.backend_to_client);
            info!(
                bytes_client_to_backend = stats.client_to_backend,
                bytes_backend_to_client = stats.backend_to_client,
                duration_ms = started.elapsed().as_millis() as u64,
                "session ended"
            );
            match stats.first_eof {
                Some(Side::Backend) => "backend_eof",
                _ => "client_eof",
            }
        }
        Err(e) => {
            bytes
                .with_label_values(&["client_to_backend"])
                .inc_by(e.stats.client_to_backend);
            bytes
                .with_label_values(&["backend_to_client"])
                .inc_by(e.stats.backend_to_client);
            warn!(
                failed_side = e.side.as_str(),
                bytes_client_to_backend = e.stats.client_to_backend,
                bytes_backend_to_client = e.stats.backend_to_client,
                "session ended: {e}"
            );
            "error"
        }
    }
}
