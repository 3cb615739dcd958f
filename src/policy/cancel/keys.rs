//! The keys themselves: their layouts (protocol 3.0 and 3.2, lone proxy or
//! fleet replica; see the table in [`super`]), how a replica makes them,
//! checks a 3.2 key's MAC, tells whose a key is, and takes a
//! CancelRequest's key apart.

use rand::Rng;
use ring::hmac;

/// Replica ids a 3.0 secret can carry (its top 6 bits).
pub const MAX_REPLICAS: u8 = 64;
/// Bytes of a protocol 3.2 secret issued here (PostgreSQL 18 issues 32 too).
pub const LONG_SECRET: usize = 32;
/// Bytes of the 3.2 secret the MAC covers (with the pid), and of the MAC.
const MAC_COVERS: usize = 16;

/// A secret of ours: 4 bytes (protocol 3.0) or [`LONG_SECRET`] (3.2).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret {
    len: u8,
    bytes: [u8; LONG_SECRET],
}

impl Secret {
    fn new(bytes: &[u8]) -> Secret {
        let mut s = Secret {
            len: bytes.len() as u8,
            bytes: [0; LONG_SECRET],
        };
        s.bytes[..bytes.len()].copy_from_slice(bytes);
        s
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// The key a client gets in BackendKeyData.
#[derive(Clone, Copy)]
pub struct ClientKey {
    pub pid: i32,
    pub secret: Secret,
}

impl ClientKey {
    /// A key with a given secret of 4 or [`LONG_SECRET`] bytes.
    pub fn new(pid: i32, secret: &[u8]) -> Option<ClientKey> {
        matches!(secret.len(), 4 | LONG_SECRET).then(|| ClientKey {
            pid,
            secret: Secret::new(secret),
        })
    }

    /// The BackendKeyData message ('K') that carries it.
    pub fn message(&self) -> Vec<u8> {
        let secret = self.secret.as_bytes();
        let mut m = Vec::with_capacity(9 + secret.len());
        m.push(b'K');
        m.extend_from_slice(&(8 + secret.len() as i32).to_be_bytes());
        m.extend_from_slice(&self.pid.to_be_bytes());
        m.extend_from_slice(secret);
        m
    }
}

/// How keys are made: which replica this is, and the key of 3.2 MACs.
pub struct KeyScheme {
    /// This replica's id (below [`MAX_REPLICAS`]); `None` for a lone proxy.
    replica: Option<u8>,
    mac: hmac::Key,
    /// A second key whose 3.2 keys verify (never used to issue): the next
    /// one before a rotation, the previous one after it.
    accepted: Option<hmac::Key>,
}

impl KeyScheme {
    /// A lone proxy: every 3.0 bit random, a per-process MAC key.
    pub fn lone() -> KeyScheme {
        let key: [u8; 32] = rand::random();
        KeyScheme {
            replica: None,
            mac: hmac::Key::new(hmac::HMAC_SHA256, &key),
            accepted: None,
        }
    }

    /// A fleet replica; every replica must share `mac_key` (and, during a
    /// rotation, accept the other key: `accepted`).
    pub fn fleet(replica: u8, mac_key: &[u8], accepted: Option<&[u8]>) -> KeyScheme {
        assert!(replica < MAX_REPLICAS, "replica ids are checked at load");
        KeyScheme {
            replica: Some(replica),
            mac: hmac::Key::new(hmac::HMAC_SHA256, mac_key),
            accepted: accepted.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k)),
        }
    }

    pub fn replica(&self) -> Option<u8> {
        self.replica
    }

    /// Ids of the MAC keys (current, accepted or zero) that replicas
    /// compare, so that a fleet whose replicas disagree on the key says so:
    /// a MAC of a fixed text, which reveals nothing of the key.
    pub fn key_ids(&self) -> [[u8; 8]; 2] {
        let id = |k: &hmac::Key| {
            let mut out = [0u8; 8];
            out.copy_from_slice(&hmac::sign(k, b"pg-tls-proxy fleet cancel key id").as_ref()[..8]);
            out
        };
        [id(&self.mac), self.accepted.as_ref().map_or([0; 8], id)]
    }

    pub(super) fn short(&self, rng: &mut impl Rng) -> Secret {
        let mut s: [u8; 4] = rng.random();
        if let Some(id) = self.replica {
            s[0] = (id << 2) | (s[0] & 0b11);
        }
        Secret::new(&s)
    }

    pub(super) fn long(&self, pid: i32, rng: &mut impl Rng) -> Secret {
        let mut s = [0u8; LONG_SECRET];
        s[0] = self.replica.unwrap_or(0);
        rng.fill(&mut s[1..MAC_COVERS]);
        let tag = tag(&self.mac, pid, &s[..MAC_COVERS]);
        s[MAC_COVERS..].copy_from_slice(&tag.as_ref()[..LONG_SECRET - MAC_COVERS]);
        Secret::new(&s)
    }

    /// Whether a 3.2 secret carries our MAC (constant time), under the
    /// current key or the accepted one.
    pub(super) fn authentic(&self, pid: i32, secret: &[u8]) -> bool {
        std::iter::once(&self.mac)
            .chain(&self.accepted)
            .any(|key| {
                let tag = tag(key, pid, &secret[..MAC_COVERS]);
                subtle::ConstantTimeEq::ct_eq(
                    &tag.as_ref()[..LONG_SECRET - MAC_COVERS],
                    &secret[MAC_COVERS..],
                )
                .into()
            })
    }

    /// The replica a key names, when it is not this one.
    pub(super) fn foreign(&self, secret: &[u8]) -> Option<u8> {
        let me = self.replica?;
        let id = match secret.len() {
            4 => secret[0] >> 2,
            _ => secret[0],
        };
        (id != me).then_some(id)
    }
}

fn tag(key: &hmac::Key, pid: i32, covered: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&pid.to_be_bytes());
    ctx.update(covered);
    ctx.sign()
}

/// A CancelRequest's key, taken apart.
pub(super) struct Request<'a> {
    pub(super) pid: i32,
    pub(super) secret: &'a [u8],
}

/// Splits a CancelRequest packet (length word included): 16 bytes
/// (protocol 3.0) or 12 + [`LONG_SECRET`] (a 3.2 key of ours).
pub(super) fn request(packet: &[u8]) -> Option<Request<'_>> {
    if packet.len() != 16 && packet.len() != 12 + LONG_SECRET {
        return None;
    }
    Some(Request {
        pid: i32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]),
        secret: &packet[12..],
    })
}
