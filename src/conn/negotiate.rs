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
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::LazyConfigAcceptor;

use crate::conn::error::{Phase, SessionError};
use crate::metrics::Metrics;
use crate::tls::ALPN_POSTGRESQL;
use crate::wire::stream::{ClientStream, MaybeTls};
use crate::wire::{read_packet, Packet, ProtocolError, ReadError, StartupPacket};

/// First byte of a TLS handshake record: a direct-TLS ClientHello. It can
/// never start a startup packet (that would be a length over 369 MB).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// TLS alert record: fatal (2), no_application_protocol (120), RFC 7301.
/// Sent in plaintext before any ServerHello, as PostgreSQL 17 does.
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

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

/// The outcome of negotiation.
pub enum Negotiated {
    Startup {
        stream: ClientStream,
        startup: StartupPacket,
        path: Path,
        tls: Option<TlsInfo>,
    },
    /// A CancelRequest (plaintext or inside TLS), to forward; the stream
    /// only to close it properly.
    Cancel {
        packet: Bytes,
        path: Path,
        stream: ClientStream,
        tls: Option<TlsInfo>,
    },
}

/// What the TLS handshake settled, for logs and metrics.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    pub sni: Option<String>,
    pub version: &'static str,
    pub cipher: &'static str,
    pub resumed: bool,
}

/// What negotiation needs from the proxy's state.
pub struct Ctx<'a> {
    pub tls: Option<&'a Arc<ServerConfig>>,
    pub allow_plaintext: bool,
    pub deadline: Instant,
    pub metrics: &'a Metrics,
    /// Admission for TLS handshakes (`limits.max_handshakes_in_flight`).
    pub handshake_slots: &'a tokio::sync::Semaphore,
}

/// A failure, with the stream when an ErrorResponse can still be sent on it.
pub struct Failed {
    pub error: SessionError,
    pub stream: Option<ClientStream>,
}

impl Failed {
    fn closed(error: SessionError) -> Self {
        Failed {
            error,
            stream: None,
        }
    }
}

