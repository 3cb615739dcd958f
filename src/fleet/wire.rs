//! The peer link's messages, inside TLS. One request per connection:
//!
//! ```text
//! server → client   Hello
//! client → server   Hello, then Request
//! Hello    = "PGTLSPR1" | replica id (u8) | instance (16 random bytes)
//! Request  = kind (u8: 0 probe, 1 cancel) | length (u16) | CancelRequest packet
//! ```
//! The server speaks first so that the client checks the replica id it
//! reached before sending anything; the instance (random per process)
//! tells a replica from itself and from a duplicate of its id. No reply:
//! a CancelRequest never gets one.

use tokio::io::{AsyncRead, AsyncReadExt};

const MAGIC: &[u8; 8] = b"PGTLSPR1";
pub const HELLO_LEN: usize = MAGIC.len() + 1 + 16;
/// The longest CancelRequest protocol 3.2 allows (12 + a 256-byte key).
pub const MAX_CANCEL: usize = 12 + 256;

/// Who is at either end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub replica: u8,
    pub instance: [u8; 16],
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = self.replica;
        b[9..].copy_from_slice(&self.instance);
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, WireError> {
        if &b[..8] != MAGIC {
            return Err(WireError::NotAPeer);
        }
        let mut instance = [0u8; 16];
        instance.copy_from_slice(&b[9..]);
        Ok(Hello {
            replica: b[8],
            instance,
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
    /// A client's CancelRequest, length word included.
    Cancel(Vec<u8>),
}

impl Request {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Request::Probe => out.extend_from_slice(&[0, 0, 0]),
            Request::Cancel(packet) => {
                out.push(1);
                // `Request::cancel` bounds the length.
                out.extend_from_slice(&(packet.len() as u16).to_be_bytes());
                out.extend_from_slice(packet);
            }
        }
    }

    /// A cancel request to send on; `None` when the packet is longer than
    /// any CancelRequest.
    pub fn cancel(packet: &[u8]) -> Option<Request> {
        (packet.len() <= MAX_CANCEL).then(|| Request::Cancel(packet.to_vec()))
    }

    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, WireError> {
        let mut head = [0u8; 3];
        r.read_exact(&mut head).await?;
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        match head[0] {
            0 if len == 0 => Ok(Request::Probe),
            1 if (16..=MAX_CANCEL).contains(&len) => {
                let mut packet = vec![0u8; len];
                r.read_exact(&mut packet).await?;
                Ok(Request::Cancel(packet))
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
        };
        let mut bytes = hello.encode().to_vec();
        Request::Probe.encode(&mut bytes);
        Request::cancel(&[1; 16]).expect("short").encode(&mut bytes);
        let mut r = &bytes[..];
        assert_eq!(Hello::read(&mut r).await.expect("hello"), hello);
        assert_eq!(Request::read(&mut r).await.expect("probe"), Request::Probe);
        assert_eq!(
            Request::read(&mut r).await.expect("cancel"),
            Request::Cancel(vec![1; 16])
        );
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_request() {
        assert!(Request::cancel(&[0; MAX_CANCEL + 1]).is_none());
        for bad in [&[2u8, 0, 0][..], &[1, 0, 15], &[1, 1, 13], &[0, 0, 1]] {
            let mut r = bad;
            assert!(Request::read(&mut r).await.is_err(), "{bad:?}");
        }
        let mut wrong = Hello {
            replica: 1,
            instance: [0; 16],
        }
        .encode();
        wrong[0] = b'X';
        assert!(matches!(Hello::decode(&wrong), Err(WireError::NotAPeer)));
    }
}
