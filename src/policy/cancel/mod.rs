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
//! are rate-limited per source address. In a fleet the secret names the
//! replica that issued it, so that any replica can send the cancel on to
//! the right one ([`Lookup::Peer`]). Forwarding is the caller's job. The
//! backend's real key never reaches the client.
//!
//! Secret layouts (the pid is always the backend's own):
//! ```text
//! protocol 3.0, 4 bytes:  lone proxy  random (32 bits)
//!                         fleet       replica id (6 bits) | random (26 bits)
//! protocol 3.2, 32 bytes: replica id (1 byte; 0 for a lone proxy)
//!                         | random (15 bytes)
//!                         | HMAC-SHA-256(key, pid | first 16 bytes), first 16 bytes
//! ```
//! A 3.0 guess must match pid and secret: 2^26 secrets per pid in a fleet
//! (2^32 alone), with the per-source rate limit (20 at once, then 10 per
//! second) as the guard: about 39 days of guessing per pid and source
//! address for an even chance in a fleet. A guess sent through other
//! replicas meets the issuing replica's budget as well (peers send the
//! client's address with the request), so spreading guesses over the
//! fleet does not multiply the rate. A 3.2 key cannot be forged
//! without the fleet's key: the MAC is checked before anything else, so a
//! forged key is dropped by the first replica that sees it and never
//! forwarded.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use std::time::Instant;

use tracing::debug;

/// Per-source cancel budget: a burst, then a steady rate.
const CANCEL_BURST: f64 = 20.0;
const CANCEL_PER_SECOND: f64 = 10.0;
/// Source addresses tracked at once; a constant bound on what peers can
/// make the limiter hold.
const MAX_TRACKED_SOURCES: usize = 4096;
mod keys;

pub use keys::{ClientKey, KeyScheme, Secret, LONG_SECRET};
use keys::{request, Request};

struct Entry<T> {
    secret: Secret,
    target: T,
}

struct Inner<T> {
    scheme: KeyScheme,
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
        CancelRegistry::with_scheme(KeyScheme::lone())
    }
}

impl<T> CancelRegistry<T> {
    pub fn with_scheme(scheme: KeyScheme) -> CancelRegistry<T> {
        CancelRegistry(Arc::new(Inner {
            scheme,
            sessions: Mutex::default(),
            sources: Mutex::default(),
        }))
    }
}

/// Removes its key from the registry when the session ends.
pub struct Registration<T> {
    inner: Arc<Inner<T>>,
    pid: i32,
    secret: Secret,
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

/// What a CancelRequest's key stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    /// A session of this replica.
    Found(T),
    /// Issued by another replica of the fleet (its id): send it on.
    Peer(u8),
    /// No such session (or not a key of ours at all).
    Unknown,
    /// A 3.2 key whose MAC does not verify: made up, never sent on.
    Forged,
    /// Over the source's budget; not looked at.
    RateLimited,
}

impl<T> Lookup<T> {
    /// The label of `pgtls_cancel_requests_total` and the log.
    pub fn as_str(&self) -> &'static str {
        match self {
            Lookup::Found(_) => "found",
            Lookup::Peer(_) => "peer",
            Lookup::Unknown => "unknown",
            Lookup::Forged => "forged",
            Lookup::RateLimited => "rate_limited",
        }
    }
}

impl<T: Clone> CancelRegistry<T> {
    pub fn new() -> CancelRegistry<T> {
        CancelRegistry::default()
    }

    pub fn scheme(&self) -> &KeyScheme {
        &self.0.scheme
    }

    /// Issues the key for a session of backend `pid`: the backend's pid
    /// and a fresh secret of ours, 32 bytes when the client speaks
    /// protocol 3.2 (`long`), else 4; the key goes to the client in place
    /// of the backend's.
    pub fn register(&self, pid: i32, target: T, long: bool) -> (ClientKey, Registration<T>) {
        let mut rng = rand::rng();
        let scheme = &self.0.scheme;
        let mut map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        // Backend pids rarely repeat (one per route's server at most), so
        // room for one key: a default Vec would reserve four per session.
        let entries = map.entry(pid).or_insert_with(|| Vec::with_capacity(1));
        let secret = loop {
            let secret = if long {
                scheme.long(pid, &mut rng)
            } else {
                scheme.short(&mut rng)
            };
            if !entries.iter().any(|e| e.secret == secret) {
                break secret;
            }
        };
        entries.push(Entry { secret, target });
        (
            ClientKey { pid, secret },
            Registration {
                inner: self.0.clone(),
                pid,
                secret,
            },
        )
    }

