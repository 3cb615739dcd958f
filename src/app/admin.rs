//! The admin HTTP listener, on its own address (never the data port):
//! `GET /metrics` (Prometheus text format), `GET /live`, `GET /ready`, and
//! `POST /reload` (loopback peers only).
//! Served with hyper (HTTP/1.1); nothing here parses HTTP by hand.
//!
//! `/ready` answers 200 once the listener is bound and certificates are
//! loaded, and 503 while draining or when the last N backend connects
//! failed (`admin.unready_after_backend_failures`), so a load balancer
//! stops sending clients to a replica that cannot serve them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// listen(2) backlog of the admin listener.
pub const BACKLOG: u32 = 128;

/// Admin connections served at once; more are closed on accept (and
/// counted). Covered by the descriptor reserve (`fdlimit::RESERVED`), so the
/// admin listener answers even when client traffic has used its budget.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request's headers (and, between
/// keep-alive requests, the next request's), so that unfinished requests
/// cannot hold admin connections.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What `/ready` looks at.
pub struct Readiness {
    pub serving: AtomicBool,
    pub draining: AtomicBool,
    pub unready_after_backend_failures: u32,
}

impl Readiness {
    pub fn new(unready_after_backend_failures: u32) -> Readiness {
        Readiness {
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            unready_after_backend_failures,
        }
    }

    /// Whether readiness is down only because of backend failures.
    pub fn backend_down(&self, health: &crate::backend::health::BackendHealth) -> bool {
        let n = self.unready_after_backend_failures;
        n > 0 && health.consecutive_failures() >= n
    }

    /// `Ok` when ready, else the reason.
    pub fn check(&self, health: &crate::backend::health::BackendHealth) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        if !self.serving.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        let n = self.unready_after_backend_failures;
        let failures = health.consecutive_failures();
        if n > 0 && failures >= n {
            return Err(format!(
                "backend unreachable: the last {failures} connect attempts failed"
            ));
        }
        Ok(())
    }
}

/// Everything the admin handlers read.
pub struct AdminState {
    pub registry: Registry,
    pub readiness: Arc<Readiness>,
    pub shared: Arc<crate::conn::context::Shared>,
    pub reloader: Arc<crate::app::reload::Reloader>,
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(pair) => pair,
                Err(e) => {
                    warn!("admin accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state.shared.metrics.admin_connections_refused.inc();
            debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone(), peer));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!("admin connection: {e}") },
                _ = stop.cancelled() => {}
            }
            drop(slot);
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn ready_response(
    state: &AdminState,
    shared: &crate::conn::context::Shared,
) -> Response<Full<Bytes>> {
    match state.readiness.check(&shared.backend_health) {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<AdminState>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let shared = &state.shared;
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            shared.metrics.ready.set(i64::from(
                state.readiness.check(&shared.backend_health).is_ok(),
            ));
            let encoder = TextEncoder::new();
            let mut body = Vec::with_capacity(16 * 1024);
            match encoder.encode(&state.registry.gather(), &mut body) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    if let Ok(v) = hyper::header::HeaderValue::from_str(encoder.format_type()) {
                        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                    }
                    r
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                ),
            }
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            // While the backend counts as down, each readiness probe tries
            // it once: without client traffic (which a load balancer stops
            // sending to an unready replica) nothing else would notice its
            // recovery.
            if state.readiness.backend_down(&shared.backend_health) {
                let connector = shared.runtime.load().connector.clone();
                let ok = connector.probe().await.is_ok();
                shared.backend_health.record(ok);
            }
            ready_response(&state, shared)
        }
        (&Method::POST, "/reload") if !peer.ip().is_loopback() => text(
            StatusCode::FORBIDDEN,
            "reload is allowed from loopback addresses only\n",
        ),
        (&Method::POST, "/reload") => match state.reloader.reload().await {
            Ok(()) => text(StatusCode::OK, "reloaded\n"),
            Err(e) => text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("reload failed, old configuration kept: {e}\n"),
            ),
        },
        (_, "/metrics" | "/live" | "/ready") => text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (_, "/reload") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /live or /ready\n",
        ),
    })
}
