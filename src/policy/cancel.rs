//! Proxy-issued cancel keys. Each client gets its own random BackendKeyData
//! (the backend's `K` is rewritten); the registry maps that key to what it
//! stands for (a target the caller defines: the backend's key and link,
//! [`crate::backend::cancel::CancelTarget`]). An entry lives exactly as
//! long as its session ([`Registration`] removes it on drop).
//!
//! A CancelRequest's key is looked up and its secret compared in constant
//! time; unknown keys are ignored silently, as PostgreSQL does; attempts
//! are rate-limited per source address. Forwarding is the backend's job.
//! The backend's real key never reaches the client.
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

use std::time::Instant;

use rand::Rng;
use tracing::debug;

/// Replica id placed in bits 30..24 of every issued pid.
pub const REPLICA_ID: i32 = 0;
const RANDOM_PID_BITS: i32 = 0x00ff_ffff;

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
    sessions: Mutex<HashMap<i32, Entry<T>>>,
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
}

impl<T> Drop for Registration<T> {
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

impl<T: Clone> CancelRegistry<T> {
    pub fn new() -> CancelRegistry<T> {
        CancelRegistry::default()
    }

    /// Issues a fresh proxy key for a target; the 8 bytes go to the client
    /// in place of the backend's.
    pub fn register(&self, target: T) -> ([u8; 8], Registration<T>) {
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

    /// Every registered target (to cancel all running queries at shutdown).
    pub fn targets(&self) -> Vec<T> {
        let map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(|e| e.target.clone()).collect()
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
        let (key, guard) = reg.register(target(4242));
        let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        assert!(pid > 0 && pid >> 24 == REPLICA_ID);
        assert_ne!(pid, 4242, "the backend pid is never handed out");
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let now = Instant::now();
        let (found, t) = reg.lookup(ip, &cancel_packet(&key), now);
        assert_eq!(found, Lookup::Found);
        assert_eq!(t, Some(target(4242)));
        let mut wrong = key;
        wrong[7] ^= 1;
        assert_eq!(
            reg.lookup(ip, &cancel_packet(&wrong), now).0,
            Lookup::Unknown
        );
        assert_eq!(reg.targets(), vec![target(4242)]);
        drop(guard);
        assert_eq!(reg.lookup(ip, &cancel_packet(&key), now).0, Lookup::Unknown);
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
