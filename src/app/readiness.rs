//! Readiness of this replica, as `/ready` reports it: bound and serving,
//! not draining, not a later duplicate of another replica's fleet id, and
//! the backend reachable (not the last
//! `admin.unready_after_backend_failures` connects failed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::admin;
use crate::conn::Context;

/// The drain flags, set by [`super::Handle`].
pub struct ReadyState {
    pub serving: AtomicBool,
    pub draining: AtomicBool,
    pub unready_after_backend_failures: u32,
}

impl ReadyState {
    pub fn new(unready_after_backend_failures: u32) -> ReadyState {
        ReadyState {
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            unready_after_backend_failures,
        }
    }
}

/// The flags plus what connections learned about the backend.
pub struct ProxyReadiness {
    pub state: Arc<ReadyState>,
    pub ctx: Arc<Context>,
}

impl ProxyReadiness {
    /// Whether readiness is down because of backend failures.
    fn backend_down(&self) -> bool {
        let n = self.state.unready_after_backend_failures;
        n > 0 && self.ctx.backend_health.consecutive_failures() >= n
    }
}

impl admin::Readiness for ProxyReadiness {
    fn check(&self) -> Result<(), String> {
        if self.state.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        if !self.state.serving.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        if let Some(why) = self.ctx.fleet.as_ref().and_then(|f| f.conflict()) {
            return Err(why);
        }
        if self.backend_down() {
            return Err(format!(
                "backend unreachable: the last {} connect attempts failed",
                self.ctx.backend_health.consecutive_failures()
            ));
        }
        Ok(())
    }

    /// While the backend counts as down, each readiness probe tries it
    /// once: without client traffic (which a load balancer stops sending
    /// to an unready replica) nothing else would notice its recovery.
    async fn probe(&self) {
        if self.backend_down() {
            let connector = self.ctx.runtime.load().default.connector.clone();
            let ok = connector.probe().await.is_ok();
            self.ctx.backend_health.record(ok);
        }
    }
}
