//! Proxy-issued cancel keys. The BackendKeyData a client sees carries the
//! backend's real pid (clients use it as the backend's: pg_terminate_backend,
//! NOTIFY's sender pid, pg_stat_activity) and a secret of the proxy's; the
//! registry maps (pid, secret) to what it stands for (a target the caller
//! defines: the backend's key and link,
//! [`crate::backend::cancel::CancelTarget`]). Several backends may share a
//! pid (one proxy in front of several servers): entries are told apart by
//! their secret. An entry lives exactly as long as its session
//! ([`Registration`] removes it on drop).
//!
//! A CancelRequest's key is looked up and its secret compared in constant
//! time; unknown keys are ignored silently, as PostgreSQL does; attempts
//! are rate-limited per source address. Forwarding is the backend's job.
//! The backend's real key never reaches the client.
//!
//! Key layout (8 bytes, as protocol 3.0's pid + secret):
//! ```text
//! pid:    the backend's own pid
//! secret: random (32 bits), never the backend's
//! ```
//! A guess must match pid and secret: 2^32 secrets per pid, with the
//! per-source rate limit (20 at once, then 10 per second) as the guard.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use std::time::Instant;

use rand::Rng;
use tracing::debug;

/// Per-source cancel budget: a burst, then a steady rate.
const CANCEL_BURST: f64 = 20.0;
const CANCEL_PER_SECOND: f64 = 10.0;
/// Source addresses tracked at once; a constant bound on what peers can
/// make the limiter hold.
const MAX_TRACKED_SOURCES: usize = 4096;

struct Entry<T> {
    secret: [u8; 4],
    target: T,
}

