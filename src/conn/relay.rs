//! The byte relay after authentication: copies both ways through a 16 KiB
//! buffer per direction, propagates half-close, counts bytes, and says
//! which side failed.
//!
//! A direction holds its buffer only while bytes are in flight: when a read
//! would block with nothing left to write, the buffer goes back to a
//! per-thread pool. Idle sessions (most of them, in a fleet) then cost no
//! relay memory, and busy ones take pooled buffers instead of allocating:
//! nothing is allocated per message once the pool is warm.
//!
//! It looks inside the stream only to follow the backend's message headers
//! (type + length; no allocation, a few instructions per message). That
//! lets it stop at a message boundary when it must end a session itself:
//! at shutdown (the client then gets FATAL 57P01) or after
//! `limits.idle_timeout` with the backend waiting on the client (57P05).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

pub use crate::metrics::RelayProgress;

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

/// Which peer an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// Why the relay stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ending {
    /// Both peers closed.
    #[default]
    Closed,
    /// The proxy is shutting down; stopped at a backend message boundary.
    Terminated,
    /// No bytes either way for the idle timeout while the backend waited
    /// for the client; stopped at a message boundary.
    Idle,
}

#[derive(Debug, thiserror::Error)]
#[error("{} {op} failed: {source}", side.as_str())]
pub struct RelayError {
    pub side: Side,
    pub op: &'static str,
    pub source: io::Error,
    pub stats: RelayStats,
}

/// Bytes moved, who closed first, and why it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// The side whose EOF ended the session first.
    pub first_eof: Option<Side>,
    pub ending: Ending,
}

/// Follows `type + int32 length` message headers through a byte stream.
/// Public for the micro-benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Framer {
    header: [u8; 5],
    have: usize,
    body_left: usize,
    last_tag: u8,
}

