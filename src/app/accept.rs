//! The accept loop: takes each connection off the listener, pays for its
//! descriptor, and hands it to the least busy session thread, where it
//! runs to its end (or until a forced close).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::conn::{self, Context};
use crate::sys::fdlimit;
use crate::sys::workers::Workers;

/// Where accepted sessions go: a worker thread, tracked for the drain
/// (closed at once by [`Workers::close_all`]).
pub(super) struct Sessions {
    pub(super) workers: Workers,
    pub(super) tracker: TaskTracker,
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Context>,
    slots: Arc<Semaphore>,
    sessions: Sessions,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                let exhausted = fdlimit::is_exhaustion(&e);
                if exhausted {
                    shared
                        .metrics
                        .fd_exhausted
                        .with_label_values(&["accept"])
                        .inc();
                }
                if let Some(suppressed) = shared.fd_warning.due() {
                    warn!(suppressed, "accept failed: {e}");
                }
                // Back off instead of spinning on a full descriptor table.
                tokio::time::sleep(Duration::from_millis(if exhausted { 100 } else { 10 })).await;
                continue;
            }
        };
        // A client the descriptor budget cannot pay for is closed at once:
        // the reserve belongs to the admin listener and reloads.
        let Some(fd) = shared.fds.try_take() else {
            drop(tcp);
            shared.out_of_descriptors("accept");
            continue;
        };
        // Over the limit the client still negotiates, so it can be told
        // "too many connections" in a proper ErrorResponse.
        let permit = slots.clone().try_acquire_owned().ok();
        // The socket leaves this thread's reactor and joins the worker's.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!("accepted socket unusable: {e}");
                continue;
            }
        };
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
}
