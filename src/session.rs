//! One client connection, from accept to close:
//! negotiation (under the handshake deadline) → access decision → backend
//! link (same deadline) → authentication relay (or proxy login) → byte
//! relay.
//!
//! The handshake deadline covers everything until the backend has been
//! reached; after that the backend's own `authentication_timeout` bounds
//! the login, and the session lasts as long as both peers want. Every
//! outcome lands in the connection's [`SessionRecord`], which settles the
//! metrics and writes the audit event when it is dropped.

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
use crate::audit::SessionRecord;
use crate::authorize::{authorize, Access};
use crate::backend::login::{self, LoginError};
use crate::config::BackendAuth;
use crate::error::{Phase, SessionError};
use crate::negotiate::{negotiate, Ctx, Failed, Negotiated, Path};
use crate::protocol::{MessageReader, StartupPacket, MAX_AUTH_PHASE_MESSAGE};
use crate::relay::{relay, Side};
use crate::startup::{relay_authentication, ExchangeError, Outcome};
use crate::stream::{BackendStream, ClientStream};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Drives one connection. Never panics on peer input; every failure is
/// logged once, with the reason, here. Cancel-safe: dropping the future
/// (forced close at shutdown) still settles metrics and the audit event.
pub async fn run(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let _ = tcp.set_nodelay(true);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!(
        "conn",
        id,
        %peer,
        path = tracing::field::Empty,
        sni = tracing::field::Empty,
        tls_version = tracing::field::Empty,
        cipher = tracing::field::Empty,
        client_identity = tracing::field::Empty,
        user = tracing::field::Empty,
        database = tracing::field::Empty
    );
    let mut record = SessionRecord::new(shared.clone(), id, peer);
    async {
        match drive(tcp, &shared, permit.is_some(), &mut record).await {
            Ok(reason) => record.close_reason = reason,
            Err(failed) => {
                report(&failed.error);
                record.error = Some(failed.error.kind());
                record.close_reason = match failed.error {
                    SessionError::TooManyConnections => "limit",
                    _ => "error",
                };
                if let (Some(mut stream), Some(err)) = (failed.stream, failed.error.client_error())
                {
                    let _ = stream.write_all(&err.to_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }
        }
    }
    .instrument(span)
    .await;
    drop(permit);
}

fn report(error: &SessionError) {
    match error {
        SessionError::ClientEof(_) => debug!(kind = error.kind(), "{error}"),
        SessionError::Tls(_) | SessionError::DirectTlsWithoutAlpn | SessionError::Timeout(_) => {
            warn!(
                kind = error.kind(),
                reason = crate::negotiate::failure_reason(error),
                "TLS handshake refused: {error}"
            )
        }
        _ => warn!(kind = error.kind(), "connection refused: {error}"),
    }
}

/// Returns the close reason label on a normal end.
async fn drive(
    tcp: TcpStream,
    shared: &Shared,
    admitted: bool,
    record: &mut SessionRecord,
) -> Result<&'static str, Failed> {
    let deadline = Instant::now() + shared.handshake_timeout;
    let ctx = Ctx {
        tls: shared.tls.as_ref(),
        allow_plaintext: shared.allow_plaintext,
        deadline,
        metrics: &shared.metrics,
    };
    let negotiated = negotiate(tcp, &ctx).await.inspect_err(|f| {
        let label = match f.error {
            SessionError::PlaintextRefused => Some("plaintext_rejected"),
            SessionError::EarlyData => Some("early_data"),
            SessionError::Protocol(_) => Some("protocol_violation"),
            _ => None,
        };
        if let Some(label) = label {
            shared
                .metrics
                .negotiations
                .with_label_values(&[label])
                .inc();
        }
    })?;
    match negotiated {
        Negotiated::Cancel { packet, path } => {
            shared
                .metrics
                .negotiations
                .with_label_values(&["cancel"])
                .inc();
            record.path = "cancel";
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
            tls,
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
            record.path = path.as_str();
            let span = tracing::Span::current();
            span.record("path", path.as_str());
            if let Some(info) = &tls {
                span.record("sni", info.sni.as_deref().unwrap_or(""));
                span.record("tls_version", info.version);
                span.record("cipher", info.cipher);
            }
            record.tls = tls;
            if !admitted {
                return Err(Failed {
                    error: SessionError::TooManyConnections,
                    stream: Some(stream),
                });
            }
            session(stream, startup, shared, deadline, record).await
        }
    }
}

async fn session(
    mut client: ClientStream,
    startup: StartupPacket,
    shared: &Shared,
    deadline: Instant,
    record: &mut SessionRecord,
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
    record.user = Some(user.clone());
    record.database = Some(database.clone());
    let access = authorize(shared, &client, &user, &database);
    if let Err(SessionError::RoleDenied { identity, .. }) = &access {
        record.identity = Some(identity.clone());
    }
    let access = match access {
        Ok(a) => a,
        Err(e) => return fail(e, client),
    };
    record.backend_auth = match &access {
        Access::Password => "passthrough",
        Access::Certificate {
            identity,
            backend_auth,
        } => {
            span.record("client_identity", identity.as_str());
            record.identity = Some(identity.clone());
            match backend_auth {
                BackendAuth::Passthrough => "passthrough",
                BackendAuth::Proxy => "proxy",
            }
        }
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
    if record.backend_auth == "proxy" {
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
                return fail(SessionError::ProxyLogin { user, source }, client);
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
    record.role = Some(user);
    info!(
        backend = shared.connector.address(),
        sslmode = shared.connector.sslmode().as_str(),
        "session established"
    );
    Ok(relay_session(client, backend, client_surplus, backend_surplus, record).await)
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
    let started = std::time::Instant::now();
    let result = timeout_at(deadline, shared.connector.connect()).await;
    let sslmode = shared.connector.sslmode().as_str();
    let m = &shared.metrics;
    let label = match &result {
        Err(_) => "timeout",
        Ok(Err(e)) => e.kind(),
        Ok(Ok(_)) => {
            m.backend_connect_duration
                .with_label_values(&[sslmode])
                .observe(started.elapsed().as_secs_f64());
            "ok"
        }
    };
    m.backend_connects
        .with_label_values(&[label, sslmode])
        .inc();
    shared.backend_health.record(label == "ok");
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
    record: &mut SessionRecord,
) -> &'static str {
    if !backend_surplus.is_empty() && client.write_all(&backend_surplus).await.is_err() {
        return "error";
    }
    if !client_surplus.is_empty() && backend.write_all(&client_surplus).await.is_err() {
        return "error";
    }
    record.relay_started = Some(std::time::Instant::now());
    match relay(&mut client, &mut backend).await {
        Ok(stats) => {
            record.bytes_client_to_backend = stats.client_to_backend;
            record.bytes_backend_to_client = stats.backend_to_client;
            match stats.first_eof {
                Some(Side::Backend) => "backend_eof",
                _ => "client_eof",
            }
        }
        Err(e) => {
            record.bytes_client_to_backend = e.stats.client_to_backend;
            record.bytes_backend_to_client = e.stats.backend_to_client;
            warn!(failed_side = e.side.as_str(), "session ended: {e}");
            record.error = Some(match e.side {
                Side::Client => "client_io",
                Side::Backend => "backend_io",
            });
            "error"
        }
    }
}
