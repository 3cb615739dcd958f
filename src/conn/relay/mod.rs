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

mod direction;
mod framer;
mod idle;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::metrics::RelayProgress;
use direction::{Direction, Flow};
#[cfg(feature = "testing")]
pub use framer::Framer;
use idle::Idleness;

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
    /// The client's last message was Terminate: it ended the session, even
    /// when the backend's close (its answer) arrived first.
    pub client_terminated: bool,
    pub ending: Ending,
}

/// Bytes already read, and how a relay may be ended from outside.
#[derive(Default)]
pub struct Options<'a> {
    pub terminate: Option<&'a crate::sys::stop::Stop>,
    pub idle_timeout: Option<Duration>,
    /// Read from the backend past ReadyForQuery, not yet sent to the client.
    /// Owned, so the authentication phase's buffers can be freed.
    pub to_client: bytes::BytesMut,
    /// Read from the client during authentication, not yet sent on.
    pub to_backend: bytes::BytesMut,
    /// Where bytes moved are published while the session runs.
    pub progress: Option<RelayProgress>,
}

/// Copies until both directions have ended, either fails, or `limits`
/// end it at a backend message boundary.
///
/// The setup runs before the future is made, so the future (which an idle
/// session holds for its whole life) carries none of `limits`' fields it
/// no longer needs.
pub fn relay<'a, C, B>(
    client: &'a mut C,
    backend: &'a mut B,
    limits: Options<'a>,
) -> impl Future<Output = Result<RelayStats, RelayError>> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Options {
        terminate,
        idle_timeout,
        to_client,
        to_backend,
        progress,
    } = limits;
    // The login's buffers are freed as soon as their bytes are copied.
    let state = State {
        up: Direction::new(Flow::ClientToBackend, &to_backend),
        down: Direction::new(Flow::BackendToClient, &to_client),
        up_done: false,
        down_done: false,
        first_eof: None,
        stopping: None,
        idle: Idleness::new(idle_timeout),
        reported: (0, 0),
        report: None,
    };
    drop((to_client, to_backend));
    run(client, backend, state, terminate, progress)
}

