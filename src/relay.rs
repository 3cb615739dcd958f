//! The byte relay after authentication: copies both ways with one fixed
//! buffer per direction (allocated once per session, never per message),
//! propagates half-close, counts bytes, and says which side failed.
//!
//! It does not look inside the stream: once the backend has said
//! ReadyForQuery, bytes are bytes.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-direction buffer: one TLS record's worth of plaintext.
pub const RELAY_BUFFER: usize = 16 * 1024;

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

#[derive(Debug, thiserror::Error)]
#[error("{} {op} failed: {source}", side.as_str())]
pub struct RelayError {
    pub side: Side,
    pub op: &'static str,
    pub source: io::Error,
    pub stats: RelayStats,
}

/// Bytes moved and who closed first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// The side whose EOF ended the session first.
    pub first_eof: Option<Side>,
}

struct Direction {
    buf: Box<[u8]>,
    pos: usize,
    cap: usize,
    total: u64,
    read_done: bool,
    shut: bool,
    need_flush: bool,
}

enum Failure {
    Read(io::Error),
    Write(io::Error),
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: vec![0; RELAY_BUFFER].into_boxed_slice(),
            pos: 0,
            cap: 0,
            total: 0,
            read_done: false,
            shut: false,
            need_flush: false,
        }
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
                let mut rb = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
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
                let n = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.cap]))
                .map_err(Failure::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(Failure::Write(io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.total += n as u64;
                self.need_flush = true;
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
}

/// Copies until both directions have ended, or either fails.
pub async fn relay<C, B>(client: &mut C, backend: &mut B) -> Result<RelayStats, RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Direction::new();
    let mut down = Direction::new();
    let mut up_done = false;
    let mut down_done = false;
    let mut first_eof = None;
    let fail = |side, op, source, up: &Direction, down: &Direction, first_eof| RelayError {
        side,
        op,
        source,
        stats: RelayStats {
            client_to_backend: up.total,
            backend_to_client: down.total,
            first_eof,
        },
    };
    poll_fn(|cx| {
        if !up_done {
            match up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *backend)) {
                Poll::Ready(Ok(())) => {
                    up_done = true;
                    first_eof.get_or_insert(Side::Client);
                }
                Poll::Ready(Err(Failure::Read(e))) => {
                    return Poll::Ready(Err(fail(Side::Client, "read", e, &up, &down, first_eof)))
                }
                Poll::Ready(Err(Failure::Write(e))) => {
                    return Poll::Ready(Err(fail(Side::Backend, "write", e, &up, &down, first_eof)))
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
                    return Poll::Ready(Err(fail(Side::Backend, "read", e, &up, &down, first_eof)))
                }
                Poll::Ready(Err(Failure::Write(e))) => {
                    return Poll::Ready(Err(fail(Side::Client, "write", e, &up, &down, first_eof)))
                }
                Poll::Pending => {}
            }
        }
        if up_done && down_done {
            Poll::Ready(Ok(RelayStats {
                client_to_backend: up.total,
                backend_to_client: down.total,
                first_eof,
            }))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move { relay(&mut client, &mut backend).await });
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
    }
}
