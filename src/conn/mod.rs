//! One client connection, from accept to close:
//! negotiation (under the handshake deadline) → access decision → backend
//! link (same deadline) → authentication relay (or proxy login) → byte
//! relay.
//!
//! The handshake deadline covers everything until the backend has been
//! reached; after that `limits.auth_timeout` bounds the login, and the
//! session lasts as long as both peers want. Every outcome lands in the
//! connection's [`SessionRecord`], which settles the metrics and writes the
//! audit event when it is dropped. This file is the driver: each step
//! lives in its own module ([`negotiate`], `establish` (with [`authorize`]
//! and `login`), [`relay`], `cancel`) and reports to the driver, which records.

pub mod auth_relay;
pub mod authorize;
mod cancel;
pub mod context;
mod ending;
pub mod error;
mod establish;
mod login;
pub mod negotiate;
pub mod peer;
pub mod proxy_protocol;
pub mod record;
pub mod relay;
mod route;
mod scram;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument;

use crate::runtime::{Route, Runtime};
use crate::sys::fdlimit::FdPermit;
pub use context::Context;
use error::SessionError;
use establish::{establish, Established};
use negotiate::{negotiate, Ctx, Failed, Negotiated};
use record::{CloseReason, Kind, SessionRecord};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What one connection reads: process-wide state, the runtime it started
/// with, and (once known) its route and the route whose certificate was
/// served (the default's until a server name selects one).
#[derive(Clone, Copy)]
struct Conn<'a> {
    ctx: &'a Context,
    rt: &'a Runtime,
    peer: SocketAddr,
    route: &'a Route,
    served: &'a Route,
}

/// Drives one connection. Never panics on peer input; every failure is
/// logged once, with the reason, here. Cancel-safe: dropping the future
/// (forced close at shutdown) still settles metrics and the audit event.
///
/// An idle session's task holds this future for its whole life, so it is
/// kept to what the relay needs: an async block rather than an async fn
/// (which keeps a second copy of its arguments), and every step before the
/// relay boxed and freed when it ends (`benches/idle_sessions.rs` measures
/// what that saves).
///
/// `tcp` joins the reactor of the thread that polls the future; `held` is
/// whatever the caller needs kept until the session ends (its drain token,
/// its place on its thread).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its future"
)]
pub fn run<H>(
    tcp: std::net::TcpStream,
    socket_peer: SocketAddr,
    ctx: Arc<Context>,
    permit: Option<OwnedSemaphorePermit>,
    client_fd: FdPermit,
    held: H,
) -> impl std::future::Future<Output = ()> {
    async move {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // The runtime in force at accept serves this connection to its end,
        // even across reloads.
        let rt = ctx.runtime.load_full();
        // One deadline from accept until the backend is reached.
        let deadline = Instant::now() + rt.handshake_timeout;
        let Some((tcp, peer, via)) =
            Box::pin(client_address(tcp, socket_peer, &ctx, &rt, id, deadline)).await
        else {
            return;
        };
        let span = session_span(id, peer, via);
        let mut record = SessionRecord::new(ctx.clone(), rt.default.connector.clone(), id, peer);
        let conn = Conn {
            ctx: &ctx,
            rt: &rt,
            peer,
            route: &rt.default,
            served: &rt.default,
        };
        let admitted = permit.is_some();
        let established = Box::pin(before_relay(tcp, &conn, deadline, admitted, &mut record))
            .instrument(span.clone())
            .await;
        if let Some(established) = established {
            record.close_reason = relay_session(established, &conn, &mut record)
                .instrument(span)
                .await;
        }
        // The record settles (metrics, audit event) before the drain token
        // in `held` goes: a drain that sees no session left has every
        // session's audit event written.
        drop(record);
        drop(permit);
        drop(client_fd);
        drop(held);
    }
}

/// The span every line about the session is logged in. A function of its
/// own: the macro borrows `id` and `peer`, which would otherwise stay in
/// the session's future for its whole life.
fn session_span(id: u64, peer: SocketAddr, via: Option<SocketAddr>) -> tracing::Span {
    let span = tracing::info_span!(
        "conn",
        id,
        %peer,
        via = tracing::field::Empty,
        path = tracing::field::Empty,
        sni = tracing::field::Empty,
        tls_version = tracing::field::Empty,
        cipher = tracing::field::Empty,
        client_identity = tracing::field::Empty,
        user = tracing::field::Empty,
        database = tracing::field::Empty
    );
    if let Some(via) = via {
        span.record("via", tracing::field::display(via));
    }
    span
}

