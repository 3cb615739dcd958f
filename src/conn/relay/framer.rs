//! Message boundaries in the backend's byte stream: `type + int32 length`
//! headers followed without allocation, a few instructions per message.

/// Follows `type + int32 length` message headers through a byte stream.
/// Public for the micro-benchmarks and the fuzz target.
#[derive(Debug, Clone, Copy, Default)]
pub struct Framer {
    header: [u8; 5],
    /// Header bytes read so far (0 to 5).
    have: u8,
    last_tag: u8,
    /// Body bytes still to come: a length word says at most `i32::MAX`.
    /// Small types: every relayed session holds one of these (and room for
    /// one in its other direction).
    body_left: u32,
}

impl Framer {
    /// A framer for a stream that continues right after ReadyForQuery.
    pub(super) fn after_ready_for_query() -> Framer {
        Framer {
            last_tag: b'Z',
            ..Framer::default()
        }
    }

    /// The type byte of the last message whose header was read.
    pub(super) fn last_tag(&self) -> u8 {
        self.last_tag
    }

    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }

    /// Consumes up to `data.len()` bytes, stopping early right after a
    /// boundary when `stop_at_boundary`; returns the bytes consumed.
    pub fn step(&mut self, data: &[u8], stop_at_boundary: bool) -> usize {
        let mut off = 0;
        while off < data.len() {
            if self.body_left > 0 {
                let n = (self.body_left as usize).min(data.len() - off);
                // n <= body_left, a u32.
                self.body_left -= n as u32;
                off += n;
            } else {
                let have = usize::from(self.have);
                let n = (5 - have).min(data.len() - off);
                self.header[have..have + n].copy_from_slice(&data[off..off + n]);
                // n <= 5.
                self.have += n as u8;
                off += n;
                if self.have == 5 {
                    let len = i32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    // 0 ..= i32::MAX - 4.
                    self.body_left = (len.max(4) - 4) as u32;
                    self.last_tag = self.header[0];
                    self.have = 0;
                }
            }
            if stop_at_boundary && self.at_boundary() {
                break;
            }
        }
        off
    }

    /// Bytes of `data` up to the next boundary (0 when at one now).
    pub(super) fn bytes_to_boundary(&self, data: &[u8]) -> Option<usize> {
        if self.at_boundary() {
            return Some(0);
        }
        let mut f = *self;
        let n = f.step(data, true);
        f.at_boundary().then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn framer_finds_boundaries_across_chunks() {
        let mut stream = msg(b'D', &[1; 10]);
        stream.extend(msg(b'Z', b"I"));
        let mut f = Framer::default();
        assert_eq!(f.bytes_to_boundary(&stream), Some(0));
        f.step(&stream[..3], false);
        assert_eq!(
            f.bytes_to_boundary(&stream[3..]),
            Some(12),
            "rest of the DataRow"
        );
        f.step(&stream[3..8], false);
        assert_eq!(f.bytes_to_boundary(&stream[8..10]), None);
        f.step(&stream[8..], false);
        assert!(f.at_boundary());
        assert_eq!(f.last_tag, b'Z');
    }
}
