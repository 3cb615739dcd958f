//! Pre-startup packets (length + code): SSLRequest, GSSENCRequest,
//! CancelRequest and the StartupMessage, read one at a time and nothing
//! more, and what a startup asks for as PostgreSQL will read it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::messages::startup::{GssEncRequest, SslRequest, Startup};
use pgwire::messages::{DecodeContext, Message};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{ProtocolError, ReadError, Replication};

/// Largest startup packet body PostgreSQL accepts
/// (`MAX_STARTUP_PACKET_LENGTH`, src/include/libpq/pqcomm.h); the 4-byte
/// length word itself is not counted, exactly as in `ProcessStartupPacket`.
pub const MAX_STARTUP_PACKET_LENGTH: usize = 10_000;

/// `CANCEL_REQUEST_CODE` (pqcomm.h): 1234 << 16 | 5678.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// What arrived as a pre-startup packet.
#[derive(Debug)]
pub enum Packet {
    SslRequest,
    GssEncRequest,
    /// The whole packet, length word included, for forwarding unchanged.
    Cancel(Bytes),
    Startup(StartupPacket),
}

/// A parsed StartupMessage plus the raw bytes it arrived as.
#[derive(Debug)]
pub struct StartupPacket {
    pub raw: Bytes,
    pub minor: u16,
    pub message: Startup,
}

/// The newest protocol version the proxy speaks with clients: 3.2
/// (PostgreSQL 18), which differs from 3.0 only in the cancel key's length.
/// Backends are always spoken to in 3.0: the proxy issues the client's key
/// itself, so the two legs need not agree.
pub const LATEST_MINOR: u16 = 2;

/// PostgreSQL keeps names to `NAMEDATALEN - 1` bytes (pg_config_manual.h)
/// and silently truncates longer ones in `ProcessStartupPacket`.
pub const NAMEDATALEN: usize = 64;

impl StartupPacket {
    /// The user as sent; `None` when absent or empty (PostgreSQL refuses
    /// both: "no PostgreSQL user name specified in startup packet").
    pub fn user(&self) -> Option<&str> {
        self.message
            .parameters
            .get("user")
            .map(String::as_str)
            .filter(|u| !u.is_empty())
    }

    /// The database as PostgreSQL resolves it: absent or empty means the
    /// user name.
    pub fn database(&self) -> Option<&str> {
        self.message
            .parameters
            .get("database")
            .map(String::as_str)
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }

    /// The role, database and connection kind PostgreSQL will actually
    /// use, for access decisions: names truncated as PostgreSQL truncates
    /// them (a 65-byte name must not pass a rule as itself and log in as
    /// its 63-byte prefix); a physical walsender is checked as database
    /// "replication", as pg_hba does, and a logical one as its database.
    pub fn effective_names(&self) -> Result<Names, NamesError> {
        let user = truncate_name(self.user().ok_or(NamesError::NoUser)?);
        let replication = match self.message.parameters.get("replication") {
            None => Replication::None,
            Some(v) => {
                Replication::parse(v).ok_or_else(|| NamesError::InvalidReplication(v.clone()))?
            }
        };
        let database = match replication {
            Replication::Physical => "replication".to_string(),
            _ => truncate_name(self.database().unwrap_or_default()),
        };
        Ok(Names {
            user,
            database,
            replication,
        })
    }

    /// The protocol version the client gets, as PostgreSQL 18 decides it:
    /// what it asked for, down to 3.2 (3.1 is accepted as it is, with a
    /// 3.0 key).
    pub fn client_minor(&self) -> u16 {
        self.minor.min(LATEST_MINOR)
    }

    /// Whether the client's cancel key is a 3.2 one (variable length; the
    /// proxy's are 32 bytes, as PostgreSQL 18's).
    pub fn long_cancel_key(&self) -> bool {
        self.client_minor() >= 2
    }

    /// `_pq_.` protocol options the client asked for (none are supported).
    pub fn protocol_options(&self) -> Vec<String> {
        self.message
            .parameters
            .keys()
            .filter(|k| k.starts_with("_pq_."))
            .cloned()
            .collect()
    }

