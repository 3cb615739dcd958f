//! Signals for a running proxy: SIGHUP reloads, SIGTERM drains (see
//! [`Handle::shutdown`]), SIGINT closes at once.

use super::Handle;

/// Serves signals until SIGTERM or SIGINT has stopped `handle`. `Err` when
/// the handlers cannot be installed (the proxy was then closed).
pub async fn run(handle: Handle) -> Result<(), ()> {
    let Some(mut signals) = Signals::new() else {
        tracing::error!("cannot install signal handlers");
        handle.abort().await;
        return Err(());
    };
    loop {
        match signals.next().await {
            Signal::Hangup => {
                tracing::info!("SIGHUP: reloading");
                let _ = handle.reload().await;
            }
            Signal::Terminate => {
                tracing::info!("SIGTERM received");
                handle.shutdown().await;
                return Ok(());
            }
            Signal::Interrupt => {
                tracing::info!("SIGINT: closing now");
                handle.abort().await;
                return Ok(());
            }
        }
    }
}

enum Signal {
    Hangup,
    Terminate,
    Interrupt,
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Signals {
            hup: signal(SignalKind::hangup()).ok()?,
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => Signal::Hangup,
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
        }
    }
}
