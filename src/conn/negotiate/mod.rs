//! Everything a client says before its StartupMessage, as one explicit
//! state machine over the raw socket:
//!
//! ```text
//! start ──0x16──────────────► direct TLS (ALPN "postgresql" required)
//!   │                                  │
//!   ├─GSSENCRequest─► 'N' ─► start'    │   (each request at most once)
//!   ├─SSLRequest───► 'S' ─► TLS ───────┤
//!   ├─CancelRequest─► done             ▼
//!   └─StartupMessage─► plaintext?   packet inside TLS: Startup | Cancel
//! ```
//!
//! Rules it enforces (see shared/PROTOCOL.md):
//! - exactly the 8 bytes of an SSLRequest are consumed; if anything else
//!   already arrived before our `S`, the connection is refused and none of
//!   it is processed (CVE-2021-23214 / CVE-2021-3935);
//! - no buffered reader ever sits under the TLS stream;
//! - a second SSLRequest/GSSENCRequest, or one inside TLS, is a protocol
//!   violation;
//! - startup packets are capped at
//!   [`MAX_STARTUP_PACKET_LENGTH`](crate::wire::MAX_STARTUP_PACKET_LENGTH).
//!
//! It never talks to the backend.

use std::sync::Arc;

use bytes::Bytes;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout_at, Instant};

use crate::conn::error::{Phase, SessionError};
use crate::metrics::Metrics;
use crate::wire::stream::{ClientSocket, ClientStream, MaybeTls};
use crate::wire::{read_packet, Packet, ProtocolError, ReadError, StartupPacket};

mod handshake;
#[cfg(test)]
mod tests;

pub use handshake::{failure_reason, TlsInfo};
use handshake::handshake;

/// First byte of a TLS handshake record: a direct-TLS ClientHello. It can
/// never start a startup packet (that would be a length over 369 MB).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How the client reached the startup phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Plaintext,
    SslRequest,
    DirectTls,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Plaintext => "plaintext",
            Path::SslRequest => "sslrequest",
            Path::DirectTls => "direct_tls",
        }
    }
}

/// What the client did before its startup, as counted in
/// `pgtls_negotiations_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    DirectTls,
    SslRequest,
    GssencDeclined,
    PlaintextAllowed,
    PlaintextRejected,
    EarlyData,
    ProtocolViolation,
    Cancel,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::DirectTls => "direct_tls",
            Event::SslRequest => "sslrequest",
            Event::GssencDeclined => "gssenc_declined",
            Event::PlaintextAllowed => "plaintext_allowed",
            Event::PlaintextRejected => "plaintext_rejected",
            Event::EarlyData => "early_data",
            Event::ProtocolViolation => "protocol_violation",
            Event::Cancel => "cancel",
        }
    }
}

/// The outcome of negotiation.
pub enum Negotiated<S = tokio::net::TcpStream> {
    Startup {
        stream: ClientStream<S>,
        startup: StartupPacket,
        path: Path,
        tls: Option<TlsInfo>,
    },
    /// A CancelRequest (plaintext or inside TLS), to forward; the stream
    /// only to close it properly.
    Cancel {
        packet: Bytes,
        path: Path,
        stream: ClientStream<S>,
        tls: Option<TlsInfo>,
    },
}

/// What negotiation needs from the proxy's state.
/// Which certificate a ClientHello's server name gets, and the route it
/// selects (routes: [`crate::conn::route`]).
pub trait Certificates: Sync {
    /// `None`: no certificate for this name (TLS alert unrecognized_name).
    fn select(&self, server_name: Option<&str>) -> Option<Selected>;
}

/// A certificate to serve, and the route its server name selected.
pub struct Selected {
    pub config: Arc<ServerConfig>,
    pub route: Option<Arc<crate::runtime::Route>>,
}

/// One certificate for every name, no routes.
impl Certificates for Arc<ServerConfig> {
    fn select(&self, _: Option<&str>) -> Option<Selected> {
        Some(Selected {
            config: self.clone(),
            route: None,
        })
    }
}

pub struct Ctx<'a> {
    pub tls: Option<&'a dyn Certificates>,
    pub allow_plaintext: bool,
    pub deadline: Instant,
    pub metrics: &'a Metrics,
    /// Admission for TLS handshakes (`limits.max_handshakes_in_flight`).
    pub handshake_slots: &'a tokio::sync::Semaphore,
}

/// A failure, with the stream when an ErrorResponse can still be sent on it.
pub struct Failed<S = tokio::net::TcpStream> {
    pub error: SessionError,
    pub stream: Option<ClientStream<S>>,
}

impl<S> Failed<S> {
    fn closed(error: SessionError) -> Self {
        Failed {
            error,
            stream: None,
        }
    }
}

impl Ctx<'_> {
    /// The one place negotiation events are counted.
    fn count(&self, event: Event) {
        self.metrics
            .negotiations
            .with_label_values(&[event.as_str()])
            .inc();
    }
}

/// Runs the state machine under `deadline`, and counts how it went.
pub async fn negotiate<S: ClientSocket>(io: S, ctx: &Ctx<'_>) -> Result<Negotiated<S>, Failed<S>> {
    let result = run(io, ctx).await;
    let settled = match &result {
        Ok(Negotiated::Cancel { .. }) => Some(Event::Cancel),
        Ok(Negotiated::Startup {
            path: Path::Plaintext,
            ..
        }) => Some(Event::PlaintextAllowed),
        // TLS paths were counted when the client chose them.
        Ok(Negotiated::Startup { .. }) => None,
        Err(f) => match f.error {
            SessionError::PlaintextRefused => Some(Event::PlaintextRejected),
            SessionError::EarlyData => Some(Event::EarlyData),
            SessionError::Protocol(_) => Some(Event::ProtocolViolation),
            _ => None,
        },
    };
    if let Some(event) = settled {
        ctx.count(event);
    }
    result
}