    /// What a client's CancelRequest packet (length word included) stands
    /// for, after the per-source rate limit (at `now`).
    pub fn lookup(&self, source: IpAddr, packet: &[u8], now: Instant) -> Lookup<T> {
        if !self.allow(source, now) {
            return Lookup::RateLimited;
        }
        self.classify(packet, Lookup::Peer)
    }

    /// What a CancelRequest another replica sent on stands for: this
    /// replica's sessions only (a cancel travels one hop at most). The
    /// client (`source`) is rate-limited here too, so that guesses spread
    /// over every replica of a fleet still meet one budget: the issuing
    /// replica's.
    pub fn lookup_from_peer(&self, source: IpAddr, packet: &[u8], now: Instant) -> Lookup<T> {
        if !self.allow(source, now) {
            return Lookup::RateLimited;
        }
        self.classify(packet, |_| Lookup::Unknown)
    }

    /// Forged, another replica's (`foreign` decides), or looked up here.
    fn classify(&self, packet: &[u8], foreign: impl FnOnce(u8) -> Lookup<T>) -> Lookup<T> {
        let Some(req) = request(packet) else {
            return Lookup::Unknown;
        };
        if let Some(forged) = self.check(&req) {
            return forged;
        }
        match self.0.scheme.foreign(req.secret) {
            Some(id) => foreign(id),
            None => self.local(&req),
        }
    }

    /// `Some(Forged)` for a 3.2 key without our MAC.
    fn check(&self, req: &Request<'_>) -> Option<Lookup<T>> {
        (req.secret.len() == LONG_SECRET && !self.0.scheme.authentic(req.pid, req.secret))
            .then_some(Lookup::Forged)
    }

