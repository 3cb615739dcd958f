//! PROXY protocol v2 in front of everything else (`listen.proxy_protocol =
//! "required"`): a load balancer that terminates TCP (HAProxy
//! `send-proxy-v2`, AWS NLB, ...) says who the client is. Accepted only
//! from `listen.proxy_trusted` networks; read exactly (16 bytes, then the
//! length they announce, at most [`MAX_PAYLOAD`]) under the handshake
//! deadline, before the SSLRequest; parsed by the `proxy-header` crate.
//! LOCAL (the balancer's own health check) and UNSPEC keep the socket's
//! address. Never "optional": a client that could choose whether to send
//! a header could choose its address.

use std::net::SocketAddr;

use ipnet::IpNet;
use proxy_header::{ParseConfig, ProxyHeader};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{timeout_at, Instant};

/// Bytes after the fixed 16-byte part: addresses (at most 216 for
/// AF_UNIX) plus TLVs. HAProxy's and the clouds' TLVs fit many times over.
pub const MAX_PAYLOAD: usize = 2048;

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Why a connection's PROXY header was refused; `as_str` is the metric
/// label (`pgtls_proxy_protocol_total{result}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the connection does not come from a listen.proxy_trusted network")]
    Untrusted,
    #[error("not a PROXY protocol v2 header")]
    Invalid,
    #[error("PROXY header announces {0} bytes, more than {MAX_PAYLOAD}")]
    Oversized(usize),
    #[error("the PROXY header did not arrive in time")]
    Timeout,
    #[error("the connection closed inside the PROXY header")]
    Truncated,
}

impl Refused {
    pub fn as_str(&self) -> &'static str {
        match self {
            Refused::Untrusted => "untrusted",
            Refused::Invalid => "invalid",
            Refused::Oversized(_) => "oversized",
            Refused::Timeout => "timeout",
            Refused::Truncated => "truncated",
        }
    }
}

/// How a header was accepted, for the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// PROXY with the client's TCP address.
    Proxied(SocketAddr),
    /// LOCAL or UNSPEC: the socket's own peer stands.
    Local,
}

/// Checks `peer` against `trusted` and reads the header; returns the
/// client's address.
pub async fn read<S: AsyncRead + Unpin>(
    io: &mut S,
    peer: SocketAddr,
    trusted: &[IpNet],
    deadline: Instant,
) -> Result<Accepted, Refused> {
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        return Err(Refused::Untrusted);
    }
    timeout_at(deadline, read_header(io))
        .await
        .map_err(|_| Refused::Timeout)?
}

async fn read_header<S: AsyncRead + Unpin>(io: &mut S) -> Result<Accepted, Refused> {
    let mut buf = vec![0u8; 16];
    io.read_exact(&mut buf).await.map_err(|_| Refused::Truncated)?;
    if &buf[..12] != SIGNATURE || buf[12] >> 4 != 2 {
        return Err(Refused::Invalid);
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(Refused::Oversized(len));
    }
    buf.resize(16 + len, 0);
    io.read_exact(&mut buf[16..]).await.map_err(|_| Refused::Truncated)?;
    let config = ParseConfig {
        include_tlvs: false,
        allow_v1: false,
        allow_v2: true,
    };
    let (header, used) = ProxyHeader::parse(&buf, config).map_err(|_| Refused::Invalid)?;
    if used != buf.len() {
        return Err(Refused::Invalid);
    }
    match header.proxied_address() {
        None => Ok(Accepted::Local),
        Some(a) if a.protocol == proxy_header::Protocol::Stream => Ok(Accepted::Proxied(a.source)),
        Some(_) => Err(Refused::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn v4(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.push(command);
        h.push(family);
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    async fn feed(bytes: &[u8], trusted: &str) -> (Result<Accepted, Refused>, Vec<u8>) {
        let (mut ours, mut theirs) = tokio::io::duplex(70_000);
        theirs.write_all(bytes).await.expect("write");
        theirs.write_all(b"REST").await.expect("write");
        drop(theirs);
        let nets = vec![trusted.parse::<IpNet>().expect("net")];
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = read(&mut ours, peer, &nets, deadline).await;
        let mut rest = Vec::new();
        ours.read_to_end(&mut rest).await.expect("rest");
        (r, rest)
    }

    #[tokio::test]
    async fn reads_exactly_the_header() {
        let addrs = [203, 0, 113, 7, 127, 0, 0, 1, 0x9c, 0x40, 0x19, 0x28];
        let (r, rest) = feed(&v4(0x21, 0x11, &addrs), "127.0.0.0/8").await;
        assert_eq!(r, Ok(Accepted::Proxied("203.0.113.7:40000".parse().expect("addr"))));
        assert_eq!(rest, b"REST", "nothing past the header is read");
        let (r, _) = feed(&v4(0x20, 0x00, &[]), "127.0.0.0/8").await;
        assert_eq!(r, Ok(Accepted::Local));
        let mut tlv = addrs.to_vec();
        tlv.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']);
        let (r, rest) = feed(&v4(0x21, 0x11, &tlv), "127.0.0.0/8").await;
        assert!(matches!(r, Ok(Accepted::Proxied(_))));
        assert_eq!(rest, b"REST");
    }

    #[tokio::test]
    async fn refuses_what_it_must() {
        let addrs = [203, 0, 113, 7, 127, 0, 0, 1, 0x9c, 0x40, 0x19, 0x28];
        assert_eq!(feed(&v4(0x21, 0x11, &addrs), "10.0.0.0/8").await.0, Err(Refused::Untrusted));
        assert_eq!(feed(&v4(0x21, 0x11, &addrs)[..20], "127.0.0.0/8").await.0, Err(Refused::Truncated));
        let mut big = v4(0x21, 0x11, &addrs);
        big[14..16].copy_from_slice(&60_000u16.to_be_bytes());
        assert_eq!(feed(&big, "127.0.0.0/8").await.0, Err(Refused::Oversized(60_000)));
        assert_eq!(feed(b"\0\0\0\x08\x04\xd2\x16\x2f", "127.0.0.0/8").await.0, Err(Refused::Truncated));
        assert_eq!(feed(b"\0\0\0\x08\x04\xd2\x16\x2f0123456789", "127.0.0.0/8").await.0, Err(Refused::Invalid));
        assert_eq!(feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "127.0.0.0/8").await.0, Err(Refused::Invalid), "v1 is not accepted");
        assert_eq!(feed(&v4(0x21, 0x12, &addrs), "127.0.0.0/8").await.0, Err(Refused::Invalid), "UDP on a TCP listener");
        assert_eq!(feed(&v4(0x21, 0x11, &addrs[..8]), "127.0.0.0/8").await.0, Err(Refused::Invalid), "addresses cut short");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_balancer_runs_into_the_deadline() {
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let nets = vec!["127.0.0.0/8".parse::<IpNet>().expect("net")];
        let peer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let r = read(&mut ours, peer, &nets, Instant::now() + Duration::from_secs(10)).await;
        assert_eq!(r, Err(Refused::Timeout));
    }
}