/// The client's address: the socket's, or behind a load balancer the one
/// its PROXY header names (what logs, metrics and the cancel limiter use),
/// with the balancer's as `via`. `None` when the header is refused.
async fn client_address(
    tcp: std::net::TcpStream,
    socket_peer: SocketAddr,
    ctx: &Context,
    rt: &Runtime,
    id: u64,
    deadline: Instant,
) -> Option<(TcpStream, SocketAddr, Option<SocketAddr>)> {
    let mut tcp = match TcpStream::from_std(tcp) {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::warn!(id, peer = %socket_peer, "accepted socket unusable: {e}");
            return None;
        }
    };
    let _ = tcp.set_nodelay(true);
    let Some(trusted) = &rt.proxy_trusted else {
        return Some((tcp, socket_peer, None));
    };
    match proxy_protocol::read(&mut tcp, socket_peer, trusted, deadline).await {
        Ok(accepted) => {
            let (peer, label) = match accepted {
                proxy_protocol::Accepted::Proxied(client) => (client, "ok"),
                proxy_protocol::Accepted::Local => (socket_peer, "local"),
            };
            ctx.metrics.proxy_protocol.with_label_values(&[label]).inc();
            Some((tcp, peer, Some(socket_peer)))
        }
        Err(why) => {
            ctx.metrics.proxy_protocol.with_label_values(&[why.as_str()]).inc();
            tracing::warn!(id, peer = %socket_peer, reason = why.as_str(), "PROXY header refused: {why}");
            None
        }
    }
}

/// Everything up to the relay; the established session, or `None` once the
/// connection has ended (recorded, and the client told why).
async fn before_relay(
    tcp: TcpStream,
    conn: &Conn<'_>,
    deadline: Instant,
    admitted: bool,
    record: &mut SessionRecord,
) -> Option<Box<Established>> {
    match drive(tcp, conn, deadline, admitted, record).await {
        Ok(Next::Relay(established)) => return Some(established),
        Ok(Next::Closed(reason)) => record.close_reason = reason,
        Err(failed) => {
            ending::report(&failed.error);
            record.error = Some(failed.error.kind());
            record.close_reason = match failed.error {
                SessionError::TooManyConnections => CloseReason::Limit,
                _ => CloseReason::Error,
            };
            if let Some(mut stream) = failed.stream {
                Box::pin(ending::end_with(&mut stream, &failed.error)).await;
            }
        }
    }
    None
}

/// What follows negotiation and login. Boxed: the session's task then
/// holds a pointer, not a copy in each frame it passes through.
enum Next {
    Relay(Box<Established>),
    Closed(CloseReason),
}

/// Negotiation, then a cancel or a session's login.
async fn drive(
    tcp: TcpStream,
    conn: &Conn<'_>,
    deadline: Instant,
    admitted: bool,
    record: &mut SessionRecord,
) -> Result<Next, Failed> {
    let (ctx, rt) = (conn.ctx, conn.rt);
    let nctx = Ctx {
        tls: rt
            .default
            .tls
            .is_some()
            .then_some(rt as &dyn negotiate::Certificates),
        allow_plaintext: rt.allow_plaintext,
        deadline,
        metrics: &ctx.metrics,
        handshake_slots: &ctx.handshake_slots,
    };
    match negotiate(tcp, &nctx).await? {
        Negotiated::Cancel {
            packet,
            path,
            mut stream,
            tls,
        } => {
            record.tls = tls;
            record.kind = Kind::Cancel;
            record.cancel = Some(Box::pin(cancel::forward(conn, &packet, path)).await);
            // Never a reply; but close as PostgreSQL does, with a TLS
            // close_notify, so libpq 17's encrypted cancel sees a clean end.
            let _ = stream.shutdown().await;
            Ok(Next::Closed(CloseReason::ClientEof))
        }
        Negotiated::Startup {
            stream,
            startup,
            path,
            tls,
        } => {
            record.kind = Kind::Session(path);
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
            Ok(match establish(stream, startup, conn, deadline, record).await? {
                Ok(established) => Next::Relay(Box::new(established)),
                Err(reason) => Next::Closed(reason),
            })
        }
    }
}

/// The relay, until either side ends it; then how it ended is settled.
///
/// An async block, not an async fn, for the reason [`run`] gives.
fn relay_session<'a>(
    mut established: Box<Established>,
    conn: &'a Conn<'_>,
    record: &'a mut SessionRecord,
) -> impl std::future::Future<Output = CloseReason> + 'a {
    async move {
        record.relay_started = Some(std::time::Instant::now());
        let Established {
            client,
            backend,
            surplus,
            _registration: _,
        } = &mut *established;
        let options = relay::Options {
            terminate: Some(&conn.ctx.terminate),
            idle_timeout: conn.rt.idle_timeout,
            to_client: std::mem::take(&mut surplus.to_client),
            to_backend: std::mem::take(&mut surplus.to_backend),
            progress: Some(conn.ctx.metrics.relay_progress.clone()),
        };
        let result = relay::relay(client, &mut **backend, options).await;
        // The cancel registration ends with `established`, after this.
        Box::pin(ending::relay_ended(client, result, conn.rt, record)).await
    }
}
