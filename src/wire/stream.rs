//! A connection that is either plaintext or TLS, so the rest of the session
//! code is written once. Reads and writes delegate; nothing is buffered here.
//! [`ClientSocket`] is what negotiation needs from the socket underneath
//! (a TCP stream in the proxy, an in-memory pipe in unit tests and fuzzing).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::future::Future;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum MaybeTls<S, T> {
    Plain(S),
    Tls(Box<T>),
}

/// Client side of the proxy: what a PostgreSQL client connected with.
pub type ClientStream<S = TcpStream> = MaybeTls<S, tokio_rustls::server::TlsStream<S>>;
/// Backend side: the proxy's link to PostgreSQL.
pub type BackendStream = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS stream whose peer may have presented certificates.
pub trait PeerCertificates {
    fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]>;
}

impl<S> PeerCertificates for tokio_rustls::server::TlsStream<S> {
    fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.get_ref().1.peer_certificates()
    }
}

impl<S> PeerCertificates for tokio_rustls::client::TlsStream<S> {
    fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.get_ref().1.peer_certificates()
    }
}

impl<S, T: PeerCertificates> MaybeTls<S, T> {
    /// The peer's leaf certificate (DER) on a TLS stream: the client's
    /// verified certificate, or the backend's.
    pub fn peer_leaf(&self) -> Option<&[u8]> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(s) => s.peer_certificates()?.first().map(|c| c.as_ref()),
        }
    }
}

/// What negotiation needs from a client socket besides bytes.
pub trait ClientSocket: AsyncRead + AsyncWrite + Unpin + Send {
    /// The first byte, left in place for whoever reads next (a TLS
    /// ClientHello must reach rustls whole). `None` when the peer closed.
    fn peek_byte(&mut self) -> impl Future<Output = io::Result<Option<u8>>> + Send;

    /// Whether bytes already arrived that nobody read, without waiting.
    /// May consume them: a caller that gets `true` refuses the connection.
    /// A closed peer is `UnexpectedEof`.
    fn has_unread(&mut self) -> io::Result<bool>;
}

impl ClientSocket for TcpStream {
    async fn peek_byte(&mut self) -> io::Result<Option<u8>> {
        let mut first = [0u8; 1];
        Ok((self.peek(&mut first).await? == 1).then_some(first[0]))
    }

    fn has_unread(&mut self) -> io::Result<bool> {
        let mut probe = [0u8; 1];
        match self.try_read(&mut probe) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl<S, T> MaybeTls<S, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl<S: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for MaybeTls<S, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<S, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An in-memory client socket for tests and fuzzing: one end of a
/// `tokio::io::duplex` pipe with the peek a TCP socket has.
#[cfg(any(test, feature = "testing"))]
pub mod memory {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    pub struct MemorySocket {
        io: DuplexStream,
        peeked: Option<u8>,
    }

    /// A connected pair: the proxy's socket and the client's end.
    pub fn pair(capacity: usize) -> (MemorySocket, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(capacity);
        (
            MemorySocket {
                io: ours,
                peeked: None,
            },
            theirs,
        )
    }

    impl ClientSocket for MemorySocket {
        async fn peek_byte(&mut self) -> io::Result<Option<u8>> {
            if self.peeked.is_none() {
                let mut one = [0u8; 1];
                if self.io.read(&mut one).await? == 0 {
                    return Ok(None);
                }
                self.peeked = Some(one[0]);
            }
            Ok(self.peeked)
        }

        fn has_unread(&mut self) -> io::Result<bool> {
            if self.peeked.is_some() {
                return Ok(true);
            }
            let mut one = [0u8; 1];
            let mut buf = ReadBuf::new(&mut one);
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match Pin::new(&mut self.io).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    Err(io::ErrorKind::UnexpectedEof.into())
                }
                Poll::Ready(Ok(())) => {
                    self.peeked = Some(one[0]);
                    Ok(true)
                }
                Poll::Ready(Err(e)) => Err(e),
                Poll::Pending => Ok(false),
            }
        }
    }

    impl AsyncRead for MemorySocket {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(b) = this.peeked {
                if buf.remaining() > 0 {
                    buf.put_slice(&[b]);
                    this.peeked = None;
                }
                return Poll::Ready(Ok(()));
            }
            Pin::new(&mut this.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for MemorySocket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }
}
