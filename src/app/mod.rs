//! Composition root: turns a validated [`Config`] into shared state, binds
//! the listeners and returns a [`Handle`] that tests use exactly as `main`
//! does (bound addresses, reload, graceful shutdown).
//!
//! Everything that can fail because of a file or a key fails in
//! [`prepare`], before any port is bound. Reloadable state lives in one
//! [`Runtime`] behind an `ArcSwap`: a reload builds and validates a whole
//! new one and swaps it atomically; each connection reads the current one
//! once, at accept, and keeps it for its lifetime.

mod accept;
pub mod admin;
mod fleet;
pub mod logging;
mod readiness;
pub mod reload;
pub mod signals;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::Registry;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::app::admin::Admin;
pub use crate::app::reload::{LogReloader, ReloadSource};
use crate::backend::health::BackendHealth;
use crate::config::{Config, ConfigError};
pub use crate::conn::context::Context;
use crate::metrics::Metrics;
use crate::policy::cancel::CancelRegistry;
use crate::runtime::Runtime;
use crate::sys::fdlimit::{self, FdBudget, FdLimit};
/// Descriptors kept back from client traffic (admin, reloads, cancels).
pub use crate::sys::fdlimit::{PER_SESSION_THREAD, RESERVED as RESERVED_DESCRIPTORS};
use crate::sys::listener::{bind, effective_backlog};
use crate::sys::workers::{self, Workers};
use readiness::{ProxyReadiness, ReadyState};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Build(#[from] crate::runtime::BuildError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Bind(#[from] crate::sys::listener::BindError),
    /// The session threads could not be started.
    #[error("listen.workers: cannot start the session threads: {0}")]
    Workers(std::io::Error),
    /// RLIMIT_NOFILE leaves no descriptor pair for a single session.
    #[error(
        "file descriptors: RLIMIT_NOFILE is {soft} (hard limit {hard}) and {reserved} are kept \
         for the proxy itself: no room for a single session (2 descriptors each); raise it \
         (systemd LimitNOFILE=, ulimit -n)"
    )]
    NoDescriptors { soft: u64, hard: u64, reserved: u64 },
    /// `[fleet]`: the replica id cannot be had or is taken, or a key is unfit.
    #[error("{key}: {reason}")]
    Fleet { key: &'static str, reason: String },
}

impl StartError {
    /// Exit status: 64 (EX_USAGE) for configuration, 69 (EX_UNAVAILABLE)
    /// when an address cannot be bound.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Bind(_) | StartError::NoDescriptors { .. } => 69,
            _ => 64,
        }
    }
}

/// Validated, loaded state that has not touched the network yet.
pub struct Prepared {
    pub config: Config,
    pub shared: Arc<Context>,
    /// RLIMIT_NOFILE after raising it.
    pub fd_limit: FdLimit,
    /// Sessions admitted at once: `limits.max_connections`, lowered when
    /// the descriptor limit cannot hold that many.
    pub max_sessions: usize,
}

impl Prepared {
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.runtime.load_full()
    }
}

/// Loads every file the config names and checks it; binds nothing.
pub fn prepare(config: Config, registry: &Registry) -> Result<Prepared, StartError> {
    let runtime = Runtime::build(&config)?;
    let metrics = Metrics::new(registry)?;
    metrics.set_certificates(&runtime.certificates);
    let fd_limit = FdLimit::raise().with_session_threads(workers::resolve(config.listen.workers));
    metrics.fd_limit.set(fd_limit.soft as i64);
    if fd_limit.sessions() == 0 {
        return Err(StartError::NoDescriptors {
            soft: fd_limit.soft,
            hard: fd_limit.hard,
            reserved: fd_limit.reserved,
        });
    }
    let max_sessions = fd_limit.admitted(config.limits.max_connections);
    let (fleet, scheme) = fleet::identity(config.fleet.as_ref(), &metrics)?;
    let shared = Arc::new(Context {
        runtime: ArcSwap::from_pointee(runtime),
        metrics,
        backend_health: BackendHealth::default(),
        cancels: CancelRegistry::with_scheme(scheme),
        fleet,
        handshake_slots: Semaphore::new(config.limits.max_handshakes_in_flight),
        terminate: crate::sys::stop::Stop::new(),
        fds: FdBudget::new(fd_limit.budget()),
        fd_warning: fdlimit::Throttle::default(),
        connections_peak: Default::default(),
    });
    Ok(Prepared {
        config,
        shared,
        fd_limit,
        max_sessions,
    })
}

