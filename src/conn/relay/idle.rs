//! When a relayed session counts as idle: no byte either way for
//! `limits.idle_timeout` *and* the backend waiting on the client (its last
//! message was ReadyForQuery, and no client byte came since). A silent
//! long query is not idle.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::direction::Direction;

/// Nothing at all (one pointer) when the timeout is off, the default: an
/// idle session holds only what it uses. One allocation when it is on.
pub(super) struct Idleness(Option<Pin<Box<Watch>>>);

pin_project_lite::pin_project! {
    struct Watch {
        timeout: Duration,
        #[pin]
        timer: Sleep,
        // Bytes moved either way when the timer last fired.
        moved_at_check: u64,
        // Client bytes relayed when the backend last said ReadyForQuery.
        client_bytes_at_ready: u64,
        // Backend bytes relayed when that was last looked at.
        backend_bytes_seen: u64,
    }
}

impl Idleness {
    pub(super) fn new(timeout: Option<Duration>) -> Idleness {
        Idleness(timeout.map(|timeout| {
            Box::pin(Watch {
                timeout,
                timer: tokio::time::sleep(timeout),
                moved_at_check: 0,
                client_bytes_at_ready: 0,
                backend_bytes_seen: 0,
            })
        }))
    }

    /// Notes, after each round of copying, whether the backend has just
    /// finished a ReadyForQuery.
    pub(super) fn observe(&mut self, up: &Direction, down: &Direction) {
        let Some(watch) = &mut self.0 else {
            return;
        };
        let this = watch.as_mut().project();
        if down.total != *this.backend_bytes_seen {
            *this.backend_bytes_seen = down.total;
            if down.after_ready_for_query() {
                *this.client_bytes_at_ready = up.total;
            }
        }
    }

    /// True once the session is idle; otherwise re-arms the timer when it
    /// fired on a session that was not.
    pub(super) fn poll_expired(
        &mut self,
        cx: &mut Context<'_>,
        up: &Direction,
        down: &Direction,
    ) -> bool {
        let Some(watch) = &mut self.0 else {
            return false;
        };
        let mut this = watch.as_mut().project();
        if this.timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        let moved = up.total + down.total;
        if moved == *this.moved_at_check
            && down.after_ready_for_query()
            && up.total == *this.client_bytes_at_ready
        {
            return true;
        }
        *this.moved_at_check = moved;
        let next = Instant::now() + *this.timeout;
        this.timer.as_mut().reset(next);
        let _ = this.timer.as_mut().poll(cx);
        false
    }
}