    fn local(&self, req: &Request<'_>) -> Lookup<T> {
        let map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let found = map.get(&req.pid).into_iter().flatten().find(|e| {
            subtle::ConstantTimeEq::ct_eq(e.secret.as_bytes(), req.secret).into()
        });
        match found {
            Some(entry) => Lookup::Found(entry.target.clone()),
            None => Lookup::Unknown,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stand-in for the backend key a proxy key stands for.
    fn target(pid: i32) -> (i32, [u8; 4]) {
        (pid, [1, 2, 3, 4])
    }

    fn cancel_packet(key: &ClientKey) -> Vec<u8> {
        let secret = key.secret.as_bytes();
        let mut p = (12 + secret.len() as i32).to_be_bytes().to_vec();
        p.extend_from_slice(&[0x04, 0xd2, 0x16, 0x2e]);
        p.extend_from_slice(&key.pid.to_be_bytes());
        p.extend_from_slice(secret);
        p
    }

    fn ip() -> IpAddr {
        "127.0.0.1".parse().expect("ip")
    }

    #[test]
    fn keys_map_to_backends_and_die_with_the_session() {
        let reg = CancelRegistry::new();
        let (key, guard) = reg.register(4242, target(4242), false);
        assert_eq!(key.pid, 4242, "the client sees the backend's pid");
        assert_eq!(key.secret.as_bytes().len(), 4);
        assert_ne!(key.secret.as_bytes(), [1, 2, 3, 4], "and never the backend's secret");
        assert_eq!(&key.message()[..9], &[b'K', 0, 0, 0, 12, 0, 0, 0x10, 0x92]);
        let now = Instant::now();
        assert_eq!(reg.lookup(ip(), &cancel_packet(&key), now), Lookup::Found(target(4242)));
        let mut wrong = cancel_packet(&key);
        wrong[15] ^= 1;
        assert_eq!(reg.lookup(ip(), &wrong, now), Lookup::Unknown);
        assert_eq!(reg.targets(), vec![target(4242)]);
        drop(guard);
        assert_eq!(reg.lookup(ip(), &cancel_packet(&key), now), Lookup::Unknown);
        assert!(reg.is_empty());
    }

    /// Two backends (two servers behind one proxy) can hand out the same
    /// pid: each session's key finds its own backend.
    #[test]
    fn one_pid_on_two_backends() {
        let reg = CancelRegistry::new();
        let (a, ga) = reg.register(77, (77, [1; 4]), false);
        let (b, gb) = reg.register(77, (77, [2; 4]), true);
        assert_eq!(a.pid, b.pid);
        let now = Instant::now();
        assert_eq!(reg.lookup(ip(), &cancel_packet(&a), now), Lookup::Found((77, [1; 4])));
        assert_eq!(reg.lookup(ip(), &cancel_packet(&b), now), Lookup::Found((77, [2; 4])));
        assert_eq!(reg.len(), 2);
        drop(ga);
        assert_eq!(reg.lookup(ip(), &cancel_packet(&a), now), Lookup::Unknown);
        assert_eq!(reg.lookup(ip(), &cancel_packet(&b), now), Lookup::Found((77, [2; 4])));
        drop(gb);
        assert!(reg.is_empty());
    }

    /// Protocol 3.2 keys: 32 bytes with a MAC; a changed byte anywhere
    /// (pid, replica id, random part, MAC) makes a forgery.
    #[test]
    fn long_keys_are_authenticated() {
        let reg = CancelRegistry::new();
        let (key, _guard) = reg.register(9, target(9), true);
        let packet = cancel_packet(&key);
        assert_eq!(packet.len(), 44);
        assert_eq!(key.message().len(), 1 + 4 + 4 + 32);
        let now = Instant::now();
        assert_eq!(reg.lookup(ip(), &packet, now), Lookup::Found(target(9)));
        for at in [11, 12, 20, 30, 43] {
            let mut forged = packet.clone();
            forged[at] ^= 0x40;
            assert_eq!(reg.lookup(ip(), &forged, now), Lookup::Forged, "byte {at}");
        }
        let mut other_length = packet.clone();
        other_length.push(0);
        other_length[3] += 1;
        assert_eq!(reg.lookup(ip(), &other_length, now), Lookup::Unknown);
    }

    /// In a fleet the key names its replica: the others send it on (3.0
    /// as it is; 3.2 only when its MAC verifies under the shared key).
    #[test]
    fn fleet_keys_name_their_replica() {
        let a: CancelRegistry<(i32, [u8; 4])> =
            CancelRegistry::with_scheme(KeyScheme::fleet(5, b"shared", None));
        let b: CancelRegistry<(i32, [u8; 4])> =
            CancelRegistry::with_scheme(KeyScheme::fleet(63, b"shared", None));
        let now = Instant::now();
        for long in [false, true] {
            let (key, _g) = a.register(100, target(100), long);
            let packet = cancel_packet(&key);
            assert_eq!(a.lookup(ip(), &packet, now), Lookup::Found(target(100)));
            assert_eq!(b.lookup(ip(), &packet, now), Lookup::Peer(5), "long: {long}");
            assert_eq!(a.lookup_from_peer(ip(), &packet, now), Lookup::Found(target(100)));
            assert_eq!(b.lookup_from_peer(ip(), &packet, now), Lookup::Unknown, "one hop only");
        }
        let (key, _g) = b.register(100, target(100), false);
        assert_eq!(key.secret.as_bytes()[0] >> 2, 63);
        let (key, _g) = b.register(100, target(100), true);
        let mut forged = cancel_packet(&key);
        forged[12] = 5;
        assert_eq!(b.lookup(ip(), &forged, now), Lookup::Forged, "not sent on");
        let stranger: CancelRegistry<(i32, [u8; 4])> =
            CancelRegistry::with_scheme(KeyScheme::fleet(5, b"another key", None));
        assert_eq!(stranger.lookup(ip(), &cancel_packet(&key), now), Lookup::Forged);
        // Rotation: a replica that accepts the other key verifies its keys.
        let rotated: CancelRegistry<(i32, [u8; 4])> =
            CancelRegistry::with_scheme(KeyScheme::fleet(5, b"new", Some(b"shared")));
        assert_eq!(rotated.lookup(ip(), &cancel_packet(&key), now), Lookup::Peer(63));
    }

    /// Guesses sent through every replica of a fleet meet the issuing
    /// replica's budget for their client.
    #[test]
    fn peers_rate_limit_the_client_too() {
        let reg: CancelRegistry<()> = CancelRegistry::with_scheme(KeyScheme::fleet(1, b"k", None));
        let now = Instant::now();
        let mut guess = [0u8; 16];
        guess[12] = 1 << 2;
        for _ in 0..CANCEL_BURST as usize {
            assert_eq!(reg.lookup_from_peer(ip(), &guess, now), Lookup::Unknown);
        }
        assert_eq!(reg.lookup_from_peer(ip(), &guess, now), Lookup::RateLimited);
    }

    #[test]
    fn rate_limit_per_source() {
        let reg: CancelRegistry<()> = CancelRegistry::new();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let junk = [0u8; 16];
        let now = Instant::now();
        for _ in 0..CANCEL_BURST as usize {
            assert_eq!(reg.lookup(a, &junk, now), Lookup::Unknown);
        }
        assert_eq!(reg.lookup(a, &junk, now), Lookup::RateLimited);
        assert_eq!(
            reg.lookup(b, &junk, now),
            Lookup::Unknown,
            "other sources are unaffected"
        );
        let later = now + Duration::from_millis(250);
        assert_eq!(reg.lookup(a, &junk, later), Lookup::Unknown, "the bucket refills");
    }
}
