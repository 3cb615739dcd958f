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
//! every pod) and every new address is asked who it is (the peer link's
//! hello). It is refreshed every `fleet.refresh_interval`, and at once when
//! a key names an unknown replica or an address answers with another id
//! than expected (a pod IP reused). A replica that answers with this
//! replica's id and another instance is a duplicate: at start-up that
//! refuses the start; later it is logged, counted and never used.

pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    directory: Mutex<Directory>,
    /// Held while refreshing (one refresh at a time); when the last ended.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    metrics: Metrics,
}

#[derive(Default)]
struct Directory {
    by_id: HashMap<u8, Peer>,
    /// Addresses that answered: who (`None`: this replica itself).
    seen: HashMap<SocketAddr, Option<u8>>,
}

#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    name: ServerName<'static>,
    instance: [u8; 16],
}

/// What a refresh found wrong.
#[derive(Debug, Default)]
pub struct Refresh {
    /// Addresses where another replica claims this replica's id.
    pub duplicates: Vec<SocketAddr>,
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
    pub fn new(c: &config::Fleet, replica: u8, metrics: Metrics) -> Fleet {
        metrics
            .fleet_info
            .with_label_values(&[&replica.to_string()])
            .set(1);
        Fleet {
            me: Hello {
                replica,
                instance: rand::random(),
            },
            peers: c.peers.clone(),
            server_name: c.server_name.clone(),
            timeout: c.timeout,
            refresh_interval: c.refresh_interval,
            directory: Mutex::default(),
            refreshed: tokio::sync::Mutex::new(None),
            metrics,
        }
    }

    pub fn me(&self) -> Hello {
        self.me
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends a client's CancelRequest on to replica `id`; returns the
    /// `pgtls_cancel_requests_total` result: "peer" when delivered,
    /// "unknown" when no such replica is known (its sessions ended with
    /// it, or the key is a guess), else "failed".
    pub async fn forward(&self, tls: &Arc<ClientConfig>, id: u8, packet: &[u8]) -> &'static str {
        let Some(request) = Request::cancel(packet) else {
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
                Err(PeerError::Moved(now)) if attempt == 0 => {
                    info!(replica = id, addr = %peer.addr, now, "replica moved: refreshing the directory");
                    self.forget(peer.addr);
                }
                Err(e) => {
                    self.count_sent("failed");
                    warn!(replica = id, addr = %peer.addr, "cancel not sent to the peer: {e}");
                    return "failed";
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
        dir.by_id.get(&id).cloned()
    }

    fn forget(&self, addr: SocketAddr) {
        let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        dir.seen.remove(&addr);
        dir.by_id.retain(|_, p| p.addr != addr);
    }

    /// Replicas known now (this one excluded).
    pub fn known(&self) -> usize {
        let dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        dir.by_id.len()
    }

    /// Resolves `fleet.peers` again and asks every new address who it is.
    pub async fn refresh(&self, tls: &Arc<ClientConfig>) -> Refresh {
        let mut last = self.refreshed.lock().await;
        self.refresh_locked(tls, &mut last).await
    }

    /// A refresh for a replica id missing at `missed`: none when one began
    /// since; else after the last one is a second old, so that a stream of
    /// cancels for a replica that is gone costs one lookup a second.
    async fn refresh_after_miss(&self, tls: &Arc<ClientConfig>, missed: Instant) {
        let mut last = self.refreshed.lock().await;
        if let Some(at) = *last {
            if at > missed {
                return;
            }
            tokio::time::sleep(MIN_REFRESH_GAP.saturating_sub(at.elapsed())).await;
        }
        self.refresh_locked(tls, &mut last).await;
    }

    async fn refresh_locked(&self, tls: &Arc<ClientConfig>, last: &mut Option<Instant>) -> Refresh {
        *last = Some(Instant::now());
        let mut resolved: Vec<(SocketAddr, ServerName<'static>)> = Vec::new();
        for entry in &self.peers {
            let host = self
                .server_name
                .clone()
                .unwrap_or_else(|| config::host_of(entry).to_string());
            let Ok(name) = ServerName::try_from(host.clone()) else {
                warn!(peer = entry, "fleet: {host:?} is not a valid server name");
                continue;
            };
            match tokio::time::timeout(self.timeout, tokio::net::lookup_host(entry.as_str())).await
            {
                Ok(Ok(addrs)) => resolved.extend(addrs.map(|a| (a, name.clone()))),
                Ok(Err(e)) => debug!(peer = entry, "fleet: cannot resolve: {e}"),
                Err(_) => debug!(peer = entry, "fleet: resolving timed out"),
            }
        }
        let new: Vec<(SocketAddr, ServerName<'static>)> = {
            let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
            // Addresses that no longer resolve are gone (a pod replaced).
            dir.seen.retain(|a, _| resolved.iter().any(|(r, _)| r == a));
            dir.by_id
                .retain(|_, p| resolved.iter().any(|(r, _)| *r == p.addr));
            resolved
                .into_iter()
                .filter(|(a, _)| !dir.seen.contains_key(a))
                .collect()
        };
        let mut probes = tokio::task::JoinSet::new();
        for (addr, name) in new {
            let peer = Peer {
                addr,
                name,
                instance: [0; 16],
            };
            let tls = tls.clone();
            let me = self.me;
            let timeout = self.timeout;
            probes.spawn(async move {
                let answer = exchange(me, timeout, &tls, &peer, None, &Request::Probe).await;
                (answer, peer)
            });
        }
        let mut report = Refresh::default();
        while let Some(done) = probes.join_next().await {
            let Ok((answer, mut peer)) = done else { continue };
            let result = match answer {
                Err(e) => {
                    debug!(addr = %peer.addr, "fleet: no answer: {e}");
                    "failed"
                }
                Ok(hello) if hello.instance == self.me.instance => {
                    self.directory
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .seen
                        .insert(peer.addr, None);
                    "self"
                }
                Ok(hello) if hello.replica == self.me.replica => {
                    error!(
                        addr = %peer.addr,
                        replica = hello.replica,
                        "fleet: another replica has this replica's id; ids must be unique (fleet.replica_id)"
                    );
                    report.duplicates.push(peer.addr);
                    "duplicate"
                }
                Ok(hello) => {
                    peer.instance = hello.instance;
                    let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
                    match dir.by_id.get(&hello.replica) {
                        Some(other) if other.instance != hello.instance => {
                            error!(
                                replica = hello.replica,
                                addr = %peer.addr,
                                first = %other.addr,
                                "fleet: two replicas claim the same id; keeping the first"
                            );
                            "duplicate"
                        }
                        _ => {
                            dir.seen.insert(peer.addr, Some(hello.replica));
                            info!(replica = hello.replica, addr = %peer.addr, "fleet: peer found");
                            dir.by_id.insert(hello.replica, peer);
                            "peer"
                        }
                    }
                }
            };
            self.metrics
                .fleet_probes
                .with_label_values(&[result])
                .inc();
        }
        self.metrics.fleet_peers.set(self.known() as i64);
        report
    }

    /// Refreshes every `fleet.refresh_interval` until `stop`.
    pub async fn keep_fresh(
        self: Arc<Self>,
        tls: impl Fn() -> Option<Arc<ClientConfig>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.refresh_interval) => {}
            }
            if let Some(tls) = tls() {
                self.refresh(&tls).await;
            }
        }
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
