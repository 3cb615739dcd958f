//! A CancelRequest that reached the proxy: its key is looked up in the
//! registry ([`crate::policy::cancel`]) and the backend's key forwarded
//! over the backend link mode its session used. Never answers the client,
//! as PostgreSQL never does.

use tracing::{debug, warn};

use super::negotiate::Path;
use super::Conn;
use crate::policy::cancel::Lookup;

pub(super) async fn forward(conn: &Conn<'_>, packet: &[u8], path: Path) {
    let ctx = conn.ctx;
    let (lookup, target) = ctx
        .cancels
        .lookup(conn.peer.ip(), packet, std::time::Instant::now());
    let result = match (lookup, target) {
        (Lookup::Found, Some(target)) => match ctx.fds.try_take() {
            None => {
                ctx.out_of_descriptors("backend");
                "failed"
            }
            Some(_fd) => match target.connector.forward_cancel(&target.packet()).await {
                Ok(()) => "forwarded",
                Err(e) => {
                    warn!(kind = e.kind(), "cancel request not delivered: {e}");
                    "failed"
                }
            },
        },
        (Lookup::RateLimited, _) => "rate_limited",
        _ => "unknown",
    };
    debug!(path = path.as_str(), result, "CancelRequest");
    ctx.metrics
        .cancel_requests
        .with_label_values(&[result])
        .inc();
}