/// What the relay keeps between wake-ups, in one place so its poll borrows
/// one thing.
struct State {
    up: Direction,
    down: Direction,
    up_done: bool,
    down_done: bool,
    first_eof: Option<Side>,
    stopping: Option<Ending>,
    idle: Idleness,
    /// Bytes last published to `progress`.
    reported: (u64, u64),
    /// The next report, set only while bytes move: an idle session is not
    /// woken every [`RelayProgress::EVERY`] for nothing, nor holds a timer.
    report: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl State {
    /// Before the relay waits: when bytes moved since the last report,
    /// the next one in EVERY (a clock read and a small allocation, at most
    /// once per EVERY).
    fn arm_report(&mut self, reporting: bool, cx: &mut std::task::Context<'_>) {
        if reporting && self.report.is_none() && self.reported != (self.up.total, self.down.total)
        {
            let mut report = Box::pin(tokio::time::sleep(RelayProgress::EVERY));
            let _ = report.as_mut().poll(cx);
            self.report = Some(report);
        }
    }

    fn stats(&self, ending: Ending) -> RelayStats {
        RelayStats {
            client_to_backend: self.up.total,
            backend_to_client: self.down.total,
            first_eof: self.first_eof,
            client_terminated: self.up.ends_with_terminate(),
            ending,
        }
    }
}

/// An async block, not an async fn: an async fn would keep a second copy of
/// its arguments in the future for the session's whole life.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments in its future"
)]
fn run<'a, C, B>(
    client: &'a mut C,
    backend: &'a mut B,
    mut state: State,
    terminate: Option<&'a crate::sys::stop::Stop>,
    progress: Option<RelayProgress>,
) -> impl Future<Output = Result<RelayStats, RelayError>> + 'a
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    async move {
        let terminate = terminate.map(|t| t.wait());
        tokio::pin!(terminate);
        let s = &mut state;
        let result = poll_fn(|cx| {
            if let (Some(p), Some(report)) = (&progress, &mut s.report) {
                if report.as_mut().poll(cx).is_ready() {
                    p.publish(&mut s.reported, s.up.total, s.down.total);
                    s.report = None;
                }
            }
            if s.stopping.is_none() {
                if terminate
                    .as_mut()
                    .as_pin_mut()
                    .is_some_and(|t| t.poll(cx).is_ready())
                {
                    s.stopping = Some(Ending::Terminated);
                } else if s.idle.poll_expired(cx, &s.up, &s.down) {
                    s.stopping = Some(Ending::Idle);
                }
            }
            if let Some(ending) = s.stopping {
                let polled =
                    s.down
                        .poll_to_boundary(cx, Pin::new(&mut *backend), Pin::new(&mut *client));
                let Poll::Ready(done) = polled else {
                    s.arm_report(progress.is_some(), cx);
                    return Poll::Pending;
                };
                let stats = s.stats(ending);
                return Poll::Ready(
                    done.map(|()| stats)
                        .map_err(|f| f.into_error(Flow::BackendToClient, stats)),
                );
            }
            for flow in [Flow::ClientToBackend, Flow::BackendToClient] {
                let (done, polled) = match flow {
                    Flow::ClientToBackend if !s.up_done => (
                        &mut s.up_done,
                        s.up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *backend)),
                    ),
                    Flow::BackendToClient if !s.down_done => (
                        &mut s.down_done,
                        s.down.poll_copy(cx, Pin::new(&mut *backend), Pin::new(&mut *client)),
                    ),
                    _ => continue,
                };
                match polled {
                    Poll::Ready(Ok(())) => {
                        *done = true;
                        s.first_eof.get_or_insert(flow.source());
                    }
                    Poll::Ready(Err(f)) => {
                        let stats = s.stats(Ending::Closed);
                        return Poll::Ready(Err(f.into_error(flow, stats)));
                    }
                    Poll::Pending => {}
                }
            }
            s.idle.observe(&s.up, &s.down);
            if s.up_done && s.down_done {
                return Poll::Ready(Ok(s.stats(Ending::Closed)));
            }
            s.arm_report(progress.is_some(), cx);
            Poll::Pending
        })
        .await;
        if let Some(p) = &progress {
            let stats = match &result {
                Ok(stats) => stats,
                Err(e) => &e.stats,
            };
            p.publish(
                &mut state.reported,
                stats.client_to_backend,
                stats.backend_to_client,
            );
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Options that publish to fresh counters, and those counters.
    fn reporting() -> (RelayProgress, Options<'static>) {
        let progress = RelayProgress {
            client_to_backend: prometheus::IntCounter::new("up", "up").expect("counter"),
            backend_to_client: prometheus::IntCounter::new("down", "down").expect("counter"),
        };
        let options = Options {
            progress: Some(progress.clone()),
            ..Options::default()
        };
        (progress, options)
    }

    /// Bytes show in the counters while the session runs, not only at
    /// its end, and the final count is exact.
    #[tokio::test(start_paused = true)]
    async fn publishes_progress_while_running() {
        let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let (progress, options) = reporting();
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

    /// Counts the reads the relay makes from it.
    struct Counted<S> {
        inner: S,
        reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Once its last bytes are published, an idle session is not woken
    /// again: thousands of idle sessions cost no CPU.
    #[tokio::test(start_paused = true)]
    async fn an_idle_session_is_not_woken_by_the_progress_timer() {
        let (mut client_end, client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut client = Counted {
            inner: client,
            reads: reads.clone(),
        };
        let (progress, options) = reporting();
        let task = tokio::spawn(async move { relay(&mut client, &mut backend, options).await });
        client_end.write_all(&[1u8; 100]).await.expect("write");
        let mut got = [0u8; 100];
        backend_end.read_exact(&mut got).await.expect("read");
        tokio::time::sleep(RelayProgress::EVERY * 2).await;
        assert_eq!(progress.client_to_backend.get(), 100, "reported once idle");
        let settled = reads.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(RelayProgress::EVERY * 20).await;
        assert_eq!(
            reads.load(std::sync::atomic::Ordering::Relaxed),
            settled,
            "no wake-up while idle"
        );
        drop(client_end);
        drop(backend_end);
        let _ = task.await.expect("join");
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

    #[tokio::test]
    async fn terminate_stops_at_a_message_boundary() {
        let (mut client_end, mut client) = tokio::io::duplex(64 * 1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(64 * 1024);
        let stop = std::sync::Arc::new(crate::sys::stop::Stop::new());
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
        stop.fire();
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

    /// A write error blames the peer written to, a read error the peer
    /// read from.
    #[tokio::test]
    async fn failing_side_is_the_peer_that_failed() {
        let (client_end, mut client) = tokio::io::duplex(1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(1024);
        drop(client_end);
        let task =
            tokio::spawn(async move { relay(&mut client, &mut backend, Options::default()).await });
        backend_end.write_all(&msg(b'D', &[1; 10])).await.expect("write");
        let err = task.await.expect("join").expect_err("client is gone");
        assert_eq!((err.side, err.op), (Side::Client, "write"));
        assert_eq!(err.stats.first_eof, Some(Side::Client));
    }

    /// psql sends Terminate and the backend closes at once: whichever EOF
    /// the proxy sees first, the client ended the session.
    #[tokio::test]
    async fn a_terminate_marks_the_client_as_the_one_who_ended() {
        let (mut client_end, mut client) = tokio::io::duplex(1024);
        let (mut backend, mut backend_end) = tokio::io::duplex(1024);
        let task =
            tokio::spawn(async move { relay(&mut client, &mut backend, Options::default()).await });
        client_end.write_all(&msg(b'X', b"")).await.expect("terminate");
        let mut x = [0u8; 5];
        backend_end.read_exact(&mut x).await.expect("relayed");
        drop(backend_end);
        let mut rest = Vec::new();
        client_end.read_to_end(&mut rest).await.expect("closed");
        drop(client_end);
        let stats = task.await.expect("join").expect("relay");
        assert_eq!(stats.first_eof, Some(Side::Backend));
        assert!(stats.client_terminated);
    }
}
