//! Signals for a running proxy: SIGHUP reloads, SIGTERM drains (see
//! [`Handle::shutdown`]), SIGINT closes at once; and what systemd is told
//! (`Type=notify`): READY=1 once the listeners are bound, RELOADING=1 and
//! then READY=1 around a reload, STOPPING=1 when the drain starts. Without
//! `NOTIFY_SOCKET` (not under systemd) telling is a no-op.

use sd_notify::NotifyState;

use super::Handle;

/// Serves signals until SIGTERM or SIGINT has stopped `handle`. `Err` when
/// the handlers cannot be installed (the proxy was then closed).
pub async fn run(handle: Handle) -> Result<(), ()> {
    let Some(mut signals) = Signals::new() else {
        tracing::error!("cannot install signal handlers");
        handle.abort().await;
        return Err(());
    };
    tell(&[NotifyState::Ready, NotifyState::Status("serving")]);
    loop {
        match signals.next().await {
            Signal::Hangup => {
                tracing::info!("SIGHUP: reloading");
                let mut reloading = vec![NotifyState::Reloading];
                reloading.extend(NotifyState::monotonic_usec_now().ok());
                tell(&reloading);
                let status = match handle.reload().await {
                    Ok(()) => "serving (reloaded)".to_string(),
                    Err(e) => format!("serving (reload failed, old configuration kept: {e})"),
                };
                tell(&[NotifyState::Ready, NotifyState::Status(&status)]);
            }
            Signal::Terminate => {
                tracing::info!("SIGTERM received");
                tell(&[NotifyState::Stopping, NotifyState::Status("draining")]);
                handle.shutdown().await;
                return Ok(());
            }
            Signal::Interrupt => {
                tracing::info!("SIGINT: closing now");
                tell(&[NotifyState::Stopping, NotifyState::Status("closing")]);
                handle.abort().await;
                return Ok(());
            }
        }
    }
}

/// Tells systemd, when it listens.
fn tell(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!("sd_notify: {e}");
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