struct Inner<T> {
    sessions: Mutex<HashMap<i32, Vec<Entry<T>>>>,
    sources: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Issued keys and what each stands for.
pub struct CancelRegistry<T>(Arc<Inner<T>>);

impl<T> Clone for CancelRegistry<T> {
    fn clone(&self) -> Self {
        CancelRegistry(self.0.clone())
    }
}

impl<T> Default for CancelRegistry<T> {
    fn default() -> Self {
        CancelRegistry(Arc::new(Inner {
            sessions: Mutex::default(),
            sources: Mutex::default(),
        }))
    }
}

/// Removes its key from the registry when the session ends.
pub struct Registration<T> {
    inner: Arc<Inner<T>>,
    pid: i32,
    secret: [u8; 4],
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        let mut map = self.inner.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entries) = map.get_mut(&self.pid) {
            entries.retain(|e| e.secret != self.secret);
            if entries.is_empty() {
                map.remove(&self.pid);
            }
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

impl<T: Clone> CancelRegistry<T> {
    pub fn new() -> CancelRegistry<T> {
        CancelRegistry::default()
    }

    /// Issues the key for a session of backend `pid`: the backend's pid
    /// and a fresh secret of ours; the 8 bytes go to the client in place
    /// of the backend's.
    pub fn register(&self, pid: i32, target: T) -> ([u8; 8], Registration<T>) {
        let mut rng = rand::rng();
        let mut map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let entries = map.entry(pid).or_default();
        let secret = loop {
            let secret: [u8; 4] = rng.random();
            if !entries.iter().any(|e| e.secret == secret) {
                break secret;
            }
        };
        entries.push(Entry { secret, target });
        let mut key = [0u8; 8];
        key[..4].copy_from_slice(&pid.to_be_bytes());
        key[4..].copy_from_slice(&secret);
        (
            key,
            Registration {
                inner: self.0.clone(),
                pid,
                secret,
            },
        )
    }

    /// Finds the target of a CancelRequest packet (16 bytes, length word
    /// included), after the per-source rate limit (at `now`).
    pub fn lookup(&self, source: IpAddr, packet: &[u8], now: Instant) -> (Lookup, Option<T>) {
        if !self.allow(source, now) {
            return (Lookup::RateLimited, None);
        }
        // Protocol 3.2 allows longer secrets; ours are always 4 bytes.
        if packet.len() != 16 {
            return (Lookup::Unknown, None);
        }
        let pid = i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let found = map
            .get(&pid)
            .into_iter()
            .flatten()
            .find(|e| constant_time_eq(&e.secret, &packet[12..16]));
        match found {
            Some(entry) => (Lookup::Found, Some(entry.target.clone())),
            None => (Lookup::Unknown, None),
        }
    }

    /// Sessions registered now.
    pub fn len(&self) -> usize {
        let map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every registered target (to cancel all running queries at shutdown).
    pub fn targets(&self) -> Vec<T> {
        let map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.values().flatten().map(|e| e.target.clone()).collect()
    }

    fn allow(&self, source: IpAddr, now: Instant) -> bool {
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

/// Compares secrets without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stand-in for the backend key a proxy key stands for.
    fn target(pid: i32) -> (i32, [u8; 4]) {
        (pid, [1, 2, 3, 4])
    }

    fn cancel_packet(key: &[u8; 8]) -> Vec<u8> {
        let mut p = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        p.extend_from_slice(key);
        p
    }

    #[test]
    fn keys_map_to_backends_and_die_with_the_session() {
        let reg = CancelRegistry::new();
        let (key, guard) = reg.register(4242, target(4242));
        let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        assert_eq!(pid, 4242, "the client sees the backend's pid");
        assert_ne!(key[4..], [1, 2, 3, 4], "and never the backend's secret");
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let now = Instant::now();
        let (found, t) = reg.lookup(ip, &cancel_packet(&key), now);
        assert_eq!(found, Lookup::Found);
        assert_eq!(t, Some(target(4242)));
        let mut wrong = key;
        wrong[7] ^= 1;
        assert_eq!(reg.lookup(ip, &cancel_packet(&wrong), now).0, Lookup::Unknown);
        assert_eq!(reg.targets(), vec![target(4242)]);
        drop(guard);
        assert_eq!(reg.lookup(ip, &cancel_packet(&key), now).0, Lookup::Unknown);
        assert!(reg.is_empty());
    }

    /// Two backends (two servers behind one proxy) can hand out the same
    /// pid: each session's key finds its own backend.
    #[test]
    fn one_pid_on_two_backends() {
        let reg = CancelRegistry::new();
        let (a, ga) = reg.register(77, (77, [1; 4]));
        let (b, gb) = reg.register(77, (77, [2; 4]));
        assert_eq!(a[..4], b[..4]);
        assert_ne!(a[4..], b[4..]);
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let now = Instant::now();
        assert_eq!(reg.lookup(ip, &cancel_packet(&a), now).1, Some((77, [1; 4])));
        assert_eq!(reg.lookup(ip, &cancel_packet(&b), now).1, Some((77, [2; 4])));
        assert_eq!(reg.len(), 2);
        drop(ga);
        assert_eq!(reg.lookup(ip, &cancel_packet(&a), now).0, Lookup::Unknown);
        assert_eq!(reg.lookup(ip, &cancel_packet(&b), now).1, Some((77, [2; 4])));
        drop(gb);
        assert!(reg.is_empty());
    }

    #[test]
    fn rate_limit_per_source() {
        let reg: CancelRegistry<()> = CancelRegistry::new();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let junk = [0u8; 16];
        let now = Instant::now();
        for _ in 0..CANCEL_BURST as usize {
            assert_eq!(reg.lookup(a, &junk, now).0, Lookup::Unknown);
        }
        assert_eq!(reg.lookup(a, &junk, now).0, Lookup::RateLimited);
        assert_eq!(
            reg.lookup(b, &junk, now).0,
            Lookup::Unknown,
            "other sources are unaffected"
        );
        let later = now + Duration::from_millis(250);
        assert_eq!(
            reg.lookup(a, &junk, later).0,
            Lookup::Unknown,
            "the bucket refills"
        );
    }
}
