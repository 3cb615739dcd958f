//! A CancelRequest that reached the proxy: its key is looked up in the
//! registry ([`crate::policy::cancel`]); the backend's key is forwarded
//! over the backend link mode its session used, or, for a key another
//! replica issued, the request is sent on to that replica
//! ([`crate::fleet`]). Never answers the client, as PostgreSQL never does.

use tracing::{debug, warn};

use super::negotiate::Path;
use super::Conn;
use crate::backend::cancel::CancelTarget;
use super::Context;
use crate::policy::cancel::Lookup;

/// Returns the result, as `pgtls_cancel_requests_total` counts it.
pub(super) async fn forward(conn: &Conn<'_>, packet: &[u8], path: Path) -> &'static str {
    let ctx = conn.ctx;
    let lookup = ctx
        .cancels
        .lookup(conn.peer.ip(), packet, std::time::Instant::now());
    let result = match lookup {
        Lookup::Found(target) => deliver(ctx, target).await,
        Lookup::Peer(id) => {
            let tls = conn.rt.fleet_tls.as_ref().map(|t| &t.client);
            match (&ctx.fleet, tls, ctx.fds.try_take()) {
                (Some(fleet), Some(tls), Some(_fd)) => {
                    fleet.forward(tls, id, conn.peer.ip(), packet).await
                }
                (Some(_), Some(_), None) => {
                    ctx.out_of_descriptors("backend");
                    "failed"
                }
                _ => "unknown",
            }
        }
        other => other.as_str(),
    };
    debug!(path = path.as_str(), result, "CancelRequest");
    ctx.metrics
        .cancel_requests
        .with_label_values(&[result])
        .inc();
    result
}

/// Sends the backend's CancelRequest for a session of this replica;
/// returns the result label ("forwarded" or "failed").
pub(super) async fn deliver(ctx: &Context, target: CancelTarget) -> &'static str {
    let Some(_fd) = ctx.fds.try_take() else {
        ctx.out_of_descriptors("backend");
        return "failed";
    };
    match target.connector.forward_cancel(&target.packet()).await {
        Ok(()) => "forwarded",
        Err(e) => {
            warn!(kind = e.kind(), "cancel request not delivered: {e}");
            "failed"
        }
    }
}