/// A running proxy.
pub struct Handle {
    local_addr: SocketAddr,
    fleet_addr: Option<SocketAddr>,
    /// Stops the peer listener and the directory refresh: last, once no
    /// session of this replica is left to cancel.
    fleet_stop: CancellationToken,
    stop_accepting: CancellationToken,
    tracker: TaskTracker,
    accept_task: JoinHandle<()>,
    /// Held until the sessions have drained: dropping the last clone stops
    /// the session threads.
    workers: Workers,
    grace_period: Duration,
    shared: Arc<Context>,
    readiness: Arc<ReadyState>,
    admin_addr: Option<SocketAddr>,
    admin_stop: CancellationToken,
    reloader: Arc<crate::app::reload::Reloader>,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub sessions_at_start: usize,
    /// CancelRequests delivered to the backends of the sessions left at
    /// the end of the grace period: one per session, whether or not its
    /// backend was running a query (an idle backend ignores it).
    pub cancel_requests: usize,
    pub terminated: usize,
}

/// Prepares and binds; sessions run on session threads of their own
/// (`listen.workers`), the listeners on the current tokio runtime.
pub async fn start(config: Config, registry: &Registry) -> Result<Handle, StartError> {
    let prepared = prepare(config, registry)?;
    serve(prepared, registry, ReloadSource::default()).await
}

/// Binds the prepared state's listen (and admin) address and starts
/// accepting. `registry` is the one `prepare` registered metrics on.
pub async fn serve(
    prepared: Prepared,
    registry: &Registry,
    source: ReloadSource,
) -> Result<Handle, StartError> {
    let config = &prepared.config;
    let shared = prepared.shared.clone();
    if let Some(why) = prepared.fd_limit.shortfall(config.limits.max_connections) {
        warn!("file descriptors: {why}");
    } else if let Some(from) = prepared.fd_limit.raised_from {
        info!(from, to = prepared.fd_limit.soft, "raised RLIMIT_NOFILE");
    }
    // Before anything is bound: a failure here leaves no port taken.
    let per_thread = shared.metrics.thread_sessions.clone();
    let workers = workers::start(config.listen.workers, |i| {
        per_thread.with_label_values(&[&i.to_string()])
    })
    .map_err(StartError::Workers)?;
    info!(workers = workers.count(), "session threads");
    let reloader = Arc::new(crate::app::reload::Reloader::new(
        shared.clone(),
        config.clone(),
        source,
    ));
    let readiness = Arc::new(ReadyState::new(config.admin.unready_after_backend_failures));
    let fleet_stop = CancellationToken::new();
    // Until the start succeeds, leaving stops the peer listener: a replica
    // that failed to start must not answer for its id.
    let fleet_guard = fleet_stop.clone().drop_guard();
    let fleet_addr = match (&shared.fleet, &config.fleet) {
        (Some(fleet), Some(c)) => Some(fleet::join(fleet, c, &shared, &fleet_stop).await?),
        _ => None,
    };
    let admin_stop = CancellationToken::new();
    let admin_addr = if config.admin.enabled {
        let (listener, addr) = bind(
            "admin.address",
            &config.admin.address,
            crate::app::admin::BACKLOG,
        )
        .await?;
        let state = Arc::new(Admin {
            registry: registry.clone(),
            readiness: ProxyReadiness {
                state: readiness.clone(),
                ctx: shared.clone(),
            },
            reloader: reloader.clone(),
            ready_gauge: shared.metrics.ready.clone(),
            refused: shared.metrics.admin_connections_refused.clone(),
        });
        tokio::spawn(crate::app::admin::serve(
            listener,
            state,
            admin_stop.clone(),
        ));
        info!(%addr, "admin listening");
        Some(addr)
    } else {
        None
    };
    let (listener, local_addr) = bind(
        "listen.address",
        &config.listen.address,
        config.listen.backlog,
    )
    .await?;
    info!(
        backlog = config.listen.backlog,
        effective = effective_backlog(config.listen.backlog),
        "listen backlog"
    );
    let limit = match prepared.max_sessions {
        0 => Semaphore::MAX_PERMITS,
        n => n.min(Semaphore::MAX_PERMITS),
    };
    let slots = Arc::new(Semaphore::new(limit));
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let accept_task = tokio::spawn(accept::accept_loop(
        listener,
        effective_backlog(config.listen.backlog),
        shared.clone(),
        slots,
        accept::Sessions {
            workers: workers.clone(),
            tracker: tracker.clone(),
        },
        stop_accepting.clone(),
    ));
    tokio::spawn(crate::sys::memtrim::run(
        shared.metrics.connections_active.clone(),
        shared.connections_peak.clone(),
        stop_accepting.clone(),
    ));
    if let Some(every) = config.reload.poll_interval {
        tokio::spawn(reloader.clone().poll(every, stop_accepting.clone()));
    }
    readiness
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    shared.metrics.ready.set(1);
    let fleet_stop = fleet_guard.disarm();
    // Logged once ready: whoever waits for this line may connect and probe.
    info!(%local_addr, "listening");
    Ok(Handle {
        local_addr,
        fleet_addr,
        fleet_stop,
        stop_accepting,
        tracker,
        accept_task,
        workers,
        grace_period: config.shutdown.grace_period,
        shared,
        readiness,
        admin_addr,
        admin_stop,
        reloader,
    })
}

