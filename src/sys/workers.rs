//! The threads that run sessions: one single-threaded tokio runtime per
//! worker, each with its own event loop and timers. A session is handed to
//! a worker once, at accept, and never leaves it.
//!
//! Why not tokio's multi-thread runtime: a relayed session wakes on every
//! message, and the work-stealing scheduler pays for that wake with
//! cross-thread hand-offs (futex), its own bookkeeping on each wake from
//! park (an EWMA with `powf` and two clock reads: tokio's
//! `multi_thread/stats.rs`) and cache misses when a task moves core. A
//! session on one thread costs 2–3 µs less CPU per relayed transaction
//! (benches/results/history.md, 2026-11-30). The price is balance: a
//! worker cannot steal another's sessions, so each new session goes to the
//! worker with the fewest live sessions.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// Work sent to a worker: built on the worker's thread, inside its runtime,
/// so the sockets it opens or adopts register with that worker's reactor.
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Sessions handed to this worker that have not ended.
    live: Arc<AtomicUsize>,
}

/// Session threads. Dropping every clone of it stops the workers once
/// their queues are empty; sessions still running on them are dropped
/// (closed), so keep it until the sessions have drained.
#[derive(Clone)]
pub struct Workers {
    workers: Arc<[Worker]>,
}

/// The thread count `listen.workers` asks for: 0 means one per CPU the
/// process may run on (affinity and cgroup quota count).
pub fn resolve(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// [`resolve`]`(configured)` threads, each named `pgtls-worker-N`.
pub fn start(configured: usize) -> std::io::Result<Workers> {
    let count = resolve(configured);
    let mut workers = Vec::with_capacity(count);
    for i in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new()
            .name(format!("pgtls-worker-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        tokio::spawn(job());
                    }
                });
            })?;
        workers.push(Worker {
            jobs,
            live: Arc::new(AtomicUsize::new(0)),
        });
    }
    Ok(Workers {
        workers: workers.into(),
    })
}

impl Workers {
    /// How many session threads there are.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Runs the future `make` builds on the least busy worker; it counts
    /// as a live session there until it ends. False when no worker is left
    /// (only while the process is going down): `make` is then dropped.
    pub fn spawn<F, Fut>(&self, make: F) -> bool
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self
            .workers
            .iter()
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
        else {
            return false;
        };
        worker.live.fetch_add(1, Ordering::Relaxed);
        let live = Live(worker.live.clone());
        let job: Job = Box::new(move || {
            Box::pin(async move {
                let _live = live;
                make().await;
            })
        });
        worker.jobs.send(job).is_ok()
    }

    /// Live sessions per worker, in worker order.
    #[cfg(test)]
    fn live(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect()
    }
}

/// Counts a session on its worker until dropped.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_sessions_and_runs_them_on_worker_threads() {
        let workers = start(2).expect("workers");
        assert_eq!(workers.count(), 2);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (hold_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        for _ in 0..4 {
            let done = done_tx.clone();
            let mut hold = hold_tx.subscribe();
            let spawned = workers.spawn(move || async move {
                let name = std::thread::current().name().map(str::to_owned);
                let _ = done.send(name);
                let _ = hold.recv().await;
            });
            assert!(spawned);
        }
        let mut names: Vec<String> = (0..4)
            .map(|_| done_rx.recv().expect("ran").expect("named"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["pgtls-worker-0", "pgtls-worker-0", "pgtls-worker-1", "pgtls-worker-1"],
            "the least busy worker takes each session"
        );
        assert_eq!(workers.live(), [2, 2]);
        drop(hold_tx);
        for _ in 0..200 {
            if workers.live() == [0, 0] {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("sessions still counted: {:?}", workers.live());
    }
}
