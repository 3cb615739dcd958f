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

pub mod auth_relay;
pub mod authorize;
pub mod context;
pub mod error;
pub mod negotiate;
pub mod record;
pub mod relay;

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

use crate::backend::cancel::CancelTarget;
use crate::backend::login::{self, LoginError};
use crate::backend::BackendError;
use crate::backend::Purpose;
use crate::config::{BackendAuth, SslMode};
use crate::conn::auth_relay::{relay_authentication, ExchangeError, Outcome};
use crate::conn::authorize::{authorize, Access};
use crate::conn::context::Shared;
use crate::conn::error::{Phase, SessionError};
use crate::conn::negotiate::{negotiate, Ctx, Failed, Negotiated, Path};
use crate::conn::record::SessionRecord;
use crate::conn::relay::{relay, Ending, Options, Side};
use crate::policy::cancel::Lookup;
use crate::runtime::Runtime;
use crate::sys::fdlimit::FdPermit;
use crate::wire::stream::{BackendStream, ClientStream};
use crate::wire::{MessageReader, ReadError, StartupPacket, MAX_AUTH_PHASE_MESSAGE};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What one connection reads: process-wide state and the runtime it
/// started with.
struct Conn<'a> {
    shared: &'a Shared,
    rt: &'a Runtime,
    peer: SocketAddr,
}

