//! Typed messages during authentication: `protocol::MessageReader::next`
//! over a byte stream split into arbitrary chunks, with `Pending`s that drop
//! the `next()` future (as `tokio::select!` drops a losing branch), checked
//! against a reference framing of the whole stream; then `Frame::tag`,
//! `body` and `auth_code`, and `into_buffer` (the surplus the relay sends
//! on).
//!
//! Input: `[flags, seed, stream...]` (see common/mod.rs).
//! - `flags & 8`: a small length cap (`64 + seed`) instead of
//!   `MAX_AUTH_PHASE_MESSAGE`;
//! - `flags >> 4`: stop after that many frames (0 = read to the end) and
//!   check `into_buffer`.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::wire::{
    Frame, MessageReader, ProtocolError, ReadError, MAX_AUTH_PHASE_MESSAGE,
};

use common::{block_on, poll_once, Header};

/// What the reference framing expects next.
#[derive(Debug)]
enum Expect {
    Frame(usize),
    TooLong(i32),
    Eof,
}

fn expect_at(stream: &[u8], pos: usize, max_len: usize) -> Expect {
    let rest = &stream[pos..];
    if rest.len() < 5 {
        return Expect::Eof;
    }
    let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
    if len < 4 || len as usize > max_len {
        return Expect::TooLong(len);
    }
    let total = len as usize + 1;
    if rest.len() < total {
        Expect::Eof
    } else {
        Expect::Frame(total)
    }
}

fn check_frame(frame: &Frame) {
    let tag = frame.tag();
    let body = frame.body();
    assert_eq!(body.len() + 5, frame.bytes.len());
    match frame.auth_code() {
        Some(code) => {
            assert_eq!(tag, b'R');
            assert!(body.len() >= 4);
            assert_eq!(
                code,
                i32::from_be_bytes([body[0], body[1], body[2], body[3]])
            );
        }
        None => assert!(tag != b'R' || body.len() < 4),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((header, stream)) = Header::split(data) else {
        return;
    };
    let max_len = if header.flags & 8 != 0 {
        64 + usize::from(header.seed)
    } else {
        MAX_AUTH_PHASE_MESSAGE
    };
    let stop_after = usize::from(header.flags >> 4);
    let mut peer = header.peer(stream);
    let mut reader = MessageReader::new(max_len);
    let mut pos = 0;
    let mut frames = 0;
    loop {
        if stop_after != 0 && frames == stop_after {
            // Whatever was read and not returned, then what is still unread,
            // is exactly the rest of the stream.
            let mut surplus = reader.into_buffer().to_vec();
            surplus.extend_from_slice(peer.remaining());
            assert_eq!(
                surplus,
                &stream[pos..],
                "into_buffer lost or invented bytes"
            );
            return;
        }
        let result = if header.pending() {
            // Drop the future at every Pending and call next() again.
            let mut polls = 0;
            loop {
                polls += 1;
                assert!(polls < common::MAX_POLLS, "next() never completes");
                if let Some(r) = poll_once(reader.next(&mut peer)) {
                    break r;
                }
            }
        } else {
            block_on(reader.next(&mut peer))
        };
        let expected = expect_at(stream, pos, max_len);
        match (result, expected) {
            (Ok(frame), Expect::Frame(total)) => {
                assert_eq!(&frame.bytes[..], &stream[pos..pos + total]);
                check_frame(&frame);
                pos += total;
                frames += 1;
            }
            (Err(ReadError::Protocol(ProtocolError::MessageLength(n))), Expect::TooLong(m)) => {
                assert_eq!(n, m);
                return;
            }
            (Err(ReadError::Eof), Expect::Eof) => {
                assert_eq!(peer.remaining().len(), 0, "EOF before the stream ended");
                return;
            }
            (got, want) => panic!("at offset {pos}: got {got:?}, reference says {want:?}"),
        }
    }
});