async fn run<S: ClientSocket>(mut tcp: S, ctx: &Ctx<'_>) -> Result<Negotiated<S>, Failed<S>> {
    let (tls, allow_plaintext, deadline) = (ctx.tls, ctx.allow_plaintext, ctx.deadline);
    let first = timeout_at(deadline, tcp.peek_byte())
        .await
        .map_err(|_| Failed::closed(SessionError::Timeout(Phase::Negotiation)))?
        .map_err(|e| Failed::closed(SessionError::ClientIo(e)))?;
    let Some(first) = first else {
        return Err(Failed::closed(SessionError::ClientEof("negotiation")));
    };
    if first == TLS_HANDSHAKE_RECORD {
        ctx.count(Event::DirectTls);
        return match tls {
            Some(config) => {
                let (stream, info) = handshake(tcp, config, Path::DirectTls, ctx).await?;
                read_inside_tls(stream, Path::DirectTls, info, deadline).await
            }
            // Without a certificate there is nothing to offer: close, as a
            // PostgreSQL server without ssl does on a ClientHello.
            None => Err(Failed::closed(SessionError::Protocol(
                ProtocolError::Unexpected("direct TLS connection but TLS is not configured"),
            ))),
        };
    }

    let mut gss_seen = false;
    let mut ssl_declined = false;
    loop {
        let packet = match timeout_at(deadline, read_packet(&mut tcp)).await {
            Err(_) => return Err(Failed::closed(SessionError::Timeout(Phase::Negotiation))),
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(plain_failure(tcp, e)),
        };
        match packet {
            Packet::GssEncRequest if !gss_seen => {
                gss_seen = true;
                ctx.count(Event::GssencDeclined);
                write_plain(&mut tcp, b"N").await?;
            }
            Packet::SslRequest if !ssl_declined => {
                // Refuse bytes that came with the SSLRequest, before `S`.
                if has_buffered_bytes(&mut tcp)? {
                    return Err(Failed {
                        error: SessionError::EarlyData,
                        stream: Some(MaybeTls::Plain(tcp)),
                    });
                }
                let Some(config) = tls else {
                    ssl_declined = true;
                    write_plain(&mut tcp, b"N").await?;
                    continue;
                };
                ctx.count(Event::SslRequest);
                write_plain(&mut tcp, b"S").await?;
                let (stream, info) = handshake(tcp, config, Path::SslRequest, ctx).await?;
                return read_inside_tls(stream, Path::SslRequest, info, deadline).await;
            }
            Packet::GssEncRequest | Packet::SslRequest => {
                return Err(Failed {
                    error: ProtocolError::Unexpected("duplicate encryption request").into(),
                    stream: Some(MaybeTls::Plain(tcp)),
                })
            }
            Packet::Cancel(packet) => {
                return Ok(Negotiated::Cancel {
                    packet,
                    path: Path::Plaintext,
                    stream: MaybeTls::Plain(tcp),
                    tls: None,
                })
            }
            Packet::Startup(startup) => {
                let stream = MaybeTls::Plain(tcp);
                if !allow_plaintext {
                    return Err(Failed {
                        error: SessionError::PlaintextRefused,
                        stream: Some(stream),
                    });
                }
                return Ok(Negotiated::Startup {
                    stream,
                    startup,
                    path: Path::Plaintext,
                    tls: None,
                });
            }
        }
    }
}

fn plain_failure<S>(tcp: S, e: ReadError) -> Failed<S> {
    let error = SessionError::from(e);
    let stream = matches!(error, SessionError::Protocol(_)).then_some(MaybeTls::Plain(tcp));
    Failed { error, stream }
}

async fn write_plain<S: ClientSocket>(tcp: &mut S, byte: &[u8]) -> Result<(), Failed<S>> {
    tcp.write_all(byte)
        .await
        .map_err(|e| Failed::closed(SessionError::ClientIo(e)))
}

/// True if the socket already holds bytes we have not read. Reading them
/// consumes them, which is fine: the connection is refused either way.
fn has_buffered_bytes<S: ClientSocket>(tcp: &mut S) -> Result<bool, Failed<S>> {
    match tcp.has_unread() {
        Ok(unread) => Ok(unread),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(Failed::closed(SessionError::ClientEof("negotiation")))
        }
        Err(e) => Err(Failed::closed(SessionError::ClientIo(e))),
    }
}

async fn read_inside_tls<S: ClientSocket>(
    mut stream: ClientStream<S>,
    path: Path,
    info: TlsInfo,
    deadline: Instant,
) -> Result<Negotiated<S>, Failed<S>> {
    let packet = match timeout_at(deadline, read_packet(&mut stream)).await {
        Err(_) => return Err(Failed::closed(SessionError::Timeout(Phase::Startup))),
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            let error = SessionError::from(e);
            let stream = matches!(error, SessionError::Protocol(_)).then_some(stream);
            return Err(Failed { error, stream });
        }
    };
    match packet {
        Packet::SslRequest | Packet::GssEncRequest => Err(Failed {
            error: ProtocolError::Unexpected("encryption request inside an encrypted session")
                .into(),
            stream: Some(stream),
        }),
        Packet::Cancel(packet) => Ok(Negotiated::Cancel {
            packet,
            path,
            stream,
            tls: Some(info),
        }),
        Packet::Startup(startup) => Ok(Negotiated::Startup {
            stream,
            startup,
            path,
            tls: Some(info),
        }),
    }
}
