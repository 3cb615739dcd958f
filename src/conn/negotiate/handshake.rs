//! The TLS handshake on a client socket, under the connection's deadline
//! and the handshake admission limit; ALPN rules for direct TLS; what the
//! handshake settled, and the closed `reason` label when it fails.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::time::timeout_at;
use tokio_rustls::LazyConfigAcceptor;

use super::{Certificates, Ctx, Failed, Path, Selected};
use crate::conn::error::{Phase, SessionError};
use crate::tls::ALPN_POSTGRESQL;
use crate::wire::stream::{ClientSocket, ClientStream, MaybeTls};

/// TLS alert record: fatal (2), no_application_protocol (120), RFC 7301.
/// Sent in plaintext before any ServerHello, as PostgreSQL 17 does.
const ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];
/// TLS alert record: fatal (2), unrecognized_name (112), RFC 6066: a
/// server name no route has, and no default route.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// What the TLS handshake settled, for logs and metrics.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    pub sni: Option<String>,
    pub version: &'static str,
    pub cipher: &'static str,
    pub resumed: bool,
    /// The route whose certificate was served, when a server name chose it.
    pub route: Option<Arc<crate::runtime::Route>>,
}

/// The TLS handshake on the raw socket. On the direct path a ClientHello
/// without ALPN gets the no_application_protocol alert; a ClientHello
/// offering ALPN without "postgresql" is refused by rustls the same way.
/// Counts the outcome and times successful handshakes.
pub(super) async fn handshake<S: ClientSocket>(
    tcp: S,
    certs: &dyn Certificates,
    path: Path,
    ctx: &Ctx<'_>,
) -> Result<(ClientStream<S>, TlsInfo), Failed<S>> {
    let started = std::time::Instant::now();
    let result = handshake_inner(tcp, certs, path, ctx).await;
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

async fn handshake_inner<S: ClientSocket>(
    tcp: S,
    certs: &dyn Certificates,
    path: Path,
    ctx: &Ctx<'_>,
) -> Result<(ClientStream<S>, TlsInfo), Failed<S>> {
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
    // The certificate, and with a server name the route, are chosen here,
    // once: the connection keeps both (a reload cannot swap them).
    let Some(Selected { config, route }) = certs.select(start.client_hello().server_name()) else {
        let _ = start.io.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        return Err(Failed::closed(SessionError::UnknownServerName));
    };
    // The expensive part (key exchange, signatures, certificate checks)
    // runs under an admission permit, taken only once a ClientHello is in:
    // silent sockets hold no permit, and a flood of handshakes cannot take
    // all the CPU from established sessions.
    let _permit = timeout_at(deadline, ctx.handshake_slots.acquire())
        .await
        .map_err(|_| timeout())?
        .map_err(|_| timeout())?;
    ctx.metrics.tls_handshakes_in_flight.inc();
    let accepted = timeout_at(deadline, start.into_stream(config)).await;
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
        route,
    };
    Ok((MaybeTls::Tls(Box::new(stream)), info))
}

/// The closed `reason` label for a failed handshake.
pub fn failure_reason(error: &SessionError) -> &'static str {
    use rustls::CertificateError as C;
    match error {
        SessionError::Timeout(_) => "timeout",
        SessionError::DirectTlsWithoutAlpn => "alpn_mismatch",
        SessionError::UnknownServerName => "unrecognized_name",
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

