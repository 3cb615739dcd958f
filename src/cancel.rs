//! Proxy-issued cancel keys. Each client gets its own random BackendKeyData
//! (the backend's `K` is rewritten); the registry maps that key to the
//! backend it stands for (pid, secret, and the link settings the session
//! used). An entry lives exactly as long as its session ([`Registration`]
//! removes it on drop).
//!
//! A CancelRequest (plaintext, after SSLRequest + TLS, or over direct TLS)
//! is looked up, its secret compared in constant time, and forwarded over
//! the backend link's mode. Unknown keys are ignored silently, as
//! PostgreSQL does; attempts are rate-limited per source address. The
//! backend's real key never reaches the client.
//!
//! Key layout (8 bytes, as protocol 3.0's pid + secret):
//! ```text
//! pid:    0 | replica id (7 bits) | random (24 bits)     -- positive int32
//! secret: random (32 bits)
//! ```
//! The replica id is 0 today. It is reserved so that a later version can
//! route a cancel that lands on another proxy replica (behind a load
//! balancer) to the replica that holds the session.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;
use tokio::time::Instant;
use tracing::debug;

use crate::backend::Connector;

/// Replica id placed in bits 30..24 of every issued pid.
pub const REPLICA_ID: i32 = 0;
const RANDOM_PID_BITS: i32 = 0x00ff_ffff;

/// Per-source cancel budget: a burst, then a steady rate.
const CANCEL_BURST: f64 = 20.0;
const CANCEL_PER_SECOND: f64 = 10.0;
/// Source addresses tracked at once; a constant bound on what peers can
/// make the limiter hold.
const MAX_TRACKED_SOURCES: usize = 4096;

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
        let mut p = [0u8; 16];
        p[..4].copy_from_slice(&16i32.to_be_bytes());
        p[4..8].copy_from_slice(&crate::protocol::CANCEL_REQUEST_CODE.to_be_bytes());
        p[8..12].copy_from_slice(&self.backend_pid.to_be_bytes());
        p[12..].copy_from_slice(&self.backend_secret);
        p
    }
}

struct Entry {
    secret: [u8; 4],
    target: CancelTarget,
}

#[derive(Default)]
struct Inner {
    sessions: Mutex<HashMap<i32, Entry>>,
    sources: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

#[derive(Clone, Default)]
pub struct CancelRegistry(Arc<Inner>);

/// Removes its key from the registry when the session ends.
pub struct Registration {
    inner: Arc<Inner>,
    pid: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.inner.sessions.lock() {
            map.remove(&self.pid);
        }
    }
}

/// What happened to a CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Found,
    Unknown,
    RateLimited,
}

impl CancelRegistry {
    pub fn new() -> CancelRegistry {
        CancelRegistry::default()
    }

    /// Issues a fresh proxy key for a backend key; the 8 bytes go to the
    /// client in place of the backend's.
    pub fn register(&self, target: CancelTarget) -> ([u8; 8], Registration) {
        let mut rng = rand::rng();
        let mut map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            let pid = (REPLICA_ID << 24) | (rng.random::<i32>() & RANDOM_PID_BITS);
            if pid != 0 && !map.contains_key(&pid) {
                break pid;
            }
        };
        let secret: [u8; 4] = rng.random();
        map.insert(pid, Entry { secret, target });
        let mut key = [0u8; 8];
        key[..4].copy_from_slice(&pid.to_be_bytes());
        key[4..].copy_from_slice(&secret);
        (
            key,
            Registration {
                inner: self.0.clone(),
                pid,
            },
        )
    }

    /// Finds the target of a CancelRequest packet (16 bytes, length word
    /// included), after the per-source rate limit.
    pub fn lookup(&self, source: IpAddr, packet: &[u8]) -> (Lookup, Option<CancelTarget>) {
        if !self.allow(source) {
            return (Lookup::RateLimited, None);
        }
        // Protocol 3.2 allows longer secrets; ours are always 4 bytes.
        if packet.len() != 16 {
            return (Lookup::Unknown, None);
        }
        let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&pid) {
            Some(entry) if constant_time_eq(&entry.secret, &packet[12..16]) => {
                (Lookup::Found, Some(entry.target.clone()))
            }
            _ => (Lookup::Unknown, None),
        }
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        self.0.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancels every registered session's running query (at shutdown);
    /// returns how many cancels were delivered.
    pub async fn cancel_all(&self) -> usize {
        let targets: Vec<CancelTarget> = {
            let map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.values().map(|e| e.target.clone()).collect()
        };
        let sends = targets
            .into_iter()
            .map(|t| async move { t.connector.forward_cancel(&t.packet()).await });
        let results = futures_join_all(sends).await;
        results.into_iter().filter(|r| r.is_ok()).count()
    }

    fn allow(&self, source: IpAddr) -> bool {
        let now = Instant::now();
        let mut sources = self.0.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_TRACKED_SOURCES && !sources.contains_key(&source) {
            // Forget sources whose bucket has refilled: they hold no state.
            sources.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * CANCEL_PER_SECOND < CANCEL_BURST
            });
            if sources.len() >= MAX_TRACKED_SOURCES {
                debug!(%source, "cancel limiter full");
                return false;
            }
        }
        let (tokens, at) = sources.entry(source).or_insert((CANCEL_BURST, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * CANCEL_PER_SECOND).min(CANCEL_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs futures concurrently and collects their outputs.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(v) = r {
            out.push(v);
        }
    }
    out
}

/// Compares secrets without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Backend;

    fn target(pid: i32) -> CancelTarget {
        CancelTarget {
            backend_pid: pid,
            backend_secret: [1, 2, 3, 4],
            connector: Arc::new(Connector::new(&Backend::default()).expect("connector")),
        }
    }

    fn cancel_packet(key: &[u8; 8]) -> Vec<u8> {
        let mut p = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        p.extend_from_slice(key);
        p
    }

    #[tokio::test]
    async fn keys_map_to_backends_and_die_with_the_session() {
        let reg = CancelRegistry::new();
        let (key, guard) = reg.register(target(4242));
        let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        assert!(pid > 0 && pid >> 24 == REPLICA_ID);
        assert_ne!(pid, 4242, "the backend pid is never handed out");
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let (found, t) = reg.lookup(ip, &cancel_packet(&key));
        assert_eq!(found, Lookup::Found);
        assert_eq!(t.expect("target").packet()[8..12], 4242i32.to_be_bytes());
        let mut wrong = key;
        wrong[7] ^= 1;
        assert_eq!(reg.lookup(ip, &cancel_packet(&wrong)).0, Lookup::Unknown);
        drop(guard);
        assert_eq!(reg.lookup(ip, &cancel_packet(&key)).0, Lookup::Unknown);
        assert!(reg.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_per_source() {
        let reg = CancelRegistry::new();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let junk = [0u8; 16];
        for _ in 0..CANCEL_BURST as usize {
            assert_eq!(reg.lookup(a, &junk).0, Lookup::Unknown);
        }
        assert_eq!(reg.lookup(a, &junk).0, Lookup::RateLimited);
        assert_eq!(
            reg.lookup(b, &junk).0,
            Lookup::Unknown,
            "other sources are unaffected"
        );
        tokio::time::advance(std::time::Duration::from_millis(250)).await;
        assert_eq!(
            reg.lookup(a, &junk).0,
            Lookup::Unknown,
            "the bucket refills"
        );
    }
}
