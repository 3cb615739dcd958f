//! Composition root: turns a validated [`Config`] into shared state, binds
//! the listener and returns a [`Handle`] that tests use exactly as `main`
//! does (bound address, graceful shutdown).
//!
//! Everything that can fail because of a file or a key fails in
//! [`prepare`], before any port is bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{AdminState, BackendHealth, Readiness};
use crate::backend::login::Secret;
use crate::backend::Connector;
use crate::config::{ClientAuthMode, Config, ConfigError};
use crate::metrics::Metrics;
use crate::rolemap::{RoleMap, RuleError};
use crate::tls::client_auth::CrlSummary;
use crate::tls::pem::{CertSummary, FileError};
use crate::{session, tls};

/// State every session reads; built once at start-up.
pub struct Shared {
    pub tls: Option<Arc<ServerConfig>>,
    pub client_auth: ClientAuthMode,
    pub rolemap: RoleMap,
    pub credentials: HashMap<String, Secret>,
    pub allow_plaintext: bool,
    pub connector: Connector,
    pub handshake_timeout: Duration,
    pub metrics: Metrics,
    pub backend_health: BackendHealth,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Rules(#[from] RuleError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {address} (listen.address): {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
}

impl StartError {
    /// Exit status: 64 (EX_USAGE) for configuration, 69 (EX_UNAVAILABLE)
    /// when the address cannot be bound.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Bind { .. } => 69,
            _ => 64,
        }
    }
}

/// Validated, loaded state that has not touched the network yet.
pub struct Prepared {
    pub config: Config,
    pub shared: Arc<Shared>,
    pub server_cert: Option<CertSummary>,
    pub server_chain_len: usize,
    pub client_cas: Vec<CertSummary>,
    pub client_crls: Vec<CrlSummary>,
}

/// Loads every file the config names and checks it; binds nothing.
pub fn prepare(config: Config, registry: &Registry) -> Result<Prepared, StartError> {
    let server = tls::server::build(&config.tls, &config.client_auth)?;
    let connector = Connector::new(&config.backend)?;
    let rolemap = RoleMap::compile(&config.rules)?;
    let credentials = load_credentials(&config)?;
    let metrics = Metrics::new(registry)?;
    let (tls, server_cert, server_chain_len, client_setup, server_chain) = match server {
        Some(s) => (
            Some(s.config),
            Some(s.leaf),
            s.chain_len,
            s.client_auth,
            s.chain,
        ),
        None => (None, None, 0, None, Vec::new()),
    };
    let (client_cas, client_crls) = client_setup.map(|c| (c.cas, c.crls)).unwrap_or_default();
    metrics.set_certificates(&certificate_expiries(
        &config,
        &server_chain,
        &client_cas,
        &client_crls,
    )?);
    let shared = Arc::new(Shared {
        tls,
        client_auth: config.client_auth.effective_mode(),
        rolemap,
        credentials,
        allow_plaintext: config.tls.allow_plaintext,
        connector,
        handshake_timeout: config.limits.handshake_timeout,
        metrics,
        backend_health: BackendHealth::default(),
    });
    Ok(Prepared {
        config,
        shared,
        server_cert,
        server_chain_len,
        client_cas,
        client_crls,
    })
}

/// (role, subject, not-after) for every certificate and CRL the config names.
fn certificate_expiries(
    config: &Config,
    server_chain: &[CertSummary],
    client_cas: &[CertSummary],
    client_crls: &[CrlSummary],
) -> Result<Vec<(&'static str, String, i64)>, StartError> {
    let mut out = Vec::new();
    out.extend(
        server_chain
            .iter()
            .map(|c| ("server", c.subject.clone(), c.not_after)),
    );
    out.extend(
        client_cas
            .iter()
            .map(|c| ("client_ca", c.subject.clone(), c.not_after)),
    );
    out.extend(
        client_crls
            .iter()
            .filter_map(|c| Some(("crl", c.issuer.clone(), c.next_update?))),
    );
    if let Some(path) = &config.backend.sslcert {
        for cert in crate::tls::pem::certs("backend.sslcert", path)? {
            let c = CertSummary::parse(&cert)
                .map_err(|r| FileError::new("backend.sslcert", path, r))?;
            out.push(("backend_client", c.subject, c.not_after));
        }
    }
    Ok(out)
}

/// Reads `[backend.credentials]` secrets from their files or variables.
fn load_credentials(config: &Config) -> Result<HashMap<String, Secret>, StartError> {
    let mut out = HashMap::new();
    for (role, c) in &config.backend.credentials {
        let value = match (&c.password_file, &c.password_env) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| {
                    FileError::new(
                        "backend.credentials",
                        path,
                        format!("{role}: cannot read: {e}"),
                    )
                })?,
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                StartError::Config(ConfigError::Invalid {
                    key: "backend.credentials",
                    reason: format!("{role}: environment variable {var} is not set"),
                    origin: None,
                })
            })?,
            (None, None) => continue,
        };
        out.insert(role.clone(), Secret::new(value));
    }
    Ok(out)
}

