//! Gives glibc's freed heap back to the kernel after many sessions closed.
//!
//! glibc's malloc returns freed memory to the system only from the top of
//! each heap; the buffers of thousands of closed sessions sit below a few
//! long-lived allocations and stay resident. Measured: 5,000 idle TLS
//! sessions raise RSS from 8 to 78 MiB, and it stays at 78 MiB after they
//! close (`MALLOC_ARENA_MAX` and `MALLOC_TRIM_THRESHOLD_` change nothing);
//! `malloc_trim(0)` takes it to 10 MiB. mimalloc and jemalloc (defaults)
//! kept more, so the allocator stays and this task trims
//! (benches/results/history.md has the figures).
//!
//! Every [`EVERY`], if the sessions open have fallen to half of the most
//! seen since the last trim, and by at least [`MIN_DROP`], the heap is
//! trimmed once, on a blocking thread: the walk locks each arena in turn,
//! and must not stall an async worker. Steady load never trims.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the session count is looked at.
pub const EVERY: Duration = Duration::from_secs(30);

/// Fewer closed sessions than this are not worth a trim (about 14 KiB each).
pub const MIN_DROP: i64 = 256;

/// The most connections open at once since the last look: raised at
/// every accept (one `fetch_max`, never per message), so that a burst
/// between two looks is seen. Clones share the mark.
#[derive(Debug, Clone, Default)]
pub struct Watermark(Arc<AtomicI64>);

impl Watermark {
    pub fn raise(&self, open: i64) {
        self.0.fetch_max(open, Ordering::Relaxed);
    }

    /// The mark since the last call; starts over from `open`.
    fn take(&self, open: i64) -> i64 {
        self.0.swap(open, Ordering::Relaxed)
    }
}

/// Decides when to trim; pure, for tests.
#[derive(Debug, Default)]
pub struct Trigger {
    peak: i64,
}

impl Trigger {
    /// Whether to trim now, given the peak since the last look and the
    /// connections open now.
    pub fn observe(&mut self, peak: i64, active: i64) -> bool {
        self.peak = self.peak.max(peak).max(active);
        if self.peak - active >= MIN_DROP && active * 2 <= self.peak {
            self.peak = active;
            return true;
        }
        false
    }
}

/// Runs until `stop`: watches `active` and trims when many sessions closed.
pub async fn run(active: IntGauge, mark: Watermark, stop: CancellationToken) {
    let mut trigger = Trigger::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let open = active.get();
        if trigger.observe(mark.take(open), open) {
            let started = std::time::Instant::now();
            let released = tokio::task::spawn_blocking(release).await.unwrap_or(false);
            debug!(
                released,
                took_us = started.elapsed().as_micros() as u64,
                "returned freed heap memory to the system"
            );
        }
    }
}

/// `malloc_trim(0)` where glibc has it; elsewhere nothing (musl and other
/// allocators give memory back by themselves or have no such call).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no caller-side
    // invariants; glibc serializes it with every other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_large_drop() {
        let mut t = Trigger::default();
        for n in [0, 1000, 5000, 4900] {
            assert!(!t.observe(n, n), "{n}");
        }
        assert!(t.observe(2000, 2000), "half of the peak and 3000 fewer");
        assert!(!t.observe(2000, 2000), "once");
        assert!(!t.observe(1500, 1500), "not yet half of 2000");
        assert!(t.observe(1500, 900), "half of 2000 and 1100 fewer");
    }

    #[test]
    fn small_pools_never_trim() {
        let mut t = Trigger::default();
        for n in [0, 200, 0, 200, 0] {
            assert!(!t.observe(n, n), "{n}");
        }
    }

    #[test]
    fn a_burst_between_looks_counts() {
        let mark = Watermark::default();
        let mut t = Trigger::default();
        assert!(!t.observe(mark.take(0), 0));
        for open in 1..=5000 {
            mark.raise(open);
        }
        assert!(
            t.observe(mark.take(0), 0),
            "5000 came and went between looks"
        );
        assert!(!t.observe(mark.take(0), 0));
    }
}