/// Drives one connection. Never panics on peer input; every failure is
/// logged once, with the reason, here. Cancel-safe: dropping the future
/// (forced close at shutdown) still settles metrics and the audit event.
pub async fn run(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
    client_fd: FdPermit,
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
    // The runtime in force at accept serves this connection to its end,
    // even across reloads.
    let rt = shared.runtime.load_full();
    let mut record = SessionRecord::new(shared.clone(), rt.connector.clone(), id, peer);
    async {
        let conn = Conn {
            shared: &shared,
            rt: &rt,
            peer,
        };
        match drive(tcp, &conn, permit.is_some(), &mut record).await {
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
    drop(client_fd);
}

fn report(error: &SessionError) {
    match error {
        SessionError::ClientEof(_) => debug!(kind = error.kind(), "{error}"),
        SessionError::Tls(_)
        | SessionError::DirectTlsWithoutAlpn
        | SessionError::Timeout(crate::conn::error::Phase::TlsHandshake) => {
            warn!(
                kind = error.kind(),
                reason = crate::conn::negotiate::failure_reason(error),
                "TLS handshake refused: {error}"
            )
        }
        _ => warn!(kind = error.kind(), "connection refused: {error}"),
    }
}

/// Returns the close reason label on a normal end.
async fn drive(
    tcp: TcpStream,
    conn: &Conn<'_>,
    admitted: bool,
    record: &mut SessionRecord,
) -> Result<&'static str, Failed> {
    let (shared, rt) = (conn.shared, conn.rt);
    let deadline = Instant::now() + rt.handshake_timeout;
    let ctx = Ctx {
        tls: rt.tls.as_ref(),
        allow_plaintext: rt.allow_plaintext,
        deadline,
        metrics: &shared.metrics,
        handshake_slots: &shared.handshake_slots,
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
        Negotiated::Cancel {
            packet,
            path,
            stream,
            tls,
        } => {
            record.tls = tls;
            shared
                .metrics
                .negotiations
                .with_label_values(&["cancel"])
                .inc();
            record.path = "cancel";
            forward_cancel(conn, &packet, path).await;
            // Never a reply; but close as PostgreSQL does, with a TLS
            // close_notify, so libpq 17's encrypted cancel sees a clean end.
            let mut stream = stream;
            let _ = stream.shutdown().await;
            Ok("client_eof")
        }
        Negotiated::Startup {
            stream,
            startup,
            path,
            tls,
        } => {
            // TLS paths were counted when the client chose them.
            if path == Path::Plaintext {
                shared
                    .metrics
                    .negotiations
                    .with_label_values(&["plaintext_allowed"])
                    .inc();
            }
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
            session(stream, startup, conn, deadline, record).await
        }
    }
}

async fn session(
    mut client: ClientStream,
    startup: StartupPacket,
    conn: &Conn<'_>,
    deadline: Instant,
    record: &mut SessionRecord,
) -> Result<&'static str, Failed> {
    let (shared, rt) = (conn.shared, conn.rt);
    let fail = |error, stream| {
        Err(Failed {
            error,
            stream: Some(stream),
        })
    };
    let (user, database, replication) = match startup.effective_names() {
        Ok(n) => (n.user, n.database, n.replication),
        Err(e) => return fail(e.into(), client),
    };
    let span = tracing::Span::current();
    span.record("user", user.as_str());
    span.record("database", database.as_str());
    record.user = Some(user.clone());
    record.database = Some(database.clone());
    let access = authorize(rt, &shared.metrics, &client, &user, &database, replication);
    if let Err(SessionError::RoleDenied { identity, .. }) = &access {
        record.identity = Some(identity.clone());
    }
    let access = match access {
        Ok(a) => a,
        Err(e) => return fail(e, client),
    };
    let backend_auth = match &access {
        Access::Password => BackendAuth::Passthrough,
        Access::Certificate {
            identity,
            backend_auth,
        } => {
            span.record("client_identity", identity.as_str());
            record.identity = Some(identity.clone());
            *backend_auth
        }
    };
    record.backend_auth = backend_auth.as_str();
    let to_backend = startup.for_backend();
    let purpose = match backend_auth {
        BackendAuth::Proxy => Purpose::ProxyLogin,
        BackendAuth::Passthrough => Purpose::Passthrough,
    };
    let (mut backend, from_backend, _backend_fd) =
        match reach_backend(conn, deadline, purpose, &to_backend).await {
            Ok(b) => b,
            Err(e) => return fail(e, client),
        };
    if let Err(error) = negotiate_version(&mut client, &startup).await {
        return Err(Failed {
            error,
            stream: None,
        });
    }
    // The client gets a key of ours; the backend's stays in the registry,
    // for exactly as long as this session.
    let mut registration = None;
    let mut issue_key = |backend_pid: i32, backend_secret: [u8; 4]| {
        let (key, guard) = shared.cancels.register(CancelTarget {
            backend_pid,
            backend_secret,
            connector: rt.connector.clone(),
        });
        registration = Some(guard);
        key
    };
    let proxy_auth = backend_auth == BackendAuth::Proxy;
    let login = authenticate(
        conn,
        &mut client,
        &mut backend,
        from_backend,
        &user,
        proxy_auth,
        &mut issue_key,
    );
    // Bounds the whole login, as PostgreSQL's authentication_timeout does:
    // a peer that stops answering cannot hold a session slot.
    let outcome = match tokio::time::timeout(rt.auth_timeout, login).await {
        Ok(outcome) => outcome,
        Err(_) => return fail(SessionError::Timeout(Phase::Authentication), client),
    };
    let (client_surplus, backend_surplus) = match outcome {
        Ok(Outcome::Ready {
            client_surplus,
            backend_surplus,
        }) => (client_surplus, backend_surplus),
        Ok(Outcome::BackendClosed) => return Ok("backend_eof"),
        Ok(Outcome::ClientClosed) => return Ok("client_eof"),
        Err(AuthError::Relay(ExchangeError::Session(e))) => return fail(e, client),
        Err(AuthError::Relay(ExchangeError::BackendClosed)) => {
            warn!("the backend closed the connection during authentication");
            shared.backend_health.record(false);
            let closed = BackendError::Closed(rt.connector.address().to_string());
            return fail(closed.into(), client);
        }
        Err(AuthError::Relay(e)) => {
            warn!("authentication relay failed: {e}");
            return fail(backend_io(rt, std::io::Error::other(e.to_string())), client);
        }
        Err(AuthError::Login(LoginError::Refused(frame))) => {
            let _ = client.write_all(&frame).await;
            return Ok("backend_eof");
        }
        Err(AuthError::Login(source)) => {
            warn!("proxy login failed: {source}");
            return fail(SessionError::ProxyLogin { user, source }, client);
        }
    };
    record.role = Some(user);
    info!(
        backend = rt.connector.address(),
        sslmode = rt.connector.sslmode().as_str(),
        "session established"
    );
    let reason = relay_session(
        client,
        backend,
        client_surplus,
        backend_surplus,
        conn,
        record,
    )
    .await;
    drop(registration);
    Ok(reason)
}