impl Handle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The fleet's peer listener address (`[fleet]`).
    pub fn fleet_addr(&self) -> Option<SocketAddr> {
        self.fleet_addr
    }

    /// The admin listener's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Sessions still running.
    pub fn active_sessions(&self) -> usize {
        self.tracker.len()
    }

    /// Reloads from the configured source (SIGHUP does the same).
    pub async fn reload(&self) -> Result<(), String> {
        self.reloader.reload().await
    }

    /// SIGTERM: /ready turns 503 and accepting stops (what the listen
    /// backlog already holds is still taken and served); sessions get up to
    /// the grace period to end on their own; then each running backend
    /// query is cancelled and each client gets FATAL 57P01 at a message
    /// boundary before its connection closes.
    pub async fn shutdown(self) -> DrainReport {
        self.readiness
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.metrics.ready.set(0);
        self.stop_accepting.cancel();
        let _ = self.accept_task.await;
        self.tracker.close();
        let sessions_at_start = self.tracker.len();
        info!(sessions = sessions_at_start, grace_period = ?self.grace_period, "draining: stopped accepting");
        let mut report = DrainReport {
            sessions_at_start,
            cancel_requests: 0,
            terminated: 0,
        };
        if tokio::time::timeout(self.grace_period, self.tracker.wait())
            .await
            .is_err()
        {
            report.terminated = self.tracker.len();
            report.cancel_requests =
                crate::backend::cancel::cancel_all(self.shared.cancels.targets()).await;
            warn!(
                sessions = report.terminated,
                cancel_requests = report.cancel_requests,
                "grace period over: sent each session's backend a cancel request (running queries stop), terminating sessions with 57P01"
            );
            self.shared.terminate.fire();
            if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
                .await
                .is_err()
            {
                error!(
                    sessions = self.tracker.len(),
                    "sessions did not stop in 5 s: closing them"
                );
                self.workers.close_all();
                self.tracker.wait().await;
            }
        }
        info!(
            sessions_at_start = report.sessions_at_start,
            terminated = report.terminated,
            "shutdown complete"
        );
        self.admin_stop.cancel();
        self.fleet_stop.cancel();
        // No session left: the session threads may go.
        drop(self.workers);
        report
    }

    /// SIGINT: closes everything at once.
    pub async fn abort(self) {
        self.readiness
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.admin_stop.cancel();
        self.fleet_stop.cancel();
        self.stop_accepting.cancel();
        // The accept loop first (it hands its listen backlog to the session
        // threads as it stops), then every session, those included.
        let _ = self.accept_task.await;
        self.workers.close_all();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
