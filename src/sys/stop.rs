//! A stop signal that every session can watch for the price of one atomic
//! load per wake-up.
//!
//! `CancellationToken::cancelled()` takes the token's mutex each time it is
//! polled, and a relayed session's future is polled on every message; with
//! all sessions sharing one token, every worker thread took the same lock
//! on every wake-up. [`Wait`] registers with a [`Notify`] once (again only
//! if the task's waker changes) and otherwise reads a flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Fired once; never reset.
#[derive(Debug, Default)]
pub struct Stop {
    fired: AtomicBool,
    notify: Notify,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Wakes every [`Wait`], now and later.
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves once the signal has fired.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            stop: self,
            // Created now, it is woken by any later `notify_waiters`, even
            // before its first poll: no fire can slip between the flag
            // check and the registration.
            notified: self.notify.notified(),
            registered: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Stop::wait`].
    pub struct Wait<'a> {
        stop: &'a Stop,
        #[pin]
        notified: Notified<'a>,
        // The waker the Notify holds; polls with the same one only read
        // the flag.
        registered: Option<Waker>,
    }
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.stop.is_fired() {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        if this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_waiters_registered_before_and_after() {
        let stop = Arc::new(Stop::new());
        let early = {
            let stop = stop.clone();
            tokio::spawn(async move { stop.wait().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!early.is_finished());
        stop.fire();
        tokio::time::timeout(Duration::from_secs(5), early)
            .await
            .expect("woken")
            .expect("join");
        // After the fire, a new wait is ready at once.
        tokio::time::timeout(Duration::from_secs(5), stop.wait())
            .await
            .expect("ready");
    }

    #[tokio::test]
    async fn a_wait_made_before_the_fire_is_ready_after_it() {
        let stop = Stop::new();
        let wait = stop.wait();
        stop.fire();
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("ready");
    }
}
