//! The directory's upkeep: resolving `fleet.peers`, asking every address
//! who it is, keeping what a failed lookup or an unanswered probe cannot
//! disprove, and refreshing on a schedule or on a miss.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tracing::{debug, error, warn};

use super::wire::Request;
use super::{exchange, Fleet, Peer, Refresh, MIN_REFRESH_GAP};
use crate::config;

impl Fleet {
    /// Resolves `fleet.peers` again and asks every address who it is.
    pub async fn refresh(&self, tls: &Arc<ClientConfig>) -> Refresh {
        let mut last = self.refreshed.lock().await;
        self.refresh_locked(tls, &mut last).await
    }

    /// A refresh for a replica id missing at `missed`: none when one began
    /// since; else after the last one is a second old, so that a stream of
    /// cancels for a replica that is gone costs one lookup a second.
    pub(super) async fn refresh_after_miss(&self, tls: &Arc<ClientConfig>, missed: Instant) {
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