/// A running proxy.
pub struct Handle {
    local_addr: SocketAddr,
    stop_accepting: CancellationToken,
    force_close: CancellationToken,
    tracker: TaskTracker,
    accept_task: JoinHandle<()>,
    grace_period: Duration,
    shared: Arc<Shared>,
    readiness: Arc<Readiness>,
    admin_addr: Option<SocketAddr>,
    admin_stop: CancellationToken,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub sessions_at_start: usize,
    pub forced_closed: usize,
}

/// Prepares and binds; sessions run on the current tokio runtime.
pub async fn start(config: Config, registry: &Registry) -> Result<Handle, StartError> {
    let prepared = prepare(config, registry)?;
    serve(prepared, registry).await
}

/// Binds the prepared state's listen (and admin) address and starts
/// accepting. `registry` is the one `prepare` registered metrics on.
pub async fn serve(prepared: Prepared, registry: &Registry) -> Result<Handle, StartError> {
    let readiness = Arc::new(Readiness::new(
        prepared.config.admin.unready_after_backend_failures,
    ));
    let admin_stop = CancellationToken::new();
    let admin_addr = if prepared.config.admin.enabled {
        let address = prepared.config.admin.address.clone();
        let listener = TcpListener::bind(&address)
            .await
            .map_err(|source| StartError::Bind {
                address: address.clone(),
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { address, source })?;
        let state = Arc::new(AdminState {
            registry: registry.clone(),
            readiness: readiness.clone(),
            health: prepared.shared.clone(),
        });
        tokio::spawn(crate::admin::serve(listener, state, admin_stop.clone()));
        info!(%addr, "admin listening");
        Some(addr)
    } else {
        None
    };
    let address = prepared.config.listen.address.clone();
    let listener = TcpListener::bind(&address)
        .await
        .map_err(|source| StartError::Bind { address, source })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        address: prepared.config.listen.address.clone(),
        source,
    })?;
    let limit = match prepared.config.limits.max_connections {
        0 => Semaphore::MAX_PERMITS,
        n => n,
    };
    let slots = Arc::new(Semaphore::new(limit));
    let stop_accepting = CancellationToken::new();
    let force_close = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shared = prepared.shared.clone();
    let accept_task = tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        slots,
        stop_accepting.clone(),
        force_close.clone(),
        tracker.clone(),
    ));
    info!(%local_addr, "listening");
    readiness
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    shared.metrics.ready.set(1);
    Ok(Handle {
        local_addr,
        stop_accepting,
        force_close,
        tracker,
        accept_task,
        grace_period: prepared.config.shutdown.grace_period,
        shared,
        readiness,
        admin_addr,
        admin_stop,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit the client still negotiates, so it can be told
        // "too many connections" in a proper ErrorResponse.
        let permit = slots.clone().try_acquire_owned().ok();
        let shared = shared.clone();
        let force = force.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = session::run(tcp, peer, shared, permit) => {}
                _ = force.cancelled() => {}
            }
        });
    }
}

impl Handle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The admin listener's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Sessions still running.
    pub fn active_sessions(&self) -> usize {
        self.tracker.len()
    }

    /// Stops accepting, waits up to the grace period for sessions to end
    /// on their own, then closes the rest.
    pub async fn shutdown(self) -> DrainReport {
        self.readiness
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.metrics.ready.set(0);
        self.stop_accepting.cancel();
        let _ = self.accept_task.await;
        self.tracker.close();
        let sessions_at_start = self.tracker.len();
        info!(sessions = sessions_at_start, grace_period = ?self.grace_period, "draining");
        let forced_closed = match tokio::time::timeout(self.grace_period, self.tracker.wait()).await
        {
            Ok(()) => 0,
            Err(_) => {
                let left = self.tracker.len();
                warn!(
                    sessions = left,
                    "grace period over: closing remaining sessions"
                );
                self.force_close.cancel();
                self.tracker.wait().await;
                left
            }
        };
        info!(sessions_at_start, forced_closed, "shutdown complete");
        self.admin_stop.cancel();
        DrainReport {
            sessions_at_start,
            forced_closed,
        }
    }

    /// Closes everything at once (SIGINT).
    pub async fn abort(self) {
        self.readiness
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.admin_stop.cancel();
        self.stop_accepting.cancel();
        self.force_close.cancel();
        let _ = self.accept_task.await;
        self.tracker.close();
        self.tracker.wait().await;
    }
}
