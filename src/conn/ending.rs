//! How a connection ends: what is logged once, what the session record
//! keeps, and what the client is told when the proxy ends it.

use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::error::{Phase, SessionError};
use super::negotiate;
use super::record::{CloseReason, SessionRecord};
use super::relay;
use crate::runtime::Runtime;
use crate::wire::stream::ClientStream;

/// Logs a failed connection once, at the level its cause deserves.
pub(super) fn report(error: &SessionError) {
    match error {
        SessionError::ClientEof(_) => debug!(kind = error.kind(), "{error}"),
        SessionError::Tls(_)
        | SessionError::DirectTlsWithoutAlpn
        | SessionError::Timeout(Phase::TlsHandshake) => {
            warn!(
                kind = error.kind(),
                reason = negotiate::failure_reason(error),
                "TLS handshake refused: {error}"
            )
        }
        _ => warn!(kind = error.kind(), "connection refused: {error}"),
    }
}

/// Records how the relay ended and tells the client when the proxy ended
/// its session.
pub(super) async fn relay_ended(
    client: &mut ClientStream,
    result: Result<relay::RelayStats, relay::RelayError>,
    rt: &Runtime,
    record: &mut SessionRecord,
) -> CloseReason {
    let stats = match &result {
        Ok(s) => *s,
        Err(e) => e.stats,
    };
    record.bytes_client_to_backend = stats.client_to_backend;
    record.bytes_backend_to_client = stats.backend_to_client;
    match result {
        Ok(stats) => match stats.ending {
            relay::Ending::Closed => match stats.first_eof {
                Some(relay::Side::Backend) if !stats.client_terminated => CloseReason::BackendEof,
                _ => CloseReason::ClientEof,
            },
            relay::Ending::Terminated => {
                end_with(client, &SessionError::AdminShutdown).await;
                CloseReason::Shutdown
            }
            relay::Ending::Idle => {
                info!(idle_timeout = ?rt.idle_timeout, "closing idle session");
                end_with(client, &SessionError::IdleTimeout).await;
                CloseReason::Limit
            }
        },
        Err(e) => {
            warn!(failed_side = e.side.as_str(), "session ended: {e}");
            record.error = Some(match e.side {
                relay::Side::Client => "client_io",
                relay::Side::Backend => "backend_io",
            });
            CloseReason::Error
        }
    }
}

/// Tells the client why the proxy is ending its connection (when it may
/// be told), then closes.
pub(super) async fn end_with(client: &mut ClientStream, why: &SessionError) {
    if let Some(err) = why.client_error() {
        let _ = client.write_all(&err.to_bytes()).await;
    }
    let _ = client.shutdown().await;
}