impl Framer {
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }

    /// Consumes up to `data.len()` bytes, stopping early right after a
    /// boundary when `stop_at_boundary`; returns the bytes consumed.
    pub fn step(&mut self, data: &[u8], stop_at_boundary: bool) -> usize {
        let mut off = 0;
        while off < data.len() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len() - off);
                self.body_left -= n;
                off += n;
            } else {
                let n = (5 - self.have).min(data.len() - off);
                self.header[self.have..self.have + n].copy_from_slice(&data[off..off + n]);
                self.have += n;
                off += n;
                if self.have == 5 {
                    let len = i32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    self.body_left = (len.max(4) - 4) as usize;
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
    fn bytes_to_boundary(&self, data: &[u8]) -> Option<usize> {
        if self.at_boundary() {
            return Some(0);
        }
        let mut f = *self;
        let n = f.step(data, true);
        f.at_boundary().then_some(n)
    }
}

struct Direction {
    /// Present only while bytes are in flight (see the module comment).
    buf: Option<Box<[u8]>>,
    pos: usize,
    cap: usize,
    total: u64,
    read_done: bool,
    shut: bool,
    need_flush: bool,
    /// Only the backend→client direction follows headers.
    framer: Option<Framer>,
}

enum Failure {
    Read(io::Error),
    Write(io::Error),
}

impl Direction {
    /// `pending` is what an earlier reader already took off the socket;
    /// it goes out first. The backend→client side starts right after the
    /// backend's ReadyForQuery.
    fn new(framed: bool, pending: &[u8]) -> Self {
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
            framer: framed.then_some(Framer {
                last_tag: b'Z',
                ..Framer::default()
            }),
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
        if let Some(f) = &mut self.framer {
            f.step(&buf[self.pos..self.pos + n], false);
        }
        self.pos += n;
        self.total += n as u64;
        self.need_flush = true;
        Poll::Ready(Ok(()))
    }

    /// Drives one direction until it finishes (EOF forwarded as shutdown)
    /// or would block. Mirrors tokio's copy loop, keeping read and write
    /// errors apart.
    fn poll_copy<R, W>(
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
    fn poll_to_boundary<R, W>(
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

    /// The last message relayed (completely) was ReadyForQuery.
    fn after_ready_for_query(&self) -> bool {
        self.pos == self.cap
            && self
                .framer
                .is_some_and(|f| f.at_boundary() && f.last_tag == b'Z')
    }
}

/// Bytes already read, and how a relay may be ended from outside.
#[derive(Default)]
pub struct Options<'a> {
    pub terminate: Option<&'a CancellationToken>,
    pub idle_timeout: Option<Duration>,
    /// Read from the backend past ReadyForQuery, not yet sent to the client.
    /// Owned, so the authentication phase's buffers are freed as soon as
    /// these bytes are copied.
    pub to_client: bytes::BytesMut,
    /// Read from the client during authentication, not yet sent on.
    pub to_backend: bytes::BytesMut,
    /// Where bytes moved are published while the session runs.
    pub progress: Option<RelayProgress>,
}

/// Copies until both directions have ended, either fails, or `limits`
/// end it at a backend message boundary.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    limits: Options<'_>,
) -> Result<RelayStats, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Direction::new(false, &limits.to_backend);
    let mut down = Direction::new(true, &limits.to_client);
    let Options {
        terminate,
        idle_timeout,
        to_client,
        to_backend,
        progress,
    } = limits;
    drop((to_client, to_backend));
    let mut reported = (0u64, 0u64);
    let report = tokio::time::sleep(RelayProgress::EVERY);
    tokio::pin!(report);
    let (mut up_done, mut down_done) = (false, false);
    let mut first_eof = None;
    let mut stopping: Option<Ending> = None;
    let never = CancellationToken::new();
    let terminate = terminate.unwrap_or(&never).cancelled();
    tokio::pin!(terminate);
    let idle = limits
        .idle_timeout
        .unwrap_or(Duration::from_secs(365 * 86_400));
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let mut seen = 0u64;
    // Client bytes relayed when the backend last said ReadyForQuery: the
    // backend waits for the client while no client byte came since.
    let (mut up_at_ready, mut down_at_check) = (0u64, 0u64);
    let stats = |up: &Direction, down: &Direction, first_eof, ending| RelayStats {
        client_to_backend: up.total,
        backend_to_client: down.total,
        first_eof,
        ending,
    };
    let fail = |side, op, source, s: RelayStats| RelayError {
        side,
        op,
        source,
        stats: s,
    };
    let result = poll_fn(|cx| {
        if let Some(p) = &progress {
            if report.as_mut().poll(cx).is_ready() {
                p.publish(&mut reported, up.total, down.total);
                report
                    .as_mut()
                    .reset(tokio::time::Instant::now() + RelayProgress::EVERY);
                let _ = report.as_mut().poll(cx);
            }
        }
        if stopping.is_none() {
            if terminate.as_mut().poll(cx).is_ready() {
                stopping = Some(Ending::Terminated);
            } else if idle_timeout.is_some() && sleep.as_mut().poll(cx).is_ready() {
                let moved = up.total + down.total;
                if moved == seen && down.after_ready_for_query() && up.total == up_at_ready {
                    stopping = Some(Ending::Idle);
                } else {
                    seen = moved;
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                    let _ = sleep.as_mut().poll(cx);
                }
            }
        }
        if let Some(ending) = stopping {
            return match down.poll_to_boundary(cx, Pin::new(&mut *backend), Pin::new(&mut *client))
            {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(stats(&up, &down, first_eof, ending))),
                Poll::Ready(Err(Failure::Read(e))) => Poll::Ready(Err(fail(
                    Side::Backend,
                    "read",
                    e,
                    stats(&up, &down, first_eof, ending),
                ))),
                Poll::Ready(Err(Failure::Write(e))) => Poll::Ready(Err(fail(
                    Side::Client,
                    "write",
                    e,
                    stats(&up, &down, first_eof, ending),
                ))),
                Poll::Pending => Poll::Pending,
            };
        }
        if !up_done {
            match up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *backend)) {
                Poll::Ready(Ok(())) => {
                    up_done = true;
                    first_eof.get_or_insert(Side::Client);
                }
                Poll::Ready(Err(Failure::Read(e))) => {
                    return Poll::Ready(Err(fail(
                        Side::Client,
                        "read",
                        e,
                        stats(&up, &down, first_eof, Ending::Closed),
                    )))
                }
                Poll::Ready(Err(Failure::Write(e))) => {
                    return Poll::Ready(Err(fail(
                        Side::Backend,
                        "write",
                        e,
                        stats(&up, &down, first_eof, Ending::Closed),
                    )))
                }
                Poll::Pending => {}
            }
        }
        if !down_done {
            match down.poll_copy(cx, Pin::new(&mut *backend), Pin::new(&mut *client)) {
                Poll::Ready(Ok(())) => {
                    down_done = true;
                    first_eof.get_or_insert(Side::Backend);
                }
                Poll::Ready(Err(Failure::Read(e))) => {
                    return Poll::Ready(Err(fail(
                        Side::Backend,
                        "read",
                        e,
                        stats(&up, &down, first_eof, Ending::Closed),
                    )))
                }
                Poll::Ready(Err(Failure::Write(e))) => {
                    return Poll::Ready(Err(fail(
                        Side::Client,
                        "write",
                        e,
                        stats(&up, &down, first_eof, Ending::Closed),
                    )))
                }
                Poll::Pending => {}
            }
        }
        if down.total != down_at_check {
            down_at_check = down.total;
            if down.after_ready_for_query() {
                up_at_ready = up.total;
            }
        }
        if up_done && down_done {
            Poll::Ready(Ok(stats(&up, &down, first_eof, Ending::Closed)))
        } else {
            Poll::Pending
        }
    })
    .await;
    if let Some(p) = &progress {
        let s = match &result {
            Ok(s) => s,
            Err(e) => &e.stats,
        };
        p.publish(&mut reported, s.client_to_backend, s.backend_to_client);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes show in the counters while the session runs, not only at
    /// its end, and the final count is exact.
    #[tokio::test(start_paused = true)]
    async fn publishes_progress_while_running() {
        let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let progress = RelayProgress {
            client_to_backend: prometheus::IntCounter::new("up", "up").expect("counter"),
            backend_to_client: prometheus::IntCounter::new("down", "down").expect("counter"),
        };
        let options = Options {
            progress: Some(progress.clone()),
            ..Options::default()
        };
        let task = tokio::spawn(async move { relay(&mut client, &mut backend, options).await });
        client_end.write_all(&[1u8; 1000]).await.expect("write");
        let mut got = [0u8; 1000];
        backend_end.read_exact(&mut got).await.expect("read");
        assert_eq!(progress.client_to_backend.get(), 0, "not yet published");
        tokio::time::sleep(RelayProgress::EVERY + Duration::from_millis(10)).await;
        assert_eq!(
            progress.client_to_backend.get(),
            1000,
            "published while running"
        );
        backend_end
            .write_all(&msg(b'Z', b"I"))
            .await
            .expect("write");
        client_end.shutdown().await.expect("shutdown");
        backend_end.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        client_end.read_to_end(&mut rest).await.expect("read");
        drop(backend_end);
        task.await.expect("join").expect("relay");
        assert_eq!(progress.client_to_backend.get(), 1000);
        assert_eq!(progress.backend_to_client.get(), 6);
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let task =
            tokio::spawn(async move { relay(&mut client, &mut backend, Options::default()).await });
        let payload = vec![7u8; 100_000];
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client_end.write_all(&p2).await.expect("write");
            client_end.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client_end.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        backend_end.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, payload);
        backend_end.write_all(b"reply").await.expect("reply");
        backend_end.shutdown().await.expect("shutdown");
        assert_eq!(writer.await.expect("join"), b"reply");
        let stats = task.await.expect("join").expect("relay");
        assert_eq!(stats.client_to_backend, 100_000);
        assert_eq!(stats.backend_to_client, 5);
        assert_eq!(stats.first_eof, Some(Side::Client));
        assert_eq!(stats.ending, Ending::Closed);
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

    #[tokio::test]
    async fn terminate_stops_at_a_message_boundary() {
        let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            relay(
                &mut client,
                &mut backend,
                Options {
                    terminate: Some(&stop2),
                    ..Options::default()
                },
            )
            .await
        });
        // Half a DataRow is in flight when the stop comes.
        let row = msg(b'D', &[9; 100]);
        backend_end.write_all(&row[..40]).await.expect("first half");
        let mut first = vec![0u8; 40];
        client_end
            .read_exact(&mut first)
            .await
            .expect("first half relayed");
        stop.cancel();
        backend_end
            .write_all(&row[40..])
            .await
            .expect("second half");
        backend_end
            .write_all(&msg(b'D', &[1; 5]))
            .await
            .expect("next row");
        let stats = task.await.expect("join").expect("relay");
        assert_eq!(stats.ending, Ending::Terminated);
        assert_eq!(
            stats.backend_to_client,
            row.len() as u64,
            "exactly the whole message, no more"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_only_when_backend_waits_for_client() {
        let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            relay(
                &mut client,
                &mut backend,
                Options {
                    idle_timeout: Some(Duration::from_secs(60)),
                    ..Options::default()
                },
            )
            .await
        });
        // A query is running: silence, but the backend has not said Z.
        client_end
            .write_all(&msg(b'Q', b"SELECT pg_sleep(300)\0"))
            .await
            .expect("query");
        let mut q = vec![0u8; 26];
        backend_end.read_exact(&mut q).await.expect("query relayed");
        tokio::time::sleep(Duration::from_secs(200)).await;
        assert!(!task.is_finished(), "a silent running query is not idle");
        backend_end
            .write_all(&msg(b'Z', b"I"))
            .await
            .expect("ready");
        let mut z = vec![0u8; 6];
        client_end.read_exact(&mut z).await.expect("Z relayed");
        tokio::time::sleep(Duration::from_secs(200)).await;
        let stats = task.await.expect("join").expect("relay");
        assert_eq!(stats.ending, Ending::Idle);
    }
}
