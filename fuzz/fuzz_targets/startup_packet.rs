//! Pre-startup packets: `protocol::read_packet` over an in-memory reader and
//! `protocol::parse_packet`, then every `StartupPacket` accessor.
//!
//! Input: `[flags, seed, bytes...]` (see common/mod.rs). `flags >> 4`:
//! - 0: `bytes` is a packet body; a correct length word is put in front, so
//!   the length checks pass and the classifier/startup parser is reached;
//! - 1: `bytes` is the raw stream, length word and all, for `read_packet`;
//! - 2: `bytes` go straight to `parse_packet` (whose length word it does not
//!   check against the buffer);
//! - other values: as 0.
#![no_main]

mod common;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::wire::{
    parse_bool, parse_packet, read_packet, truncate_name, NamesError, Packet, ProtocolError,
    ReadError, Replication, StartupPacket, MAX_STARTUP_PACKET_LENGTH, NAMEDATALEN,
};

use common::{block_on, Header};

fuzz_target!(|data: &[u8]| {
    let Some((header, bytes)) = Header::split(data) else {
        return;
    };
    match header.flags >> 4 {
        1 => stream(header, bytes),
        2 => direct(bytes),
        _ => {
            let mut raw = ((bytes.len() + 4) as u32).to_be_bytes().to_vec();
            raw.extend_from_slice(bytes);
            stream(header, &raw);
            direct(&raw);
        }
    }
});

/// `read_packet` over a chunked reader: it must read exactly one packet.
fn stream(header: Header, raw: &[u8]) {
    let mut peer = header.peer(raw);
    let result = block_on(read_packet(&mut peer));
    let word = raw
        .get(..4)
        .map(|w| i32::from_be_bytes([w[0], w[1], w[2], w[3]]) as i64);
    match &result {
        Ok(_) => {
            let len = word.expect("a packet has a length word");
            assert!((8..=MAX_STARTUP_PACKET_LENGTH as i64 + 4).contains(&len));
            assert_eq!(peer.pos as i64, len, "read past the packet it returned");
        }
        Err(ReadError::Eof) => {
            // Only a stream that ended inside the length word or the body.
            let len = word.unwrap_or(i64::MAX);
            assert!(
                raw.len() < 4 || (raw.len() as i64) < len,
                "EOF on a whole packet"
            );
        }
        Err(ReadError::Protocol(ProtocolError::StartupLength)) => {
            let len = word.expect("length checked after reading it");
            assert!(!(8..=MAX_STARTUP_PACKET_LENGTH as i64 + 4).contains(&len));
            assert_eq!(peer.pos, 4, "read past a refused length word");
        }
        Err(ReadError::Protocol(_)) => {}
        Err(ReadError::Io(e)) => panic!("in-memory reader gave an I/O error: {e}"),
    }
    if let Ok(packet) = result {
        check_packet(&packet);
        // The same bytes through parse_packet classify the same way.
        let len = peer.pos;
        let again = parse_packet(BytesMut::from(&raw[..len])).expect("parses twice");
        assert_eq!(kind(&packet), kind(&again));
    }
}

/// `parse_packet` on a buffer whose length word may be anything (under 8
/// bytes it used to panic; found by this target, now an error).
fn direct(raw: &[u8]) {
    if let Ok(packet) = parse_packet(BytesMut::from(raw)) {
        check_packet(&packet);
    }
}

/// PostgreSQL's `parse_bool_with_len` (src/backend/utils/adt/bool.c),
/// transcribed: `pg_strncasecmp` against a NUL-terminated word.
fn postgres_parse_bool(value: &[u8]) -> Option<bool> {
    fn strncasecmp_eq(s1: &[u8], word: &[u8], n: usize) -> bool {
        for i in 0..n {
            let a = s1.get(i).copied().unwrap_or(0);
            let b = word.get(i).copied().unwrap_or(0);
            if a.to_ascii_lowercase() != b.to_ascii_lowercase() {
                return false;
            }
            if a == 0 {
                return true;
            }
        }
        true
    }
    let len = value.len();
    match value.first()? {
        b't' | b'T' if strncasecmp_eq(value, b"true", len) => Some(true),
        b'f' | b'F' if strncasecmp_eq(value, b"false", len) => Some(false),
        b'y' | b'Y' if strncasecmp_eq(value, b"yes", len) => Some(true),
        b'n' | b'N' if strncasecmp_eq(value, b"no", len) => Some(false),
        b'o' | b'O' if strncasecmp_eq(value, b"on", len.max(2)) => Some(true),
        b'o' | b'O' if strncasecmp_eq(value, b"off", len.max(2)) => Some(false),
        b'1' if len == 1 => Some(true),
        b'0' if len == 1 => Some(false),
        _ => None,
    }
}

