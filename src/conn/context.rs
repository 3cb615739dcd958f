//! What every connection shares with the rest of the process: the
//! reloadable runtime, metrics, backend health, the cancel registry and the
//! limits (handshake admission, descriptor budget). Built by [`crate::app`]
//! and handed down; nothing here reaches back up.

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tracing::warn;

use crate::backend::cancel::CancelTarget;
use crate::backend::health::BackendHealth;
use crate::metrics::Metrics;
use crate::policy::cancel::CancelRegistry;
use crate::runtime::Runtime;
use crate::sys::fdlimit::{self, FdBudget};

/// State every session reads.
pub struct Context {
    pub runtime: ArcSwap<Runtime>,
    pub metrics: Metrics,
    pub backend_health: BackendHealth,
    pub cancels: CancelRegistry<CancelTarget>,
    /// The other replicas, when this one is part of a fleet (`[fleet]`).
    pub fleet: Option<std::sync::Arc<crate::fleet::Fleet>>,
    /// Full TLS handshakes in progress (`limits.max_handshakes_in_flight`).
    pub handshake_slots: Semaphore,
    /// Fires when the grace period is over: sessions stop at a message
    /// boundary and tell their client FATAL 57P01.
    pub terminate: crate::sys::stop::Stop,
    /// File descriptors client traffic may use (see [`crate::sys::fdlimit`]).
    pub fds: FdBudget,
    /// Throttles the "out of file descriptors" log line.
    pub fd_warning: fdlimit::Throttle,
    /// Most connections open at once since memtrim last looked.
    pub connections_peak: crate::sys::memtrim::Watermark,
}

impl Context {
    /// Counts and (at most every few seconds) logs a connection the proxy
    /// could not afford a descriptor for.
    pub fn out_of_descriptors(&self, stage: &'static str) {
        self.metrics.fd_exhausted.with_label_values(&[stage]).inc();
        if let Some(suppressed) = self.fd_warning.due() {
            warn!(
                stage,
                suppressed,
                available = self.fds.available(),
                "out of file descriptors: refusing connections (see limits.max_connections and RLIMIT_NOFILE)"
            );
        }
    }
}
