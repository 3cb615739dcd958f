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
    let (tls, server_cert, server_chain_len, client_setup) = match server {
        Some(s) => (Some(s.config), Some(s.leaf), s.chain_len, s.client_auth),
        None => (None, None, 0, None),
    };
    let (client_cas, client_crls) = client_setup.map(|c| (c.cas, c.crls)).unwrap_or_default();
    let shared = Arc::new(Shared {
        tls,
        client_auth: config.client_auth.effective_mode(),
        rolemap,
        credentials,
        allow_plaintext: config.tls.allow_plaintext,
        connector,
        handshake_timeout: config.limits.handshake_timeout,
        metrics,
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
    serve(prepared).await
}

/// Binds the prepared state's listen address and starts accepting.
pub async fn serve(prepared: Prepared) -> Result<Handle, StartError> {
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
    Ok(Handle {
        local_addr,
        stop_accepting,
        force_close,
        tracker,
        accept_task,
        grace_period: prepared.config.shutdown.grace_period,
        shared,
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

    /// Sessions still running.
    pub fn active_sessions(&self) -> usize {
        self.tracker.len()
    }

    /// Stops accepting, waits up to the grace period for sessions to end
    /// on their own, then closes the rest.
    pub async fn shutdown(self) -> DrainReport {
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
        DrainReport {
            sessions_at_start,
            forced_closed,
        }
    }

    /// Closes everything at once (SIGINT).
    pub async fn abort(self) {
        self.stop_accepting.cancel();
        self.force_close.cancel();
        let _ = self.accept_task.await;
        self.tracker.close();
        self.tracker.wait().await;
    }
}
