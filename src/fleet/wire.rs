//! The peer link's messages, inside TLS. One request per connection:
//!
//! ```text
//! server → client   Hello
//! client → server   Hello, then Request
//! Hello    = "PGTLSPR1" | replica id (u8) | instance (16 random bytes)
//!            | started (u64, Unix milliseconds)
//!            | cancel key ids (8 bytes: current, 8 bytes: accepted or zero)
//! Request  = kind (u8: 0 probe, 1 cancel) | client address (16 bytes, IPv6
//!            or IPv4-mapped; zero for a probe) | length (u16) | CancelRequest
//! ```
//! The server speaks first so that the client checks the replica id it
//! reached before sending anything; the instance (random per process)
//! tells a replica from itself and from a duplicate of its id, and the
//! start time which of two duplicates came first; the key ids tell
//! replicas whose `fleet.cancel_key` differs (their 3.2 keys would be
//! refused by each other as forged). The client's address
//! travels with its cancel so that the issuing replica rate-limits it as
//! its own. No reply: a CancelRequest never gets one.

use std::net::{IpAddr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt};

const MAGIC: &[u8; 8] = b"PGTLSPR1";
pub const HELLO_LEN: usize = MAGIC.len() + 1 + 16 + 8 + 16;
/// The longest CancelRequest protocol 3.2 allows (12 + a 256-byte key).
pub const MAX_CANCEL: usize = 12 + 256;

/// Who is at either end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub replica: u8,
    pub instance: [u8; 16],
    /// When the process started (Unix milliseconds).
    pub started: u64,
    /// Ids of the cancel key and of the accepted one (zero: none).
    pub keys: [[u8; 8]; 2],
}

impl Hello {
    /// Of two replicas with one id, the one that keeps it: the first
    /// started (the instance breaks a tie).
    pub fn precedes(&self, other: &Hello) -> bool {
        (self.started, self.instance) < (other.started, other.instance)
    }

    /// Whether the two replicas can check each other's 3.2 keys: each
    /// one's current key is among the other's.
    pub fn shares_keys(&self, other: &Hello) -> bool {
        let knows = |a: &Hello, b: &Hello| b.keys.iter().any(|k| *k == a.keys[0]);
        knows(self, other) && knows(other, self)
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = self.replica;
        b[9..25].copy_from_slice(&self.instance);
        b[25..33].copy_from_slice(&self.started.to_be_bytes());
        b[33..41].copy_from_slice(&self.keys[0]);
        b[41..].copy_from_slice(&self.keys[1]);
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, WireError> {
        if &b[..8] != MAGIC {
            return Err(WireError::NotAPeer);
        }
        let mut instance = [0u8; 16];
        instance.copy_from_slice(&b[9..25]);
        let eight = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            x
        };
        Ok(Hello {
            replica: b[8],
            instance,
            started: u64::from_be_bytes(eight(25)),
            keys: [eight(33), eight(41)],
        })
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, WireError> {
        let mut b = [0u8; HELLO_LEN];
        r.read_exact(&mut b).await?;
        Hello::decode(&b)
    }
}

/// What a client asks of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Only the hellos: who is there (start-up and refresh).
    Probe,
    /// A client's CancelRequest (length word included) and the client's
    /// address.
    Cancel { source: IpAddr, packet: Vec<u8> },
}

/// kind + address + length.
const REQUEST_HEAD: usize = 1 + 16 + 2;

