//! Whether the backend has been reachable lately: consecutive failures to
//! reach it, which `/ready` turns into 503 (see `admin.unready_after_backend_failures`).

use std::sync::atomic::{AtomicU32, Ordering};

/// Consecutive backend connect failures, for readiness.
#[derive(Default)]
pub struct BackendHealth {
    consecutive_failures: AtomicU32,
}

impl BackendHealth {
    pub fn record(&self, ok: bool) {
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        } else {
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }
}
