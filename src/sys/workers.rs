//! The threads that run sessions: one single-threaded tokio runtime per
//! worker, each with its own event loop and timers. A session is handed to
//! a worker once, at accept, and never leaves it.
//!
//! Why not tokio's multi-thread runtime: a relayed session wakes on every
//! message, and the work-stealing scheduler pays for that wake with
//! cross-thread hand-offs (futex), its own bookkeeping on each wake from
//! park (an EWMA with `powf` and two clock reads: tokio's
//! `multi_thread/stats.rs`) and cache misses when a task moves core.
//! Measured (benches/results/history.md, 2026-11-30): 16.7 µs of CPU per
//! relayed transaction before, 14.6 with two session threads and 13.6
//! with one; on a busier host the two-thread gain vanished and the
//! one-thread gain stayed. The price is balance: a
//! worker cannot steal another's sessions, so each new session goes to the
//! worker with the fewest live sessions.

use std::future::Future;
use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::mpsc;

use crate::sys::stop::Stop;

/// Work sent to a worker: run on the worker's thread, inside its runtime,
/// where it spawns its session (so the session's sockets register with that
/// worker's reactor, and its future is built in its task, not boxed apart).
/// It gets the session's place on that worker, to hold until it ends.
type Job = Box<dyn FnOnce(Live) + Send>;

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Sessions handed to this worker that have not ended (also the
    /// `pgtls_session_thread_sessions` series of this thread).
    live: IntGauge,
}

/// Session threads. Dropping every clone of it stops the workers once
/// their queues are empty; sessions still running on them are dropped
/// (closed), so keep it until the sessions have drained, or call
/// [`Workers::close_all`].
#[derive(Clone)]
pub struct Workers {
    workers: Arc<[Worker]>,
    closing: Arc<Stop>,
}

/// The thread count `listen.workers` asks for: 0 means one per CPU the
/// process may run on (affinity and cgroup quota count).
pub fn resolve(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// [`resolve`]`(configured)` threads, each named `pgtls-worker-N`; `gauge`
/// gives each thread's count of live sessions (by its index).
pub fn start(configured: usize, gauge: impl Fn(usize) -> IntGauge) -> std::io::Result<Workers> {
    let count = resolve(configured);
    let closing = Arc::new(Stop::new());
    let mut workers = Vec::with_capacity(count);
    for i in 0..count {
        // I/O and timers only (signals are the main runtime's): two
        // descriptors each (epoll, its waker), which the descriptor budget
        // keeps back (`fdlimit::PER_SESSION_THREAD`). The blocking pools
        // (SCRAM's PBKDF2) share tokio's default ceiling of 512 threads.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads((512 / count).max(16))
            .build()?;
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let live = gauge(i);
        let counted = live.clone();
        let close = closing.clone();
        std::thread::Builder::new()
            .name(format!("pgtls-worker-{i}"))
            .spawn(move || {
                runtime.block_on(async {
                    let closed = close.wait();
                    tokio::pin!(closed);
                    loop {
                        tokio::select! {
                            biased;
                            () = &mut closed => break,
                            job = queue.recv() => match job {
                                Some(job) => job(Live(counted.clone())),
                                None => break,
                            },
                        }
                    }
                });
                // Sessions still queued are closed unstarted (a later send
                // fails, so the accept loop knows), and their count taken
                // back.
                queue.close();
                while queue.try_recv().is_ok() {
                    counted.dec();
                }
                // Every session still here is dropped with the runtime, on
                // this thread: its sockets close and its record settles.
                // Sessions cost nothing for this until then (no per-session
                // select on a close signal).
                runtime.shutdown_background();
            })?;
        workers.push(Worker { jobs, live });
    }
    Ok(Workers {
        workers: workers.into(),
        closing,
    })
}

impl Workers {
    /// How many session threads there are.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Runs the future `make` builds on the least busy worker; it counts
    /// as a live session there until it drops the [`Live`] it is given. A
    /// worker whose thread is gone is passed over from then on. False when
    /// none is left (only while the process is going down): `make` is then
    /// dropped.
    pub fn spawn<F, Fut>(&self, make: F) -> bool
    where
        F: FnOnce(Live) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut job: Job = Box::new(move |live| {
            tokio::spawn(make(live));
        });
        for _ in 0..self.workers.len() {
            let Some(worker) = self
                .workers
                .iter()
                .filter(|w| !w.jobs.is_closed())
                .min_by_key(|w| w.live.get())
            else {
                return false;
            };
            // Counted now, not when the worker gets to it, so a burst of
            // accepts spreads instead of landing on one idle worker. The
            // session's `Live` takes it back when the session ends.
            worker.live.inc();
            match worker.jobs.send(job) {
                Ok(()) => return true,
                Err(mpsc::error::SendError(back)) => {
                    worker.live.dec();
                    job = back;
                }
            }
        }
        false
    }

    /// Closes every session at once (the drain's last resort, and SIGINT):
    /// each worker drops its runtime, and with it every session on it and
    /// in its queue. The workers are gone afterwards.
    pub fn close_all(&self) {
        self.closing.fire();
    }

    /// Live sessions per worker, in worker order.
    #[cfg(test)]
    fn live(&self) -> Vec<i64> {
        self.workers.iter().map(|w| w.live.get()).collect()
    }
}

