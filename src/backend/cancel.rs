//! Cancel forwarding: what a proxy-issued cancel key stands for (the
//! backend's own key and the link settings its session used), and sending
//! the backend's CancelRequest over a fresh link of the same mode. The
//! keys themselves live in [`crate::policy::cancel`].

use std::sync::Arc;

use super::Connector;
use crate::wire::encode::cancel_request;

/// Where a proxy key's cancel goes.
#[derive(Clone)]
pub struct CancelTarget {
    pub backend_pid: i32,
    pub backend_secret: [u8; 4],
    pub connector: Arc<Connector>,
}

impl CancelTarget {
    /// The CancelRequest the backend expects.
    pub fn packet(&self) -> [u8; 16] {
        cancel_request(self.backend_pid, self.backend_secret)
    }
}

/// Cancels every target's running query concurrently (at shutdown);
/// returns how many cancels were delivered.
pub async fn cancel_all(targets: Vec<CancelTarget>) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for t in targets {
        set.spawn(async move { t.connector.forward_cancel(&t.packet()).await });
    }
    let mut delivered = 0;
    while let Some(r) = set.join_next().await {
        if matches!(r, Ok(Ok(()))) {
            delivered += 1;
        }
    }
    delivered
}