/// Runs the state machine under `deadline`.
pub async fn negotiate(mut tcp: TcpStream, ctx: &Ctx<'_>) -> Result<Negotiated, Failed> {
    let (tls, allow_plaintext, deadline) = (ctx.tls, ctx.allow_plaintext, ctx.deadline);
    let mut first = [0u8; 1];
    let peeked = timeout_at(deadline, tcp.peek(&mut first))
        .await
        .map_err(|_| Failed::closed(SessionError::Timeout(Phase::Negotiation)))?
        .map_err(|e| Failed::closed(SessionError::ClientIo(e)))?;
    if peeked == 0 {
        return Err(Failed::closed(SessionError::ClientEof("negotiation")));
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        ctx.metrics
            .negotiations
            .with_label_values(&["direct_tls"])
            .inc();
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
                ctx.metrics
                    .negotiations
                    .with_label_values(&["gssenc_declined"])
                    .inc();
                write_plain(&mut tcp, b"N").await?;
            }
            Packet::SslRequest if !ssl_declined => {
                // Refuse bytes that came with the SSLRequest, before `S`.
                if has_buffered_bytes(&tcp)? {
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
                ctx.metrics
                    .negotiations
                    .with_label_values(&["sslrequest"])
                    .inc();
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

fn plain_failure(tcp: TcpStream, e: ReadError) -> Failed {
    let error = SessionError::from(e);
    let stream = matches!(error, SessionError::Protocol(_)).then_some(MaybeTls::Plain(tcp));
    Failed { error, stream }
}

async fn write_plain(tcp: &mut TcpStream, byte: &[u8]) -> Result<(), Failed> {
    tcp.write_all(byte)
        .await
        .map_err(|e| Failed::closed(SessionError::ClientIo(e)))
}

/// True if the socket already holds bytes we have not read. Reading them
/// consumes them, which is fine: the connection is refused either way.
fn has_buffered_bytes(tcp: &TcpStream) -> Result<bool, Failed> {
    let mut probe = [0u8; 1];
    match tcp.try_read(&mut probe) {
        Ok(0) => Err(Failed::closed(SessionError::ClientEof("negotiation"))),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(Failed::closed(SessionError::ClientIo(e))),
    }
}

/// The TLS handshake on the raw socket. On the direct path a ClientHello
/// without ALPN gets the no_application_protocol alert; a ClientHello
/// offering ALPN without "postgresql" is refused by rustls the same way.
/// Counts the outcome and times successful handshakes.
async fn handshake(
    tcp: TcpStream,
    config: &Arc<ServerConfig>,
    path: Path,
    ctx: &Ctx<'_>,
) -> Result<(ClientStream, TlsInfo), Failed> {
    let started = std::time::Instant::now();
    let result = handshake_inner(tcp, config, path, ctx).await;
    match &result {
        Ok((_, info)) => {
            let m = ctx.metrics;
            m.tls_handshake_duration
                .with_label_values(&[path.as_str(), info.version])
                .observe(started.elapsed().as_secs_f64());
            m.tls_sessions
                .with_label_values(&[info.version, info.cipher])
                .inc();
            m.tls_handshakes
                .with_label_values(&[if info.resumed { "true" } else { "false" }])
                .inc();
        }
        Err(failed) => {
            let reason = failure_reason(&failed.error);
            ctx.metrics
                .tls_handshake_failures
                .with_label_values(&[reason])
                .inc();
        }
    }
    result
}

async fn handshake_inner(
    tcp: TcpStream,
    config: &Arc<ServerConfig>,
    path: Path,
    ctx: &Ctx<'_>,
) -> Result<(ClientStream, TlsInfo), Failed> {
    let deadline = ctx.deadline;
    let timeout = || Failed::closed(SessionError::Timeout(Phase::TlsHandshake));
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let mut start = timeout_at(deadline, acceptor)
        .await
        .map_err(|_| timeout())?
        .map_err(|e| Failed::closed(SessionError::Tls(e)))?;
    if path == Path::DirectTls && start.client_hello().alpn().is_none() {
        let _ = start.io.write_all(&ALERT_NO_APPLICATION_PROTOCOL).await;
        return Err(Failed::closed(SessionError::DirectTlsWithoutAlpn));
    }
    // The expensive part (key exchange, signatures, certificate checks)
    // runs under an admission permit, taken only once a ClientHello is in:
    // silent sockets hold no permit, and a flood of handshakes cannot take
    // all the CPU from established sessions.
    let _permit = timeout_at(deadline, ctx.handshake_slots.acquire())
        .await
        .map_err(|_| timeout())?
        .map_err(|_| timeout())?;
    ctx.metrics.tls_handshakes_in_flight.inc();
    let accepted = timeout_at(deadline, start.into_stream(config.clone())).await;
    ctx.metrics.tls_handshakes_in_flight.dec();
    let stream = accepted
        .map_err(|_| timeout())?
        .map_err(|e| Failed::closed(SessionError::Tls(e)))?;
    let conn = stream.get_ref().1;
    // rustls only selects a protocol we offered; on the direct path one must
    // have been selected (an offer without it was refused above or by rustls).
    if path == Path::DirectTls && conn.alpn_protocol() != Some(ALPN_POSTGRESQL) {
        return Err(Failed::closed(SessionError::DirectTlsWithoutAlpn));
    }
    let info = TlsInfo {
        sni: conn.server_name().map(str::to_string),
        version: match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "other",
        },
        cipher: conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown"),
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    };
    Ok((MaybeTls::Tls(Box::new(stream)), info))
}

/// The closed `reason` label for a failed handshake.
pub fn failure_reason(error: &SessionError) -> &'static str {
    use rustls::CertificateError as C;
    match error {
        SessionError::Timeout(_) => "timeout",
        SessionError::DirectTlsWithoutAlpn => "alpn_mismatch",
        SessionError::Tls(io) => match io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::NoCertificatesPresented) => "no_client_cert",
            Some(rustls::Error::NoApplicationProtocol) => "alpn_mismatch",
            Some(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::ExtendedMasterSecretExtensionRequired,
            )) => "no_ems",
            Some(rustls::Error::PeerIncompatible(_)) => "protocol_version",
            Some(rustls::Error::InvalidCertificate(c)) => match c {
                C::UnknownIssuer => "unknown_ca",
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => "expired",
                C::Revoked => "revoked",
                _ => "bad_certificate",
            },
            _ => "other",
        },
        _ => "other",
    }
}

async fn read_inside_tls(
    mut stream: ClientStream,
    path: Path,
    info: TlsInfo,
    deadline: Instant,
) -> Result<Negotiated, Failed> {
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
