//! The accept loop: takes each connection off the listener, pays for its
//! descriptor, and hands it to the least busy session thread, where it
//! runs to its end (or until a forced close). When the drain stops it, it
//! takes what the listen backlog already holds before the listener closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::conn::{self, Context};
use crate::sys::fdlimit;
use crate::sys::workers::Workers;

/// Where accepted sessions go: a worker thread, tracked for the drain
/// (closed at once by [`Workers::close_all`]).
pub(super) struct Sessions {
    pub(super) workers: Workers,
    pub(super) tracker: TaskTracker,
}

/// Accepts until `stop`, then takes at most `backlog` connections already
/// queued (the listen backlog's effective length: all it can hold).
pub(super) async fn accept_loop(
    listener: TcpListener,
    backlog: u32,
    shared: Arc<Context>,
    slots: Arc<Semaphore>,
    sessions: Sessions,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            // Stop first: once the drain begins, what is queued goes
            // through `take_backlog`, not this loop.
            biased;
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                accept_failed(&shared, &e);
                // Back off instead of spinning on a full descriptor table.
                let exhausted = fdlimit::is_exhaustion(&e);
                tokio::time::sleep(Duration::from_millis(if exhausted { 100 } else { 10 })).await;
                continue;
            }
        };
        // The socket leaves this thread's reactor and joins the worker's.
        match tcp.into_std() {
            Ok(tcp) => admit(tcp, peer, &shared, &slots, &sessions),
            Err(e) => warn!("accepted socket unusable: {e}"),
        }
    }
    take_backlog(listener, backlog, &shared, &slots, &sessions);
}

/// At the drain: the connections the kernel has already completed (the
/// listen backlog) are taken and served like any other, not reset when the
/// listener closes. A load balancer has sent them here before it saw the
/// replica unready, and their clients would get a connection reset. At
/// most `max`: the listener still takes new arrivals meanwhile, and a
/// steady stream of them must not hold the drain up.
fn take_backlog(
    listener: TcpListener,
    max: u32,
    shared: &Arc<Context>,
    slots: &Arc<Semaphore>,
    sessions: &Sessions,
) {
    // Plain non-blocking accept(2) calls: tokio's readiness for the socket
    // may not have caught up with the last arrivals yet.
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(e) => {
            warn!("listen backlog not taken: {e}");
            return;
        }
    };
    let mut taken = 0u64;
    for _ in 0..max {
        match listener.accept() {
            Ok((tcp, peer)) => {
                // accept(2) does not pass O_NONBLOCK on; tokio needs it.
                if let Err(e) = tcp.set_nonblocking(true) {
                    warn!("accepted socket unusable: {e}");
                    continue;
                }
                taken += 1;
                admit(tcp, peer, shared, slots, sessions);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                accept_failed(shared, &e);
                // Out of descriptors: the rest cannot be paid for. Anything
                // else (a connection aborted while queued) is that one's.
                if fdlimit::is_exhaustion(&e) {
                    break;
                }
            }
        }
    }
    if taken > 0 {
        info!(
            sessions = taken,
            "draining: took the connections already in the listen backlog"
        );
    }
}

fn accept_failed(shared: &Context, e: &std::io::Error) {
    if fdlimit::is_exhaustion(e) {
        shared
            .metrics
            .fd_exhausted
            .with_label_values(&["accept"])
            .inc();
    }
    if let Some(suppressed) = shared.fd_warning.due() {
        warn!(suppressed, "accept failed: {e}");
    }
}

/// Pays for an accepted connection and hands it to a session thread.
fn admit(
    tcp: std::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: &Arc<Context>,
    slots: &Arc<Semaphore>,
    sessions: &Sessions,
) {
    // A client the descriptor budget cannot pay for is closed at once:
    // the reserve belongs to the admin listener and reloads.
    let Some(fd) = shared.fds.try_take() else {
        drop(tcp);
        shared.out_of_descriptors("accept");
        return;
    };
    // Over the limit the client still negotiates, so it can be told
    // "too many connections" in a proper ErrorResponse.
    let permit = slots.clone().try_acquire_owned().ok();
    let shared = shared.clone();
    // Counted from here, not from when the worker gets to it, so a
    // drain never misses a session still in a worker's queue.
    let tracked = sessions.tracker.token();
    let spawned = sessions
        .workers
        .spawn(move |live| conn::run(tcp, peer, shared, permit, fd, (tracked, live)));
    if !spawned {
        warn!("no session thread left: closing the connection");
    }
}
