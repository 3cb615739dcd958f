//! The relay's backend message tracker: `relay::Framer::step` over arbitrary
//! chunkings, against a reference list of the stream's message boundaries.
//!
//! Input: `[flags, seed, stream...]` (see common/mod.rs; no I/O here, the
//! chunk sizes come from the same PRNG). `flags & 8`: call `step` with
//! `stop_at_boundary` (as the relay does when it must end a session at a
//! message boundary) on every other chunk, drawn by the PRNG.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use pg_tls_proxy::conn::relay::Framer;

use common::{Header, Rng};

/// Offsets (after 0) at which a message ends, as the relay follows them:
/// a length under 4 counts as 4 (an empty body).
fn boundaries(stream: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 5 <= stream.len() {
        let len = i32::from_be_bytes([
            stream[pos + 1],
            stream[pos + 2],
            stream[pos + 3],
            stream[pos + 4],
        ]);
        let body = (len.max(4) - 4) as usize;
        match (pos + 5).checked_add(body) {
            Some(end) if end <= stream.len() => {
                out.push(end);
                pos = end;
            }
            _ => break,
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((header, stream)) = Header::split(data) else {
        return;
    };
    let ends = boundaries(stream);
    let stopping = header.flags & 8 != 0;
    let mut rng = Rng::new(header.seed);
    let mut framer = Framer::default();
    assert!(framer.at_boundary());
    let mut off = 0;
    while off < stream.len() {
        let n = rng.size(header.max_chunk()).min(stream.len() - off);
        let chunk = &stream[off..off + n];
        let stop = stopping && rng.next() % 2 == 0;
        let used = framer.step(chunk, stop);
        assert!(used <= chunk.len(), "consumed {used} of {}", chunk.len());
        assert!(used > 0, "no progress on {} bytes", chunk.len());
        if !stop {
            assert_eq!(used, chunk.len(), "stopped early without stop_at_boundary");
        } else if used < chunk.len() {
            assert!(framer.at_boundary(), "stopped early off a boundary");
            // Stopped at the first boundary inside the chunk.
            let first = ends.iter().find(|&&e| e > off).copied();
            assert_eq!(first, Some(off + used));
        }
        off += used;
        assert_eq!(
            framer.at_boundary(),
            ends.binary_search(&off).is_ok(),
            "at_boundary() wrong after {off} bytes"
        );
    }
    assert_eq!(off, stream.len());
});
