//! This replica's part in a fleet (`[fleet]`): its id and cancel-key
//! scheme at start-up, and the peer listener with its limits
//! (connections from the other replicas, served by
//! [`crate::conn::peer`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::StartError;
use crate::conn::{self, Context};
use crate::fleet::{self, Fleet};
use crate::metrics::Metrics;
use crate::policy::cancel::KeyScheme;
use crate::runtime::read_secret;
use crate::sys::listener::bind;

/// The replica id (from the config or the host name) and the cancel-key
/// scheme: a fleet's, or a lone proxy's.
pub(super) fn identity(
    config: Option<&crate::config::Fleet>,
    metrics: &Metrics,
) -> Result<(Option<Arc<Fleet>>, KeyScheme), StartError> {
    Ok(match config {
        Some(f) => {
            let id =
                f.replica_id
                    .resolve(&fleet::hostname())
                    .map_err(|reason| StartError::Fleet {
                        key: "fleet.replica_id",
                        reason,
                    })?;
            let key = f
                .cancel_key
                .as_ref()
                .map(|k| read_secret(k, "fleet.cancel_key", "the fleet's cancel key"))
                .transpose()?
                .unwrap_or_default();
            let accepted = f
                .accept_cancel_key
                .as_ref()
                .map(|k| {
                    read_secret(
                        k,
                        "fleet.accept_cancel_key",
                        "the fleet's accepted cancel key",
                    )
                })
                .transpose()?;
            // Characters, as written: `openssl rand -base64 32` gives 44.
            for (name, value) in [
                ("fleet.cancel_key", Some(&key)),
                ("fleet.accept_cancel_key", accepted.as_ref()),
            ] {
                if value.is_some_and(|k| k.len() < 32) {
                    return Err(StartError::Fleet {
                        key: name,
                        reason: "must be at least 32 characters (e.g. the output of `openssl rand -base64 32`)".into(),
                    });
                }
            }
            let scheme =
                KeyScheme::fleet(id, key.as_bytes(), accepted.as_deref().map(str::as_bytes));
            info!(replica_id = id, "fleet replica");
            let keys = scheme.key_ids();
            (
                Some(Arc::new(Fleet::new(f, id, keys, metrics.clone()))),
                scheme,
            )
        }
        None => (None, KeyScheme::lone()),
    })
}

/// Binds the peer listener, serves it, and asks the other replicas who
/// they are; refuses the start when one of them has this replica's id.
pub(super) async fn join(
    fleet: &Arc<Fleet>,
    c: &crate::config::Fleet,
    shared: &Arc<Context>,
    stop: &CancellationToken,
) -> Result<SocketAddr, StartError> {
    let (listener, addr) = bind("fleet.listen", &c.listen, PEER_BACKLOG).await?;
    tokio::spawn(peer_accept_loop(listener, shared.clone(), stop.clone()));
    info!(%addr, replica_id = fleet.me().replica, "fleet: peer listener");
    let client_tls = {
        let shared = shared.clone();
        move || {
            shared
                .runtime
                .load()
                .fleet_tls
                .as_ref()
                .map(|t| t.client.clone())
        }
    };
    if let Some(tls) = client_tls() {
        let report = fleet.refresh(&tls).await;
        if let Some(holder) = report.taken_by {
            return Err(StartError::Fleet {
                key: "fleet.replica_id",
                reason: format!(
                    "replica id {} is already taken by the replica at {holder}",
                    fleet.me().replica
                ),
            });
        }
        if fleet.known() == 0 {
            warn!("fleet: no other replica answered yet (they may be starting; the directory is refreshed every fleet.refresh_interval)");
        } else {
            info!(peers = fleet.known(), "fleet: directory ready");
        }
    }
    tokio::spawn(fleet.clone().keep_fresh(client_tls, stop.clone()));
    Ok(addr)
}

/// Peer connections are few (one per forwarded cancel or probe).
const PEER_BACKLOG: u32 = 128;
const MAX_PEER_CONNECTIONS: usize = 64;
/// From one address at once: one source cannot take every slot.
const MAX_PEER_CONNECTIONS_PER_SOURCE: usize = 8;

type PerSource = Arc<Mutex<HashMap<IpAddr, usize>>>;

async fn peer_accept_loop(listener: TcpListener, shared: Arc<Context>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    let per_source = PerSource::default();
    loop {
        let (tcp, from) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(pair) => pair,
                Err(e) => {
                    debug!("fleet: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Some(source) = SourceSlot::take(&per_source, from.ip()) else {
            busy(&shared, from);
            continue;
        };
        let (Ok(permit), Some(fd)) = (slots.clone().try_acquire_owned(), shared.fds.try_take())
        else {
            busy(&shared, from);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            conn::peer::serve(tcp, from, &shared).await;
            drop((permit, fd, source));
        });
    }
}

/// A peer connection closed at once: too many at once, from anyone or
/// from its address.
fn busy(shared: &Context, from: SocketAddr) {
    debug!(%from, "fleet: too many peer connections; closed");
    shared
        .metrics
        .cancel_peer
        .with_label_values(&["received", "busy"])
        .inc();
}

/// One of a source address's peer connections; given back on drop.
struct SourceSlot {
    map: PerSource,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(map: &PerSource, ip: IpAddr) -> Option<SourceSlot> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PEER_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}
