//! The other replicas: who this replica is in the fleet, where the others
//! are, and sending them the CancelRequests that name them.
//!
//! A cancel key carries the id of the replica that issued it
//! ([`crate::policy::cancel`]). A load balancer may hand the cancel's new
//! connection to any replica; that one sends the request on, over mTLS
//! ([`crate::tls::peer`]), to the replica whose id the key names, which
//! looks it up among its own sessions ([`crate::conn::peer`]). One hop at
//! most: a replica never sends on what a peer sent it.
//!
//! The directory (replica id → address) is learned, not configured: each
//! `fleet.peers` entry is resolved (a headless Service's name resolves to
//! every pod) and every address is asked who it is (the peer link's
//! hello), every `fleet.refresh_interval` and at once (at most once a
//! second) when a key names an unknown replica or its address fails or
//! answers with another id (a pod replaced, its IP reused). An entry is
//! kept through a failed DNS lookup or an unanswered probe until its
//! address is known to be gone or taken.
//!
//! Two replicas with one id: the first started keeps it (hellos carry the
//! start time). A replica that meets an earlier holder of its own id at
//! start refuses to start; later, it turns unready (`/ready` 503) so that
//! its clients move away, and logs why. The later one is never used by
//! the others.

mod directory;
pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn};

use crate::config;
use crate::metrics::Metrics;
use wire::{Hello, Request, WireError};

/// Refreshes the directory on demand no more often than this: a stream
/// of cancels for a replica that is gone must not become a stream of DNS
/// lookups and handshakes.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

/// This replica's place in the fleet and its view of the others.
pub struct Fleet {
    me: Hello,
    peers: Vec<String>,
    server_name: Option<String>,
    timeout: Duration,
    refresh_interval: Duration,
    directory: Mutex<HashMap<u8, Peer>>,
    /// Held while refreshing (one refresh at a time); when the last began.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// An earlier replica has this replica's id: not ready.
    conflict: AtomicBool,
    metrics: Metrics,
}

#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    name: ServerName<'static>,
    hello: Hello,
}

/// What a refresh found wrong.
#[derive(Debug, Default)]
pub struct Refresh {
    /// Where an earlier replica has this replica's id.
    pub taken_by: Option<SocketAddr>,
}

/// Why a link to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("the address now belongs to replica {0}")]
    Moved(u8),
}

impl PeerError {
    /// A TLS failure (a certificate refused, no common ALPN): what
    /// configuration fixes, unlike a peer that is not up.
    pub fn is_tls(&self) -> bool {
        matches!(self, PeerError::Io(e) if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()))
    }
}

/// The host name, for `fleet.replica_id = "ordinal"`: `$HOSTNAME` (the pod
/// name in Kubernetes), else the kernel's.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

impl Fleet {
    /// `keys`: the ids of the cancel keys ([`crate::policy::cancel::KeyScheme::key_ids`]).
    pub fn new(c: &config::Fleet, replica: u8, keys: [[u8; 8]; 2], metrics: Metrics) -> Fleet {
        metrics
            .fleet_info
            .with_label_values(&[&replica.to_string()])
            .set(1);
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Fleet {
            me: Hello {
                replica,
                instance: rand::random(),
                started,
                keys,
            },
            peers: c.peers.clone(),
            server_name: c.server_name.clone(),
            timeout: c.timeout,
            refresh_interval: c.refresh_interval,
            directory: Mutex::default(),
            refreshed: tokio::sync::Mutex::new(None),
            conflict: AtomicBool::new(false),
            metrics,
        }
    }