impl Request {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Request::Probe => out.extend_from_slice(&[0; REQUEST_HEAD]),
            Request::Cancel { source, packet } => {
                out.push(1);
                let v6 = match source {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => *v6,
                };
                out.extend_from_slice(&v6.octets());
                // `Request::cancel` bounds the length.
                out.extend_from_slice(&(packet.len() as u16).to_be_bytes());
                out.extend_from_slice(packet);
            }
        }
    }

    /// A cancel request to send on; `None` when the packet is longer than
    /// any CancelRequest.
    pub fn cancel(source: IpAddr, packet: &[u8]) -> Option<Request> {
        (packet.len() <= MAX_CANCEL).then(|| Request::Cancel {
            source,
            packet: packet.to_vec(),
        })
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, WireError> {
        let mut head = [0u8; REQUEST_HEAD];
        r.read_exact(&mut head).await?;
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(&head[1..17]);
        let source = Ipv6Addr::from(v6);
        let len = usize::from(u16::from_be_bytes([head[17], head[18]]));
        match head[0] {
            0 if len == 0 && source.is_unspecified() => Ok(Request::Probe),
            1 if (16..=MAX_CANCEL).contains(&len) => {
                let mut packet = vec![0u8; len];
                r.read_exact(&mut packet).await?;
                let source = match source.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(source),
                };
                Ok(Request::Cancel { source, packet })
            }
            _ => Err(WireError::Malformed),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("not a pg-tls-proxy peer")]
    NotAPeer,
    #[error("malformed peer request")]
    Malformed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips() {
        let hello = Hello {
            replica: 7,
            instance: [9; 16],
            started: 1_700_000_000_123,
            keys: [[1; 8], [2; 8]],
        };
        let v4: IpAddr = "10.1.2.3".parse().expect("ip");
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        let mut bytes = hello.encode().to_vec();
        Request::Probe.encode(&mut bytes);
        Request::cancel(v4, &[1; 16]).expect("short").encode(&mut bytes);
        Request::cancel(v6, &[2; 44]).expect("long").encode(&mut bytes);
        let mut r = &bytes[..];
        assert_eq!(Hello::read(&mut r).await.expect("hello"), hello);
        assert_eq!(Request::read(&mut r).await.expect("probe"), Request::Probe);
        for (source, packet) in [(v4, vec![1; 16]), (v6, vec![2; 44])] {
            assert_eq!(
                Request::read(&mut r).await.expect("cancel"),
                Request::Cancel { source, packet }
            );
        }
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_request() {
        let any: IpAddr = "127.0.0.1".parse().expect("ip");
        assert!(Request::cancel(any, &[0; MAX_CANCEL + 1]).is_none());
        let head = |kind: u8, len: u16| {
            let mut b = vec![kind];
            b.extend_from_slice(&[0; 16]);
            b.extend_from_slice(&len.to_be_bytes());
            b
        };
        for bad in [head(2, 0), head(1, 15), head(1, 269), head(0, 1)] {
            let mut r = &bad[..];
            assert!(Request::read(&mut r).await.is_err(), "{bad:?}");
        }
        let mut wrong = Hello {
            replica: 1,
            instance: [0; 16],
            started: 0,
            keys: [[0; 8]; 2],
        }
        .encode();
        wrong[0] = b'X';
        assert!(matches!(Hello::decode(&wrong), Err(WireError::NotAPeer)));
    }

    #[test]
    fn the_first_started_keeps_the_id() {
        let a = Hello {
            replica: 1,
            instance: [1; 16],
            started: 5,
            keys: [[1; 8], [0; 8]],
        };
        let b = Hello { started: 6, ..a };
        let c = Hello { instance: [2; 16], ..a };
        assert!(a.precedes(&b) && !b.precedes(&a));
        assert!(a.precedes(&c) && !c.precedes(&a), "a tie goes by instance");
    }

    #[test]
    fn key_ids_through_a_rotation() {
        let old = |keys| Hello {
            replica: 1,
            instance: [1; 16],
            started: 5,
            keys,
        };
        let (k1, k2, none) = ([1; 8], [2; 8], [0; 8]);
        assert!(old([k1, none]).shares_keys(&old([k1, none])));
        assert!(!old([k1, none]).shares_keys(&old([k2, none])));
        // Step 1: replicas accept the next key while still issuing with k1.
        assert!(old([k1, none]).shares_keys(&old([k1, k2])));
        // Step 2: replicas issue with k2 and accept k1.
        assert!(old([k1, k2]).shares_keys(&old([k2, k1])));
        // Skipping step 1 leaves a replica that cannot check k2's keys.
        assert!(!old([k1, none]).shares_keys(&old([k2, k1])));
    }
}