enum AuthError {
    Login(LoginError),
    Relay(ExchangeError),
}

/// The login: the proxy's own (then AuthenticationOk to the client) or the
/// backend's, relayed; either way up to the backend's ReadyForQuery.
async fn authenticate(
    conn: &Conn<'_>,
    client: &mut ClientStream,
    backend: &mut BackendStream,
    mut from_backend: MessageReader,
    user: &str,
    proxy_auth: bool,
    issue_key: &mut (dyn FnMut(i32, [u8; 4]) -> [u8; 8] + Send),
) -> Result<Outcome, AuthError> {
    if proxy_auth {
        proxy_login(conn, &mut from_backend, backend, user)
            .await
            .map_err(AuthError::Login)?;
        client
            .write_all(&AUTHENTICATION_OK)
            .await
            .map_err(|e| AuthError::Relay(ExchangeError::Session(SessionError::ClientIo(e))))?;
    }
    let backend_tls = backend.is_tls();
    relay_authentication(client, backend, from_backend, backend_tls, issue_key)
        .await
        .map_err(AuthError::Relay)
}

/// AuthenticationOk, sent by the proxy after it logged in on the client's
/// behalf.
const AUTHENTICATION_OK: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];

fn backend_io(rt: &Runtime, source: std::io::Error) -> SessionError {
    crate::backend::BackendError::Io {
        address: rt.connector.address().to_string(),
        source,
    }
    .into()
}

/// Reaching the backend means: a descriptor for the link, the link itself
/// (TCP, and TLS per sslmode) under the handshake deadline, the startup
/// message sent, and the server's first answer within
/// `backend.connect_timeout`. A server that accepts connections and then
/// says nothing is as unreachable as one that refuses them: both count as
/// backend failures for `/ready`. The descriptor permit lives as long as
/// the link.
async fn reach_backend(
    conn: &Conn<'_>,
    deadline: Instant,
    purpose: Purpose,
    startup: &[u8],
) -> Result<(BackendStream, MessageReader, FdPermit), SessionError> {
    let (shared, rt) = (conn.shared, conn.rt);
    let address = || rt.connector.address().to_string();
    let Some(fd) = shared.fds.try_take() else {
        crate::conn::context::out_of_descriptors(shared, "backend");
        return Err(BackendError::OutOfDescriptors(address()).into());
    };
    let started = std::time::Instant::now();
    let attempt = async {
        let mut backend = timeout_at(deadline, rt.connector.connect(purpose))
            .await
            .map_err(|_| SessionError::Timeout(Phase::BackendConnect))??;
        backend
            .write_all(startup)
            .await
            .map_err(|e| backend_io(rt, e))?;
        let mut reader = MessageReader::new(MAX_AUTH_PHASE_MESSAGE);
        match tokio::time::timeout(rt.connector.connect_timeout(), reader.fill(&mut backend)).await
        {
            Err(_) => Err(BackendError::NoAnswer(address()).into()),
            Ok(Err(ReadError::Eof)) => Err(BackendError::Closed(address()).into()),
            Ok(Err(ReadError::Io(e))) => Err(backend_io(rt, e)),
            Ok(Err(ReadError::Protocol(p))) => Err(SessionError::Protocol(p)),
            Ok(Ok(())) => Ok((backend, reader)),
        }
    };
    let result = attempt.await;
    let sslmode = rt.connector.sslmode().as_str();
    let m = &shared.metrics;
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
        crate::conn::context::out_of_descriptors(shared, "backend");
    } else {
        shared.backend_health.record(label == "ok");
    }
    result.map(|(backend, reader)| (backend, reader, fd))
}

