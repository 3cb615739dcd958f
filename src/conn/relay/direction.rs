//! One direction of the relay: a pooled 16 KiB buffer held only while
//! bytes are in flight, copied until EOF (forwarded as a shutdown), with
//! read and write errors kept apart so the caller can tell which peer
//! failed.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framer::Framer;
use super::{RelayError, RelayStats, Side};

/// Per-direction buffer: one TLS record's worth of plaintext.
pub const RELAY_BUFFER: usize = 16 * 1024;

/// Buffers kept per worker thread for reuse (1 MiB at most).
const POOLED_PER_THREAD: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; RELAY_BUFFER].into_boxed_slice())
}

fn give_buffer(buf: Box<[u8]>) {
    if buf.len() != RELAY_BUFFER {
        return;
    }
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < POOLED_PER_THREAD {
            pool.push(buf);
        }
    });
}

pub(super) struct Direction {
    /// Present only while bytes are in flight (see the module comment).
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    pub(super) total: u64,
    read_done: bool,
    shut: bool,
    need_flush: bool,
    /// Only the backend→client direction follows headers.
    framer: Option<Framer>,
    tail: [u8; 5],
}

/// Which way bytes flow through a [`Direction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    ClientToBackend,
    BackendToClient,
}

impl Flow {
    /// The peer this flow reads from (whose EOF ends it).
    pub(super) fn source(self) -> Side {
        match self {
            Flow::ClientToBackend => Side::Client,
            Flow::BackendToClient => Side::Backend,
        }
    }

    /// The peer this flow writes to.
    fn sink(self) -> Side {
        match self {
            Flow::ClientToBackend => Side::Backend,
            Flow::BackendToClient => Side::Client,
        }
    }
}

/// A direction's I/O error, before it is known which peer it blames.
pub(super) enum Failure {
    Read(io::Error),
    Write(io::Error),
}

impl Failure {
    /// The one place that decides which peer failed: a read error is the
    /// side read from, a write error the side written to.
    pub(super) fn into_error(self, flow: Flow, stats: RelayStats) -> RelayError {
        let (side, op, source) = match self {
            Failure::Read(e) => (flow.source(), "read", e),
            Failure::Write(e) => (flow.sink(), "write", e),
        };
        RelayError {
            side,
            op,
            source,
            stats,
        }
    }
}

impl Direction {
    /// `pending` is what an earlier reader already took off the socket;
    /// it goes out first. The backend→client side starts right after the
    /// backend's ReadyForQuery, and only it follows message headers.
    pub(super) fn new(flow: Flow, pending: &[u8]) -> Self {
        let buf = (!pending.is_empty()).then(|| {
            let mut buf = vec![0; RELAY_BUFFER.max(pending.len())].into_boxed_slice();
            buf[..pending.len()].copy_from_slice(pending);
            buf
        });
        Direction {
            buf,
            pos: 0,
            cap: pending.len(),
            total: 0,
            read_done: false,
            shut: false,
            need_flush: false,
            framer: (flow == Flow::BackendToClient).then(Framer::after_ready_for_query),
            tail: [0; 5],
        }
    }

    fn poll_fill<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
    ) -> Poll<io::Result<()>> {
        let buf = self.buf.get_or_insert_with(take_buffer);
        let mut rb = ReadBuf::new(buf);
        let polled = reader.poll_read(cx, &mut rb);
        let n = rb.filled().len();
        if polled.is_pending() {
            // Nothing in flight: the buffer goes back to the pool.
            if let Some(buf) = self.buf.take() {
                give_buffer(buf);
            }
            return Poll::Pending;
        }
        if let Poll::Ready(Err(e)) = polled {
            return Poll::Ready(Err(e));
        }
        if n == 0 {
            self.read_done = true;
        } else {
            self.pos = 0;
            self.cap = n;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_some<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: Pin<&mut W>,
        end: usize,
    ) -> Poll<Result<(), Failure>> {
        let Some(buf) = &self.buf else {
            return Poll::Ready(Ok(()));
        };
        let n = ready!(writer.poll_write(cx, &buf[self.pos..end])).map_err(Failure::Write)?;
        if n == 0 {
            return Poll::Ready(Err(Failure::Write(io::ErrorKind::WriteZero.into())));
        }
        let written = &buf[self.pos..self.pos + n];
        if let Some(f) = &mut self.framer {
            f.step(written, false);
        }
        // The last five bytes written: a client's Terminate message ends
        // its stream.
        if written.len() >= 5 {
            self.tail.copy_from_slice(&written[written.len() - 5..]);
        } else {
            self.tail.rotate_left(written.len());
            self.tail[5 - written.len()..].copy_from_slice(written);
        }
        self.pos += n;
        self.total += n as u64;
        self.need_flush = true;
        Poll::Ready(Ok(()))
    }

    /// Drives one direction until it finishes (EOF forwarded as shutdown)
    /// or would block. Mirrors tokio's copy loop, keeping read and write
    /// errors apart.
    pub(super) fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<Result<(), Failure>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                match self.poll_fill(cx, reader.as_mut()) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx)).map_err(Failure::Write)?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let cap = self.cap;
                ready!(self.poll_write_some(cx, writer.as_mut(), cap))?;
            }
            if self.pos == self.cap && self.read_done {
                if !self.shut {
                    ready!(writer.as_mut().poll_flush(cx)).map_err(Failure::Write)?;
                    ready!(writer.as_mut().poll_shutdown(cx)).map_err(Failure::Write)?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Forwards up to the next message boundary, reading more if the
    /// current message is incomplete, then flushes.
    pub(super) fn poll_to_boundary<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<Result<(), Failure>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            let framer = self.framer.unwrap_or_default();
            if framer.at_boundary() || (self.read_done && self.pos == self.cap) {
                ready!(writer.as_mut().poll_flush(cx)).map_err(Failure::Write)?;
                return Poll::Ready(Ok(()));
            }
            if self.pos == self.cap {
                ready!(self.poll_fill(cx, reader.as_mut())).map_err(Failure::Read)?;
                continue;
            }
            let k = framer
                .bytes_to_boundary(
                    self.buf
                        .as_deref()
                        .map_or(&[][..], |b| &b[self.pos..self.cap]),
                )
                .unwrap_or(self.cap - self.pos);
            let end = self.pos + k;
            ready!(self.poll_write_some(cx, writer.as_mut(), end))?;
        }
    }

    /// The stream so far ends with a Terminate message (`X`, length 4).
    pub(super) fn ends_with_terminate(&self) -> bool {
        self.tail == *b"X\0\0\0\x04"
    }

    /// The last message relayed (completely) was ReadyForQuery.
    pub(super) fn after_ready_for_query(&self) -> bool {
        self.pos == self.cap
            && self
                .framer
                .is_some_and(|f| f.at_boundary() && f.last_tag() == b'Z')
    }
}