    pub fn me(&self) -> Hello {
        self.me
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Why this replica must not serve, if it must not: an earlier replica
    /// has its id.
    pub fn conflict(&self) -> Option<String> {
        self.conflict.load(Ordering::Relaxed).then(|| {
            format!(
                "fleet: replica id {} belongs to an earlier replica",
                self.me.replica
            )
        })
    }

    /// A peer introduced itself (`from` is where it was met). Returns
    /// whether it is a later duplicate of this replica, never to be used.
    pub fn met(&self, hello: &Hello, from: SocketAddr) -> bool {
        if hello.replica != self.me.replica || hello.instance == self.me.instance {
            return false;
        }
        self.metrics
            .fleet_probes
            .with_label_values(&["duplicate"])
            .inc();
        if hello.precedes(&self.me) {
            if !self.conflict.swap(true, Ordering::Relaxed) {
                error!(%from, replica = hello.replica, "fleet: an earlier replica has this replica's id: not ready until restarted with a unique fleet.replica_id");
            }
            false
        } else {
            error!(%from, replica = hello.replica, "fleet: a later replica has this replica's id; it is not used");
            true
        }
    }

    /// Sends a client's CancelRequest on to replica `id`; returns the
    /// `pgtls_cancel_requests_total` result: "peer" when delivered,
    /// "unknown" when no such replica is known (its sessions ended with
    /// it, or the key is a guess), else "failed".
    pub async fn forward(
        &self,
        tls: &Arc<ClientConfig>,
        id: u8,
        source: IpAddr,
        packet: &[u8],
    ) -> &'static str {
        let Some(request) = Request::cancel(source, packet) else {
            return "unknown";
        };
        for attempt in 0..2 {
            let peer = match self.peer(id) {
                Some(p) => Some(p),
                None => {
                    self.refresh_after_miss(tls, Instant::now()).await;
                    self.peer(id)
                }
            };
            let Some(peer) = peer else {
                self.count_sent("no_peer");
                debug!(replica = id, "cancel for an unknown replica");
                return "unknown";
            };
            match exchange(self.me, self.timeout, tls, &peer, Some(id), &request).await {
                Ok(_) => {
                    self.count_sent("delivered");
                    return "peer";
                }
                // The address changed hands or stopped answering: look
                // again, once.
                Err(e) if attempt == 0 => {
                    info!(replica = id, addr = %peer.addr, "fleet: {e}; refreshing the directory");
                    self.forget(id, peer.addr);
                }
                Err(e) => {
                    warn!(replica = id, addr = %peer.addr, "cancel not sent to the peer: {e}");
                    break;
                }
            }
        }
        self.count_sent("failed");
        "failed"
    }

    fn count_sent(&self, result: &str) {
        self.metrics
            .cancel_peer
            .with_label_values(&["sent", result])
            .inc();
    }

    fn peer(&self, id: u8) -> Option<Peer> {
        let dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        dir.get(&id).cloned()
    }

    fn forget(&self, id: u8, addr: SocketAddr) {
        let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        if dir.get(&id).is_some_and(|p| p.addr == addr) {
            dir.remove(&id);
        }
    }

    /// Replicas known now (this one excluded).
    pub fn known(&self) -> usize {
        let dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        dir.len()
    }

}

/// One link: TLS, the server's hello, ours and the request. With
/// `expect`, the request is sent only to that replica.
async fn exchange(
    me: Hello,
    timeout: Duration,
    tls: &Arc<ClientConfig>,
    peer: &Peer,
    expect: Option<u8>,
    request: &Request,
) -> Result<Hello, PeerError> {
    let link = async {
        let tcp = TcpStream::connect(peer.addr).await?;
        let _ = tcp.set_nodelay(true);
        let mut tls = TlsConnector::from(tls.clone())
            .connect(peer.name.clone(), tcp)
            .await?;
        let hello = Hello::read(&mut tls).await?;
        if expect.is_some_and(|id| id != hello.replica) {
            return Err(PeerError::Moved(hello.replica));
        }
        let mut out = me.encode().to_vec();
        request.encode(&mut out);
        tls.write_all(&out).await?;
        // close_notify: the peer reads to the end, then closes.
        tls.shutdown().await?;
        Ok(hello)
    };
    tokio::time::timeout(timeout, link)
        .await
        .map_err(|_| PeerError::Timeout)?
}