async fn proxy_login(
    conn: &Conn<'_>,
    reader: &mut MessageReader,
    backend: &mut BackendStream,
    user: &str,
) -> Result<(), LoginError> {
    let end_point = backend.peer_leaf().map(login::tls_server_end_point);
    let secret = conn.rt.credentials.get(user);
    let verified = matches!(
        conn.rt.connector.sslmode(),
        SslMode::VerifyCa | SslMode::VerifyFull
    );
    let result = login::login(reader, backend, user, secret, end_point, verified).await;
    let logins = &conn.shared.metrics.backend_logins;
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
    // The full version number, as PostgreSQL sends it (libpq 18 reads a
    // bare minor number as a downgrade below 3.0).
    let msg = NegotiateProtocolVersion::new(
        pgwire::messages::startup::Startup::PROTOCOL_VERSION_3_0,
        options,
    );
    let mut buf = BytesMut::with_capacity(msg.message_length() + 1);
    msg.encode(&mut buf)
        .map_err(|_| crate::wire::ProtocolError::Malformed("startup options"))?;
    client.write_all(&buf).await.map_err(SessionError::ClientIo)
}

async fn relay_session(
    mut client: ClientStream,
    mut backend: BackendStream,
    client_surplus: BytesMut,
    backend_surplus: BytesMut,
    conn: &Conn<'_>,
    record: &mut SessionRecord,
) -> &'static str {
    record.relay_started = Some(std::time::Instant::now());
    let options = Options {
        terminate: Some(&conn.shared.terminate),
        idle_timeout: conn.rt.idle_timeout,
        to_client: backend_surplus,
        to_backend: client_surplus,
        progress: Some(conn.shared.metrics.relay_progress.clone()),
    };
    let result = relay(&mut client, &mut backend, options).await;
    let stats = match &result {
        Ok(s) => *s,
        Err(e) => e.stats,
    };
    record.bytes_client_to_backend = stats.client_to_backend;
    record.bytes_backend_to_client = stats.backend_to_client;
    match result {
        Ok(stats) => match stats.ending {
            Ending::Closed => match stats.first_eof {
                Some(Side::Backend) => "backend_eof",
                _ => "client_eof",
            },
            Ending::Terminated => {
                end_with(&mut client, SessionError::AdminShutdown).await;
                "shutdown"
            }
            Ending::Idle => {
                info!(idle_timeout = ?conn.rt.idle_timeout, "closing idle session");
                end_with(&mut client, SessionError::IdleTimeout).await;
                "limit"
            }
        },
        Err(e) => {
            warn!(failed_side = e.side.as_str(), "session ended: {e}");
            record.error = Some(match e.side {
                Side::Client => "client_io",
                Side::Backend => "backend_io",
            });
            "error"
        }
    }
}

/// Tells the client why the proxy is ending its session (at a message
/// boundary), then closes.
async fn end_with(client: &mut ClientStream, why: SessionError) {
    if let Some(err) = why.client_error() {
        let _ = client.write_all(&err.to_bytes()).await;
    }
    let _ = client.shutdown().await;
}

/// Looks up a CancelRequest's proxy key and forwards the backend's key
/// over the backend link that session used. Never answers the client.
async fn forward_cancel(conn: &Conn<'_>, packet: &[u8], path: Path) {
    let metrics = &conn.shared.metrics;
    let (lookup, target) =
        conn.shared
            .cancels
            .lookup(conn.peer.ip(), packet, std::time::Instant::now());
    let result = match (lookup, target) {
        (Lookup::Found, Some(target)) => match conn.shared.fds.try_take() {
            None => {
                crate::conn::context::out_of_descriptors(conn.shared, "backend");
                "failed"
            }
            Some(_fd) => match target.connector.forward_cancel(&target.packet()).await {
                Ok(()) => "forwarded",
                Err(e) => {
                    warn!(kind = e.kind(), "cancel request not delivered: {e}");
                    "failed"
                }
            },
        },
        (Lookup::RateLimited, _) => "rate_limited",
        _ => "unknown",
    };
    debug!(path = path.as_str(), result, "CancelRequest");
    metrics.cancel_requests.with_label_values(&[result]).inc();
}
