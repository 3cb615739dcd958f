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
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, IntCounter, IntGauge, Registry, TextEncoder};
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

/// What `/ready` reports: implemented by the app over its drain flags
/// and the backend's health.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, else why not, from what is known now (no I/O).
    fn check(&self) -> Result<(), String>;

    /// Runs before `/ready` answers: may try what is down, so that a
    /// replica the load balancer stopped sending clients to can notice
    /// its recovery.
    fn probe(&self) -> impl Future<Output = ()> + Send;
}

/// `POST /reload`.
pub trait Reload: Send + Sync + 'static {
    /// `Err` says why the old configuration was kept.
    fn reload(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Everything the admin listener serves: narrow handles, nothing of the
/// connection path.
pub struct Admin<R, L> {
    pub registry: Registry,
    pub readiness: R,
    pub reloader: L,
    /// `pgtls_ready`, set from `readiness` at each scrape.
    pub ready_gauge: IntGauge,
    /// `pgtls_admin_connections_refused_total`.
    pub refused: IntCounter,
}

/// Serves until `stop` is cancelled.
pub async fn serve<R: Readiness, L: Reload>(
    listener: TcpListener,
    state: Arc<Admin<R, L>>,
    stop: CancellationToken,
) {
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
            state.refused.inc();
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

async fn handle<R: Readiness, L: Reload>(
    req: Request<Incoming>,
    state: Arc<Admin<R, L>>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            state
                .ready_gauge
                .set(i64::from(state.readiness.check().is_ok()));
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
            state.readiness.probe().await;
            match state.readiness.check() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Ready until a probe fails.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        probes: AtomicUsize,
    }

    impl Readiness for Arc<Flaky> {
        fn check(&self) -> Result<(), String> {
            if self.down.load(Ordering::Relaxed) {
                Err("backend unreachable".into())
            } else {
                Ok(())
            }
        }

        async fn probe(&self) {
            self.probes.fetch_add(1, Ordering::Relaxed);
        }
    }

    struct Refuses;

    impl Reload for Refuses {
        async fn reload(&self) -> Result<(), String> {
            Err("tls.cert: no such file".into())
        }
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.expect("read");
        out
    }

    /// The admin server serves whatever handles it is given: readiness
    /// (with its probe), reload, and the registry.
    #[tokio::test]
    async fn serves_its_handles() {
        let registry = Registry::new();
        let ready_gauge = IntGauge::new("pgtls_ready", "ready").expect("gauge");
        registry
            .register(Box::new(ready_gauge.clone()))
            .expect("register");
        let flaky = Arc::new(Flaky::default());
        let admin = Arc::new(Admin {
            registry,
            readiness: flaky.clone(),
            reloader: Refuses,
            ready_gauge,
            refused: IntCounter::new("refused", "refused").expect("counter"),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, admin, stop.clone()));

        assert!(request(addr, "GET", "/ready")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(request(addr, "GET", "/metrics")
            .await
            .contains("pgtls_ready 1"));
        flaky.down.store(true, Ordering::Relaxed);
        let ready = request(addr, "GET", "/ready").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("not ready: backend unreachable"), "{ready}");
        assert_eq!(flaky.probes.load(Ordering::Relaxed), 2, "probed per /ready");
        assert!(request(addr, "GET", "/metrics")
            .await
            .contains("pgtls_ready 0"));
        let reload = request(addr, "POST", "/reload").await;
        assert!(reload.starts_with("HTTP/1.1 422"), "{reload}");
        assert!(
            reload.contains("old configuration kept: tls.cert"),
            "{reload}"
        );
        assert!(request(addr, "GET", "/reload")
            .await
            .starts_with("HTTP/1.1 405"));
        assert!(request(addr, "GET", "/nope")
            .await
            .starts_with("HTTP/1.1 404"));
        stop.cancel();
    }
}
