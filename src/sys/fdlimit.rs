//! File descriptors: the resource every session spends twice (its client
//! socket and its backend link) and the one whose exhaustion used to be
//! blamed on the backend.
//!
//! At start the soft `RLIMIT_NOFILE` is raised towards the hard limit.
//! What it allows, less a fixed reserve, becomes the [`FdBudget`]: a client
//! socket takes one descriptor from it at accept, a backend link one more.
//! Nothing else draws on the budget, so the reserve always holds
//! descriptors for the admin listener (`/metrics`, `/ready`), reloads
//! (certificate files), cancel forwarding and the runtime itself, even
//! while clients are refused. A descriptor the kernel still refuses
//! (EMFILE/ENFILE from another cause) is reported as the proxy's own
//! resource error, never as a backend failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept out of the client budget: the admin listener and its
/// connections (`admin::MAX_CONNECTIONS`), the listeners, epoll, the
/// files a reload reads, DNS lookups and cancel forwarding.
pub const RESERVED: u64 = 128;

/// Descriptors each session thread's runtime keeps open (its epoll
/// instance and the eventfd that wakes it), also kept out of the budget.
pub const PER_SESSION_THREAD: u64 = 2;

/// Never ask the kernel for more than this, whatever the hard limit says
/// (some systems report `RLIM_INFINITY`).
const CEILING: u64 = 1 << 20;

/// What the process may open, after raising.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit in force.
    pub soft: u64,
    pub hard: u64,
    /// The soft limit before it was raised, when it was.
    pub raised_from: Option<u64>,
    /// Kept out of the client budget: [`RESERVED`], plus the session
    /// threads' own ([`FdLimit::with_session_threads`]).
    pub reserved: u64,
}

impl FdLimit {
    /// Raises the soft limit to the hard one (at most 2^20). Errors leave
    /// the limit as it was: the budget then reflects what is really there.
    pub fn raise() -> FdLimit {
        let Ok((soft, hard)) = rlimit::Resource::NOFILE.get() else {
            // No way to know; assume a generous limit and let EMFILE
            // handling do the rest.
            return FdLimit {
                soft: CEILING,
                hard: CEILING,
                raised_from: None,
                reserved: RESERVED,
            };
        };
        let target = hard.min(CEILING);
        if soft >= target || rlimit::Resource::NOFILE.set(target, hard).is_err() {
            return FdLimit {
                soft,
                hard,
                raised_from: None,
                reserved: RESERVED,
            };
        }
        FdLimit {
            soft: target,
            hard,
            raised_from: Some(soft),
            reserved: RESERVED,
        }
    }

    /// Also keeps back what `threads` session threads hold themselves.
    pub fn with_session_threads(mut self, threads: usize) -> FdLimit {
        self.reserved = RESERVED + PER_SESSION_THREAD * threads as u64;
        self
    }

    /// Descriptors left for client sockets and backend links.
    pub fn budget(&self) -> usize {
        usize::try_from(self.soft.saturating_sub(self.reserved)).unwrap_or(usize::MAX)
    }

    /// Sessions that fit: two descriptors each.
    pub fn sessions(&self) -> usize {
        self.budget() / 2
    }

    /// Descriptors `max_connections` sessions need, reserve included.
    pub fn needed(&self, max_connections: usize) -> u64 {
        (max_connections as u64).saturating_mul(2) + self.reserved
    }

    /// `None` when `max_connections` fits (0 means unlimited, which never
    /// fits), else a sentence saying how many sessions do.
    pub fn shortfall(&self, max_connections: usize) -> Option<String> {
        if max_connections != 0 && self.needed(max_connections) <= self.soft {
            return None;
        }
        let wanted = match max_connections {
            0 => "limits.max_connections = 0 (no limit)".to_string(),
            n => format!(
                "limits.max_connections = {n} needs {} file descriptors",
                self.needed(n)
            ),
        };
        Some(format!(
            "{wanted}, but RLIMIT_NOFILE is {} (hard limit {}): admitting at most {} sessions; \
             raise the limit (systemd LimitNOFILE=, ulimit -n) or lower limits.max_connections",
            self.soft,
            self.hard,
            self.admitted(max_connections)
        ))
    }

    /// Sessions admitted at once: `max_connections` when it fits, else
    /// nine tenths of the budget's sessions, so that the last tenth lets
    /// clients over the limit negotiate and be told 53300 instead of
    /// being cut off at accept.
    pub fn admitted(&self, max_connections: usize) -> usize {
        if max_connections != 0 && self.needed(max_connections) <= self.soft {
            return max_connections;
        }
        (self.budget() * 9 / 20).max(1)
    }
}

/// Descriptors client traffic may hold. Cloning shares the budget.
#[derive(Clone)]
pub struct FdBudget {
    slots: Arc<Semaphore>,
}

/// One descriptor's worth of budget, returned when dropped (with the
/// socket it paid for).
pub struct FdPermit {
    _permit: OwnedSemaphorePermit,
}

impl FdBudget {
    pub fn new(descriptors: usize) -> FdBudget {
        FdBudget {
            slots: Arc::new(Semaphore::new(descriptors.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// A descriptor, if the budget has one.
    pub fn try_take(&self) -> Option<FdPermit> {
        self.slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| FdPermit { _permit: p })
    }

    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// Lets a repeated warning through at most once per [`Throttle::EVERY`],
/// counting what it held back. Shared by all tasks: two atomics, no lock.
#[derive(Default)]
pub struct Throttle {
    /// Milliseconds since `origin` of the last line let through, plus one
    /// (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

impl Throttle {
    pub const EVERY: Duration = Duration::from_secs(10);

    /// `Some(n)` when a line is due now, `n` being how many were held back
    /// since the last one.
    pub fn due(&self) -> Option<u64> {
        let origin = *self.origin.get_or_init(Instant::now);
        let now = origin.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let every = Self::EVERY.as_millis() as u64;
        if last != 0 && now < last + every
            || self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// EMFILE (per process) or ENFILE (system-wide): out of descriptors.
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_and_shortfall() {
        let limit = FdLimit {
            soft: 1024,
            hard: 1024,
            raised_from: None,
            reserved: RESERVED,
        };
        assert_eq!(limit.budget(), 1024 - RESERVED as usize);
        assert_eq!(limit.sessions(), 448);
        assert!(limit.shortfall(400).is_none());
        let text = limit.shortfall(10_000).expect("does not fit");
        assert!(text.contains("needs 20128"), "{text}");
        assert!(text.contains("admitting at most 403 sessions"), "{text}");
        assert_eq!(limit.admitted(400), 400);
        assert!(limit.shortfall(0).is_some());
    }

    #[test]
    fn budget_permits_return() {
        let b = FdBudget::new(2);
        let one = b.try_take().expect("one");
        let _two = b.try_take().expect("two");
        assert!(b.try_take().is_none());
        drop(one);
        assert!(b.try_take().is_some());
    }

    #[test]
    fn throttle_lets_one_line_through() {
        let t = Throttle::default();
        assert_eq!(t.due(), Some(0));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        // The last line was let through EVERY ago: the next is due, with
        // the count of what was held back.
        let later = Throttle {
            last: AtomicU64::new(1),
            suppressed: AtomicU64::new(2),
            origin: std::sync::OnceLock::from(Instant::now() - Throttle::EVERY),
        };
        assert_eq!(later.due(), Some(2));
        assert_eq!(later.due(), None);
    }

    #[test]
    fn exhaustion_errors() {
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(24)));
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(23)));
        assert!(!is_exhaustion(&std::io::Error::from_raw_os_error(111)));
    }
}