    /// The packet to send to a backend that speaks protocol 3.0: the raw
    /// bytes when nothing needs negotiating, otherwise a 3.0 startup
    /// without `_pq_.` options (what the client agreed to once we sent it
    /// NegotiateProtocolVersion). Built from the bytes received, never
    /// from pgwire's decoded map: that one is lossy for non-UTF-8 values
    /// (`application_name=caf\xe9` would reach the backend as U+FFFD) and
    /// drops repeated keys, which PostgreSQL reads in order.
    pub fn for_backend(&self) -> Bytes {
        if self.minor == 0 && !self.has_protocol_options() {
            return self.raw.clone();
        }
        let mut out = BytesMut::with_capacity(self.raw.len());
        out.put_i32(0);
        out.put_i32(Startup::PROTOCOL_VERSION_3_0);
        let mut rest = &self.raw[8..];
        // `parse_startup` checked the layout: pairs, then one NUL.
        while let Some(k) = rest.iter().position(|&b| b == 0).filter(|&k| k > 0) {
            let v = rest[k + 1..].iter().position(|&b| b == 0).unwrap_or(0);
            let pair = &rest[..k + 1 + v + 1];
            if !rest.starts_with(b"_pq_.") {
                out.extend_from_slice(pair);
            }
            rest = &rest[pair.len()..];
        }
        out.put_u8(0);
        let len = out.len() as i32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        out.freeze()
    }

    fn has_protocol_options(&self) -> bool {
        self.message
            .parameters
            .keys()
            .any(|k| k.starts_with("_pq_."))
    }
}

/// What a startup asks for, as PostgreSQL will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub user: String,
    pub database: String,
    pub replication: Replication,
}

/// Why a startup names nothing PostgreSQL would accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamesError {
    /// Absent or empty `user`.
    NoUser,
    /// A `replication` value PostgreSQL refuses (it answers FATAL 22023).
    InvalidReplication(String),
}

/// Reads exactly one pre-startup packet and nothing more (cancel-safe only
/// in the sense that dropping it drops the connection's framing: callers
/// run it under a deadline and close on expiry).
pub async fn read_packet<R: AsyncRead + Unpin>(io: &mut R) -> Result<Packet, ReadError> {
    let len = io.read_i32().await? as i64;
    let body_len = len - 4;
    if body_len < 4 || body_len > MAX_STARTUP_PACKET_LENGTH as i64 {
        return Err(ProtocolError::StartupLength.into());
    }
    let mut raw = BytesMut::with_capacity(len as usize);
    raw.put_i32(len as i32);
    raw.resize(len as usize, 0);
    io.read_exact(&mut raw[4..]).await?;
    parse_packet(raw)
}

/// Classifies a whole packet (length word included).
pub fn parse_packet(raw: BytesMut) -> Result<Packet, ReadError> {
    if raw.len() < 8 {
        return Err(ProtocolError::StartupLength.into());
    }
    let code = (&raw[4..8]).get_i32();
    let len = raw.len();
    match code {
        SslRequest::BODY_MAGIC_NUMBER if len == SslRequest::BODY_SIZE => Ok(Packet::SslRequest),
        GssEncRequest::BODY_MAGIC_NUMBER if len == GssEncRequest::BODY_SIZE => {
            Ok(Packet::GssEncRequest)
        }
        // Protocol 3.2 allows secrets up to 256 bytes; 3.0 uses 4.
        CANCEL_REQUEST_CODE if (16..=12 + 256).contains(&len) => Ok(Packet::Cancel(raw.freeze())),
        SslRequest::BODY_MAGIC_NUMBER | GssEncRequest::BODY_MAGIC_NUMBER | CANCEL_REQUEST_CODE => {
            Err(ProtocolError::Malformed("negotiation request").into())
        }
        _ => parse_startup(raw),
    }
}

fn parse_startup(raw: BytesMut) -> Result<Packet, ReadError> {
    let major = (&raw[4..6]).get_u16();
    let minor = (&raw[6..8]).get_u16();
    if major != 3 {
        return Err(ProtocolError::UnsupportedVersion(major, minor).into());
    }
    if !pairs_well_formed(&raw[8..]) {
        return Err(ProtocolError::Malformed("startup packet").into());
    }
    if !names_are_utf8(&raw[8..]) {
        return Err(
            ProtocolError::Malformed("startup packet: user and database must be UTF-8").into(),
        );
    }
    let full_len = raw.len();
    let mut body = raw.clone();
    body.advance(4);
    let message = Startup::decode_body(&mut body, full_len, &DecodeContext::default())
        .map_err(|_| ProtocolError::Malformed("startup packet"))?;
    Ok(Packet::Startup(StartupPacket {
        raw: raw.freeze(),
        minor,
        message,
    }))
}

