//! Shared pieces of the fuzz targets: a scripted in-memory peer, a
//! deterministic chunking PRNG and a tiny executor.
//!
//! Stream targets take their input as `[flags, seed, bytes...]`:
//! - `flags & 3` picks the largest chunk a read returns: 0 = 64 KiB (the
//!   whole input at once, in practice), 1 = 8 bytes, 2 = 64, 3 = 1024;
//! - `flags & 4` makes reads answer `Pending` now and then (waking
//!   themselves), so partial reads and cancelled futures are exercised;
//! - the other bits are the target's own;
//! - `seed` seeds the PRNG that draws chunk sizes and `Pending`s.
//!
//! So a seed file is a protocol byte stream with two bytes in front
//! (`gen_seeds.py` writes `00 00`: whole reads, no `Pending`).
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// xorshift32: deterministic, so a crash input replays the same chunking.
pub struct Rng(u32);

impl Rng {
    pub fn new(seed: u8) -> Rng {
        Rng(0x9E37_79B9 ^ (u32::from(seed) << 8 | u32::from(seed)) | 1)
    }

    pub fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }

    /// 1..=max
    pub fn size(&mut self, max: usize) -> usize {
        1 + (self.next() as usize) % max
    }
}

/// The stream header every stream target starts with.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub flags: u8,
    pub seed: u8,
}

impl Header {
    pub fn split(data: &[u8]) -> Option<(Header, &[u8])> {
        match data {
            [flags, seed, rest @ ..] => Some((
                Header {
                    flags: *flags,
                    seed: *seed,
                },
                rest,
            )),
            _ => None,
        }
    }

    pub fn max_chunk(self) -> usize {
        [64 * 1024, 8, 64, 1024][usize::from(self.flags & 3)]
    }

    pub fn pending(self) -> bool {
        self.flags & 4 != 0
    }

    /// A peer serving `data` as this header says.
    pub fn peer(self, data: &[u8]) -> Peer {
        Peer::new(data.to_vec(), self.seed, self.max_chunk(), self.pending())
    }
}

/// An in-memory socket: reads serve a script in PRNG-sized chunks (with
/// optional `Pending`s), then EOF (or `Pending` forever, when
/// `eof_at_end` is false); writes are recorded.
pub struct Peer {
    data: Vec<u8>,
    /// Bytes of `data` handed out so far.
    pub pos: usize,
    rng: Rng,
    max_chunk: usize,
    pending: bool,
    just_pended: bool,
    pub eof_at_end: bool,
    pub written: Vec<u8>,
    pub shut_down: bool,
    /// Offsets in `data` right after an authentication request that needs
    /// an answer (see [`Peer::gated`]).
    gates: Vec<usize>,
    /// Bumped at every byte served or accepted, and at EOF: a caller can
    /// share one counter between peers to see that nothing moves any more.
    pub progress: std::rc::Rc<std::cell::Cell<u64>>,
}

impl Peer {
    pub fn new(data: Vec<u8>, seed: u8, max_chunk: usize, pending: bool) -> Peer {
        Peer {
            data,
            pos: 0,
            rng: Rng::new(seed),
            max_chunk,
            pending,
            just_pended: false,
            eof_at_end: true,
            written: Vec::new(),
            shut_down: false,
            gates: Vec::new(),
            progress: Default::default(),
        }
    }

    /// Makes this peer behave as a backend that waits for the answer to
    /// each authentication request it sent (AuthenticationCleartextPassword,
    /// MD5, GSS, SSPI, SASL, SASLContinue): its script is served only up to
    /// the end of such a request until one more whole message has been
    /// written to it.
    pub fn gated(mut self) -> Peer {
        let mut pos = 0;
        while let Some((tag, body)) = split_one(&self.data[pos..]) {
            pos += 5 + body.len();
            let code = body
                .get(..4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            if tag == b'R' && matches!(code, Some(3 | 5 | 7 | 8 | 9 | 10 | 11)) {
                self.gates.push(pos);
            }
        }
        self
    }

    fn answers(&self) -> usize {
        let mut answers = 0;
        let mut w = &self.written[..];
        while let Some((_, body)) = split_one(w) {
            answers += 1;
            w = &w[5 + body.len()..];
        }
        answers
    }

    fn gates_passed(&self) -> usize {
        self.gates.iter().take_while(|&&g| g <= self.pos).count()
    }

    /// A gated peer that sent a request and has no answer to it yet.
    pub fn waiting_for_answer(&self) -> bool {
        self.gates_passed() > self.answers()
    }

    /// How far the script may be served now.
    fn limit(&self) -> usize {
        let passed = self.gates_passed();
        if passed > self.answers() {
            return self.pos;
        }
        self.gates.get(passed).copied().unwrap_or(self.data.len())
    }

    pub fn remaining(&self) -> &[u8] {
        &self.data[self.pos..]
    }

    fn maybe_pend(&mut self, cx: &mut Context<'_>) -> bool {
        if self.pending && !self.just_pended && self.rng.next() % 3 == 0 {
            self.just_pended = true;
            cx.waker().wake_by_ref();
            return true;
        }
        self.just_pended = false;
        false
    }
}

impl AsyncRead for Peer {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let limit = this.limit();
        if limit == this.pos {
            if this.pos == this.data.len() && this.eof_at_end && !this.waiting_for_answer() {
                this.progress.set(this.progress.get() + 1);
                return Poll::Ready(Ok(()));
            }
            // Waiting for an answer, or for nothing (a peer that never
            // closes): only the caller can end that.
            return Poll::Pending;
        }
        if this.maybe_pend(cx) {
            return Poll::Pending;
        }
        let n = this
            .rng
            .size(this.max_chunk)
            .min(limit - this.pos)
            .min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        this.progress.set(this.progress.get() + 1);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.maybe_pend(cx) {
            return Poll::Pending;
        }
        let n = this.rng.size(this.max_chunk).min(buf.len());
        this.written.extend_from_slice(&buf[..n]);
        this.progress.set(this.progress.get() + 1);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().shut_down = true;
        Poll::Ready(Ok(()))
    }
}

/// Polls until ready with a no-op waker (the peers never wait on anything
/// real). A future still pending after this many polls is a hang.
pub const MAX_POLLS: usize = 1_000_000;

pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..MAX_POLLS {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future still pending after {MAX_POLLS} polls: a hang");
}

/// A current-thread Tokio runtime, built once per process, for code that
/// needs one (`spawn_blocking`, timers).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Polls once; `None` when pending (the future is then dropped by the
/// caller, as `tokio::select!` drops a losing branch).
pub fn poll_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The first whole `type + int32 length + body` message of `bytes`.
pub fn split_one(bytes: &[u8]) -> Option<(u8, &[u8])> {
    if bytes.len() < 5 {
        return None;
    }
    let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    if len < 4 || bytes.len() - 1 < len as usize {
        return None;
    }
    Some((bytes[0], &bytes[5..len as usize + 1]))
}

/// Splits `type + int32 length + body` messages; `None` if `bytes` is not a
/// whole number of well-formed messages.
pub fn split_messages(mut bytes: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        if len < 4 || bytes.len() < len as usize + 1 {
            return None;
        }
        let total = len as usize + 1;
        out.push((bytes[0], &bytes[5..total]));
        bytes = &bytes[total..];
    }
    Some(out)
}