fn kind(p: &Packet) -> u8 {
    match p {
        Packet::SslRequest => 0,
        Packet::GssEncRequest => 1,
        Packet::Cancel(_) => 2,
        Packet::Startup(_) => 3,
    }
}

fn check_packet(packet: &Packet) {
    match packet {
        Packet::Cancel(raw) => assert!((16..=268).contains(&raw.len())),
        Packet::Startup(s) => check_startup(s),
        Packet::SslRequest | Packet::GssEncRequest => {}
    }
}

fn check_startup(s: &StartupPacket) {
    let max_name = NAMEDATALEN - 1;
    if let Some(user) = s.user() {
        assert!(!user.is_empty());
    }
    // An absent or empty database means the user.
    if s.user().is_some() {
        assert!(s.database().is_some());
    }
    let replication = s.message.parameters.get("replication");
    if let Some(v) = replication {
        assert_eq!(
            parse_bool(v),
            postgres_parse_bool(v.as_bytes()),
            "parse_bool({v:?})"
        );
    }
    match s.effective_names() {
        Ok(names) => {
            assert_eq!(names.user, truncate_name(s.user().expect("a user")));
            assert!(!names.user.is_empty() && names.user.len() <= max_name);
            assert!(names.database.len() <= max_name);
            let expected = match replication.map(|v| v.as_str()) {
                None => Replication::None,
                Some("database") => Replication::Logical,
                Some(v) => match postgres_parse_bool(v.as_bytes()) {
                    Some(true) => Replication::Physical,
                    Some(false) => Replication::None,
                    None => panic!("replication={v:?} accepted"),
                },
            };
            assert_eq!(names.replication, expected);
            if expected == Replication::Physical {
                assert_eq!(names.database, "replication");
            } else {
                assert_eq!(
                    names.database,
                    truncate_name(s.database().expect("a database"))
                );
            }
        }
        Err(NamesError::NoUser) => assert!(s.user().is_none()),
        Err(NamesError::InvalidReplication(v)) => {
            assert!(s.user().is_some());
            assert_eq!(Some(&v), replication);
            assert_eq!(Replication::parse(&v), None);
            assert!(v != "database" && postgres_parse_bool(v.as_bytes()).is_none());
        }
    }
    let options = s.protocol_options();
    assert!(options.iter().all(|o| o.starts_with("_pq_.")));

    let forwarded = s.for_backend();
    if s.minor == 0 && options.is_empty() {
        assert_eq!(forwarded, s.raw, "a 3.0 startup is forwarded as received");
        return;
    }
    // What the backend gets parses back to the same parameters, at 3.0,
    // without `_pq_.` options.
    let Ok(Packet::Startup(again)) = parse_packet(BytesMut::from(&forwarded[..])) else {
        panic!("for_backend produced a packet that does not parse: {forwarded:?}");
    };
    assert_eq!(again.minor, 0);
    assert!(again.protocol_options().is_empty());
    assert_eq!(again.user(), s.user());
    assert_eq!(again.database(), s.database());
    assert_eq!(again.effective_names(), s.effective_names());
    assert_eq!(again.message.parameters.get("replication"), replication);
    let mut expected = s.message.parameters.clone();
    expected.retain(|k, _| !k.starts_with("_pq_."));
    assert_eq!(again.message.parameters, expected);

    // Byte for byte, in order, repeats included: the backend gets exactly
    // the pairs the client sent, less `_pq_.` options (found by this
    // target: the pgwire re-encoding was lossy for non-UTF-8 values).
    let mut sent = raw_pairs(&s.raw[8..]);
    sent.retain(|(k, _)| !k.starts_with(b"_pq_."));
    assert_eq!(
        raw_pairs(&forwarded[8..]),
        sent,
        "parameters changed on the way"
    );
}

/// Name/value pairs of a startup body after the version, in order, as raw
/// bytes.
fn raw_pairs(mut rest: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let Some(k) = rest.iter().position(|&b| b == 0) else {
            return out;
        };
        if k == 0 {
            return out;
        }
        let key = rest[..k].to_vec();
        rest = &rest[k + 1..];
        let Some(v) = rest.iter().position(|&b| b == 0) else {
            return out;
        };
        out.push((key, rest[..v].to_vec()));
        rest = &rest[v + 1..];
    }
}
