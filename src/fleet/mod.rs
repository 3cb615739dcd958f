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

    /// Resolves `fleet.peers` again and asks every address who it is.
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
        let (resolved, complete) = self.resolve().await;
        let mut probes = tokio::task::JoinSet::new();
        for (addr, name) in resolved.iter().cloned() {
            let (tls, me, timeout) = (tls.clone(), self.me, self.timeout);
            probes.spawn(async move {
                let peer = Peer { addr, name, hello: me };
                let answer = exchange(me, timeout, &tls, &peer, None, &Request::Probe).await;
                (answer, peer)
            });
        }
        let mut found: HashMap<u8, Peer> = HashMap::new();
        // Addresses that answered, whoever they are.
        let mut answered: Vec<SocketAddr> = Vec::new();
        let mut report = Refresh::default();
        while let Some(done) = probes.join_next().await {
            let Ok((answer, mut peer)) = done else { continue };
            let hello = match answer {
                Ok(hello) => hello,
                Err(e) => {
                    // A certificate the peers refuse is a configuration
                    // error; a peer that is not up (yet) is not.
                    if e.is_tls() {
                        warn!(addr = %peer.addr, "fleet: cannot link to the peer: {e}");
                    } else {
                        debug!(addr = %peer.addr, "fleet: no answer: {e}");
                    }
                    self.count_probe("failed");
                    continue;
                }
            };
            answered.push(peer.addr);
            if hello.instance == self.me.instance {
                self.count_probe("self");
                continue;
            }
            if hello.replica == self.me.replica {
                self.met(&hello, peer.addr);
                if hello.precedes(&self.me) {
                    report.taken_by = Some(peer.addr);
                }
                continue;
            }
            if !hello.shares_keys(&self.me) {
                error!(
                    addr = %peer.addr,
                    replica = hello.replica,
                    "fleet: the peer has another fleet.cancel_key; protocol 3.2 cancels between the two are dropped as forged"
                );
                self.count_probe("key_mismatch");
            }
            peer.hello = hello;
            match found.get(&hello.replica) {
                Some(other) if other.hello.instance != hello.instance => {
                    let (keep, drop) = if other.hello.precedes(&hello) {
                        (other.clone(), peer)
                    } else {
                        (peer, other.clone())
                    };
                    error!(
                        replica = hello.replica,
                        kept = %keep.addr,
                        ignored = %drop.addr,
                        "fleet: two replicas claim the same id; the first started keeps it"
                    );
                    self.count_probe("duplicate");
                    found.insert(hello.replica, keep);
                }
                _ => {
                    self.count_probe("peer");
                    found.insert(hello.replica, peer);
                }
            }
        }
        let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        // Entries this round did not confirm stay while their address may
        // still be theirs: it did not answer as someone else, and it still
        // resolves (or a lookup failed, so nobody knows).
        for (id, old) in dir.drain() {
            let gone = answered.contains(&old.addr)
                || (complete && !resolved.iter().any(|(a, _)| *a == old.addr));
            if !gone && !found.contains_key(&id) {
                found.insert(id, old);
            }
        }
        for (id, peer) in &found {
            if !dir.contains_key(id) {
                debug!(replica = id, addr = %peer.addr, "fleet: peer");
            }
        }
        *dir = found;
        self.metrics.fleet_peers.set(dir.len() as i64);
        report
    }

    /// Every address of every `peers` entry, with the name to verify;
    /// `false` when a lookup failed.
    async fn resolve(&self) -> (Vec<(SocketAddr, ServerName<'static>)>, bool) {
        let mut resolved = Vec::new();
        let mut complete = true;
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
                Ok(Ok(addrs)) => {
                    for a in addrs {
                        if !resolved.iter().any(|(r, _)| *r == a) {
                            resolved.push((a, name.clone()));
                        }
                    }
                }
                Ok(Err(e)) => {
                    complete = false;
                    warn!(peer = entry, "fleet: cannot resolve: {e}");
                }
                Err(_) => {
                    complete = false;
                    warn!(peer = entry, "fleet: resolving timed out");
                }
            }
        }
        (resolved, complete)
    }

    fn count_probe(&self, result: &str) {
        self.metrics
            .fleet_probes
            .with_label_values(&[result])
            .inc();
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