/// Clips to `NAMEDATALEN - 1` bytes on a character boundary (pg_mbcliplen).
pub fn truncate_name(name: &str) -> String {
    let mut end = name.len().min(NAMEDATALEN - 1);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// The user and database values must be UTF-8: access rules compare
/// text, and a lossy decoding would let two different byte strings look
/// alike to the rules while the backend sees the raw bytes.
fn names_are_utf8(mut rest: &[u8]) -> bool {
    while let Some(end) = rest.iter().position(|&b| b == 0) {
        let key = &rest[..end];
        rest = &rest[end + 1..];
        let Some(vend) = rest.iter().position(|&b| b == 0) else {
            return true;
        };
        if (key == b"user" || key == b"database") && std::str::from_utf8(&rest[..vend]).is_err() {
            return false;
        }
        rest = &rest[vend + 1..];
    }
    true
}

/// Mirrors `ProcessStartupPacket`: name/value C strings, then one empty
/// name as the packet's last byte ("expected terminator as last byte").
fn pairs_well_formed(mut rest: &[u8]) -> bool {
    loop {
        match rest {
            [0] => return true,
            [] | [0, ..] => return false,
            _ => {}
        }
        for _ in 0..2 {
            match rest.iter().position(|&b| b == 0) {
                Some(end) => rest = &rest[end + 1..],
                None => return false,
            }
        }
    }
}

/// Encodes a StartupMessage: version, then name/value C strings and the
/// terminating empty name. The proxy's auth_query link, the tests and the
/// benches build their startups with it (one encoder, not one per harness).
pub fn encode_startup(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::NamesError;
    use encode_startup as startup_bytes;

    #[tokio::test]
    async fn reads_startup_and_nothing_more() {
        let mut bytes = startup_bytes(196608, &[("user", "alice"), ("database", "db")]);
        bytes.extend_from_slice(b"trailing");
        let mut cursor = std::io::Cursor::new(bytes);
        let Packet::Startup(s) = read_packet(&mut cursor).await.expect("startup") else {
            panic!("not a startup")
        };
        assert_eq!(s.user(), Some("alice"));
        assert_eq!(s.database(), Some("db"));
        let mut rest = Vec::new();
        cursor.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"trailing");
    }

    #[tokio::test]
    async fn oversized_and_tiny_lengths_refused() {
        for len in [10_005i32, 7, -1] {
            let mut cursor = std::io::Cursor::new(len.to_be_bytes().to_vec());
            let err = read_packet(&mut cursor).await.expect_err("must fail");
            assert!(
                matches!(err, ReadError::Protocol(ProtocolError::StartupLength)),
                "{len}"
            );
        }
    }

    #[tokio::test]
    async fn classifies_requests() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let mut c = std::io::Cursor::new(ssl.to_vec());
        assert!(matches!(read_packet(&mut c).await, Ok(Packet::SslRequest)));
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        let mut c = std::io::Cursor::new(gss.to_vec());
        assert!(matches!(
            read_packet(&mut c).await,
            Ok(Packet::GssEncRequest)
        ));
        let mut cancel = vec![0, 0, 0, 16];
        cancel.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        cancel.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
        let mut c = std::io::Cursor::new(cancel);
        assert!(matches!(read_packet(&mut c).await, Ok(Packet::Cancel(_))));
    }

    #[tokio::test]
    async fn version_and_options() {
        let mut c = std::io::Cursor::new(startup_bytes(2 << 16, &[("user", "a")]));
        let err = read_packet(&mut c).await.expect_err("must fail");
        assert!(matches!(
            err,
            ReadError::Protocol(ProtocolError::UnsupportedVersion(2, 0))
        ));
        let raw = startup_bytes(196610, &[("user", "a"), ("_pq_.x", "1")]);
        let mut c = std::io::Cursor::new(raw);
        let Ok(Packet::Startup(s)) = read_packet(&mut c).await else {
            panic!()
        };
        assert_eq!(s.minor, 2);
        assert_eq!(s.protocol_options(), vec!["_pq_.x".to_string()]);
        let fwd = s.for_backend();
        assert_eq!(&fwd[4..8], &196608i32.to_be_bytes());
        assert!(!fwd.windows(5).any(|w| w == b"_pq_."));
    }

    #[tokio::test]
    async fn effective_names_follow_postgresql() {
        let long = "a".repeat(70);
        let raw = startup_bytes(196608, &[("user", &long), ("database", "")]);
        let Ok(Packet::Startup(s)) = read_packet(&mut std::io::Cursor::new(raw)).await else {
            panic!()
        };
        let names = s.effective_names().expect("names");
        assert_eq!(names.user.len(), 63);
        assert_eq!(
            names.database, names.user,
            "an empty database means the user"
        );
        let raw = startup_bytes(
            196608,
            &[("user", "r"), ("database", "app"), ("replication", "true")],
        );
        let Ok(Packet::Startup(s)) = read_packet(&mut std::io::Cursor::new(raw)).await else {
            panic!()
        };
        assert_eq!(s.effective_names().expect("names").database, "replication");
        assert_eq!(
            truncate_name(&"é".repeat(40)).len(),
            62,
            "clipped on a character boundary"
        );
        let raw = startup_bytes(196608, &[("user", "")]);
        let Ok(Packet::Startup(s)) = read_packet(&mut std::io::Cursor::new(raw)).await else {
            panic!()
        };
        assert_eq!(
            s.effective_names(),
            Err(NamesError::NoUser),
            "an empty user is no user"
        );
    }

    #[tokio::test]
    async fn non_utf8_names_refused() {
        let mut raw = startup_bytes(196608, &[("user", "ab")]);
        let at = raw.iter().position(|&b| b == b'a').expect("a");
        raw[at] = 0xff;
        assert!(matches!(
            read_packet(&mut std::io::Cursor::new(raw)).await,
            Err(ReadError::Protocol(ProtocolError::Malformed(_)))
        ));
    }

    #[tokio::test]
    async fn malformed_startup_without_terminator() {
        let mut raw = startup_bytes(196608, &[("user", "a")]);
        raw.pop();
        let len = raw.len() as i32;
        raw[..4].copy_from_slice(&len.to_be_bytes());
        let mut c = std::io::Cursor::new(raw);
        assert!(matches!(
            read_packet(&mut c).await,
            Err(ReadError::Protocol(ProtocolError::Malformed(_)))
        ));
    }

    #[tokio::test]
    async fn replication_startups_are_checked_as_walsenders() {
        let names = |params: &[(&str, &str)]| {
            let raw = startup_bytes(196608, params);
            let Ok(Packet::Startup(s)) = parse_packet(BytesMut::from(&raw[..])) else {
                panic!("startup")
            };
            s.effective_names()
        };
        for v in ["t", "y", "TRU", "ye", "on", "1"] {
            let n =
                names(&[("user", "r"), ("database", "bench"), ("replication", v)]).expect("names");
            assert_eq!(n.database, "replication", "{v}");
            assert_eq!(n.replication, Replication::Physical, "{v}");
        }
        let n = names(&[
            ("user", "r"),
            ("database", "bench"),
            ("replication", "database"),
        ])
        .expect("names");
        assert_eq!(
            (n.database.as_str(), n.replication),
            ("bench", Replication::Logical)
        );
        let n =
            names(&[("user", "r"), ("database", "bench"), ("replication", "off")]).expect("names");
        assert_eq!(
            (n.database.as_str(), n.replication),
            ("bench", Replication::None)
        );
        assert_eq!(
            names(&[("user", "r"), ("replication", "maybe")]),
            Err(NamesError::InvalidReplication("maybe".into()))
        );
    }

    /// A re-encoded startup (3.2 or `_pq_.` options) carries the client's
    /// bytes: non-UTF-8 values and repeated keys as sent.
    #[test]
    fn forwarded_startup_keeps_the_bytes() {
        let mut raw = startup_bytes(
            196610,
            &[
                ("user", "a"),
                ("_pq_.x", "1"),
                ("application_name", "cafX"),
                ("search_path", "p"),
                ("search_path", "q"),
            ],
        );
        let at = raw.windows(4).position(|w| w == b"cafX").expect("value") + 3;
        raw[at] = 0xe9;
        let Ok(Packet::Startup(s)) = parse_packet(BytesMut::from(&raw[..])) else {
            panic!("startup")
        };
        let fwd = s.for_backend();
        let expected = {
            let mut e = startup_bytes(
                196608,
                &[
                    ("user", "a"),
                    ("application_name", "cafX"),
                    ("search_path", "p"),
                    ("search_path", "q"),
                ],
            );
            let at = e.windows(4).position(|w| w == b"cafX").expect("value") + 3;
            e[at] = 0xe9;
            e
        };
        assert_eq!(&fwd[..], &expected[..]);
        assert!(
            parse_packet(BytesMut::from(&b"ue"[..])).is_err(),
            "short buffers are errors"
        );
    }
}