/// A session's place on its worker (its count in
/// `pgtls_session_thread_sessions`), given back when dropped.
pub struct Live(IntGauge);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge(i: usize) -> IntGauge {
        IntGauge::new(format!("t{i}"), "test").expect("gauge")
    }

    #[test]
    fn spreads_sessions_and_runs_them_on_worker_threads() {
        let workers = start(2, gauge).expect("workers");
        assert_eq!(workers.count(), 2);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (hold_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        for _ in 0..4 {
            let done = done_tx.clone();
            let mut hold = hold_tx.subscribe();
            let spawned = workers.spawn(move |live| async move {
                let _live = live;
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
        for _ in 0..2000 {
            if workers.live() == [0, 0] {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("sessions still counted: {:?}", workers.live());
    }

    /// The drain's last resort: sessions that never end on their own are
    /// dropped on their threads (their sockets close, their records settle).
    #[test]
    fn close_all_drops_every_session() {
        struct Dropped(std::sync::mpsc::Sender<Option<String>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(std::thread::current().name().map(str::to_owned));
            }
        }
        let workers = start(2, gauge).expect("workers");
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let dropped = Dropped(dropped_tx.clone());
            let started = started_tx.clone();
            assert!(workers.spawn(move |live| async move {
                let _held = (live, dropped);
                let _ = started.send(());
                std::future::pending::<()>().await;
            }));
        }
        for _ in 0..4 {
            started_rx.recv().expect("session started");
        }
        assert_eq!(workers.live(), [2, 2]);
        workers.close_all();
        let mut threads: Vec<String> = (0..4)
            .map(|_| {
                dropped_rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("session dropped")
                    .expect("on a named thread")
            })
            .collect();
        threads.sort();
        assert_eq!(
            threads,
            ["pgtls-worker-0", "pgtls-worker-0", "pgtls-worker-1", "pgtls-worker-1"]
        );
        assert_eq!(workers.live(), [0, 0]);
    }

    #[test]
    fn a_worker_whose_thread_is_gone_is_passed_over() {
        let alive = start(1, gauge).expect("worker");
        let (jobs, queue) = mpsc::unbounded_channel::<Job>();
        drop(queue);
        let gone = Worker {
            jobs,
            live: gauge(9),
        };
        let alive_worker = &alive.workers[0];
        let workers = Workers {
            closing: alive.closing.clone(),
            workers: vec![
                gone,
                Worker {
                    jobs: alive_worker.jobs.clone(),
                    live: alive_worker.live.clone(),
                },
            ]
            .into(),
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        assert!(workers.spawn(move |_live| async move {
            let _ = done_tx.send(std::thread::current().name().map(str::to_owned));
        }));
        assert_eq!(
            done_rx.recv().expect("ran").as_deref(),
            Some("pgtls-worker-0")
        );
        assert_eq!(workers.workers[0].live.get(), 0);
    }
}
