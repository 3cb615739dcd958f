//! The negotiation rules over in-memory sockets: no PostgreSQL, no TCP.
//! One end-to-end test per path stays in tests/it (negotiation_*.rs).

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;

use super::*;
use crate::config::{CertKey, ClientAuth, Tls};
use crate::metrics::Metrics;
use crate::wire::packet::encode_startup;
use crate::wire::stream::memory::{pair, MemorySocket};
use crate::wire::CANCEL_REQUEST_CODE;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// A server config as the proxy builds it, and a client that trusts it.
struct Pki {
    _dir: tempfile::TempDir,
    server: Arc<ServerConfig>,
    roots: RootCertStore,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    crate::cli::devcerts::write(dir.path(), &["localhost".into()], &[], &[]).expect("certs");
    let tls = Tls {
        server: Some(CertKey {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
        }),
        ..Tls::default()
    };
    let server = crate::tls::server::build(&tls, &ClientAuth::default())
        .expect("server config")
        .expect("tls configured")
        .config;
    let mut roots = RootCertStore::empty();
    for cert in crate::tls::pem::certs("ca", &dir.path().join("ca.crt")).expect("ca") {
        roots.add(cert).expect("root");
    }
    Pki {
        _dir: dir,
        server,
        roots,
    }
}

async fn tls_client(pki: &Pki, io: DuplexStream, alpn: Option<&[u8]>) -> std::io::Result<TlsStream<DuplexStream>> {
    let mut cfg = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, io)
        .await
}

struct Harness {
    metrics: Metrics,
    slots: Semaphore,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            metrics: Metrics::new(&prometheus::Registry::new()).expect("metrics"),
            slots: Semaphore::new(4),
        }
    }

    fn ctx<'a>(&'a self, tls: Option<&'a Arc<ServerConfig>>, allow_plaintext: bool) -> Ctx<'a> {
        Ctx {
            tls: tls.map(|t| t as &dyn super::Certificates),
            allow_plaintext,
            deadline: Instant::now() + Duration::from_secs(10),
            metrics: &self.metrics,
            handshake_slots: &self.slots,
        }
    }

    async fn run(
        &self,
        socket: MemorySocket,
        tls: Option<&Arc<ServerConfig>>,
        allow_plaintext: bool,
    ) -> Result<Negotiated<MemorySocket>, Failed<MemorySocket>> {
        negotiate(socket, &self.ctx(tls, allow_plaintext)).await
    }

    fn count(&self, event: Event) -> u64 {
        self.metrics
            .negotiations
            .with_label_values(&[event.as_str()])
            .get()
    }
}

fn startup() -> Vec<u8> {
    encode_startup(196608, &[("user", "alice"), ("database", "db")])
}

fn cancel() -> Vec<u8> {
    let mut p = vec![0, 0, 0, 16];
    p.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 7, 1, 2, 3, 4]);
    p
}

/// A client that sends SSLRequest, expects `S`, shakes hands and sends
/// `inside` over TLS.
async fn via_ssl_request(pki: &Pki, mut client: DuplexStream, inside: Vec<u8>) -> TlsStream<DuplexStream> {
    client.write_all(&SSL_REQUEST).await.expect("write");
    assert_eq!(read_byte(&mut client).await, b'S');
    let mut tls = tls_client(pki, client, None).await.expect("handshake");
    tls.write_all(&inside).await.expect("write inside TLS");
    tls
}

async fn read_byte(io: &mut DuplexStream) -> u8 {
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await.expect("one byte");
    b[0]
}

fn expect_startup(r: Result<Negotiated<MemorySocket>, Failed<MemorySocket>>, path: Path) -> Option<TlsInfo> {
    match r {
        Ok(Negotiated::Startup {
            startup,
            path: p,
            tls,
            ..
        }) => {
            assert_eq!(p, path);
            assert_eq!(startup.user(), Some("alice"));
            tls
        }
        Ok(Negotiated::Cancel { .. }) => panic!("a cancel, not a startup"),
        Err(f) => panic!("failed: {}", f.error),
    }
}

/// What the driver sends on a failed negotiation's stream, as the client
/// reads it: (severity, SQLSTATE).
async fn told<R: AsyncReadExt + Unpin>(f: Failed<MemorySocket>, client: &mut R) -> (String, String) {
    let mut stream = f.stream.expect("a stream to answer on");
    let err = f.error.client_error().expect("a client error");
    stream.write_all(&err.to_bytes()).await.expect("write");
    stream.flush().await.expect("flush");
    let mut head = [0u8; 5];
    client.read_exact(&mut head).await.expect("header");
    assert_eq!(head[0], b'E');
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    client.read_exact(&mut body).await.expect("body");
    let field = |code: u8| {
        body.split(|&b| b == 0)
            .find(|f| f.first() == Some(&code))
            .map(|f| String::from_utf8_lossy(&f[1..]).to_string())
            .unwrap_or_default()
    };
    (field(b'S'), field(b'C'))
}

fn expect_error(r: Result<Negotiated<MemorySocket>, Failed<MemorySocket>>) -> Failed<MemorySocket> {
    match r {
        Ok(_) => panic!("negotiation should fail"),
        Err(f) => f,
    }
}

#[tokio::test]
async fn ssl_request_then_startup_inside_tls() {
    let pki = pki();
    let h = Harness::new();
    let (socket, client) = pair(64 * 1024);
    let peer = via_ssl_request(&pki, client, startup());
    let (r, _tls) = tokio::join!(h.run(socket, Some(&pki.server), false), peer);
    let info = expect_startup(r, Path::SslRequest).expect("tls info");
    assert_eq!(info.sni.as_deref(), Some("localhost"));
    assert_eq!(h.count(Event::SslRequest), 1);
}

/// CVE-2021-23214: bytes sent with the SSLRequest, before `S`, are never
/// processed; the client is told in plaintext why.
#[tokio::test]
async fn bytes_after_ssl_request_are_refused() {
    let pki = pki();
    let h = Harness::new();
    let (socket, mut client) = pair(64 * 1024);
    let mut both = SSL_REQUEST.to_vec();
    both.extend(startup());
    client.write_all(&both).await.expect("write");
    let f = expect_error(h.run(socket, Some(&pki.server), false).await);
    assert!(matches!(f.error, SessionError::EarlyData), "{}", f.error);
    assert!(matches!(f.stream, Some(MaybeTls::Plain(_))));
    assert_eq!(h.count(Event::EarlyData), 1);
    assert_eq!(h.count(Event::SslRequest), 0, "never answered S");
}

#[tokio::test]
async fn gssenc_is_declined_once_then_ssl_proceeds() {
    let pki = pki();
    let h = Harness::new();
    let (socket, mut client) = pair(64 * 1024);
    let peer = async {
        client.write_all(&GSSENC_REQUEST).await.expect("write");
        assert_eq!(read_byte(&mut client).await, b'N');
        client.write_all(&SSL_REQUEST).await.expect("write");
        assert_eq!(read_byte(&mut client).await, b'S');
        let mut tls = tls_client(&pki, client, None).await.expect("handshake");
        tls.write_all(&startup()).await.expect("startup");
        tls
    };
    let (r, _tls) = tokio::join!(h.run(socket, Some(&pki.server), false), peer);
    expect_startup(r, Path::SslRequest);
    assert_eq!(h.count(Event::GssencDeclined), 1);
}

/// Each request at most once: a second GSSENCRequest after `N` gets
/// FATAL 08P01 in plaintext.
#[tokio::test]
async fn a_second_encryption_request_is_a_protocol_violation() {
    let h = Harness::new();
    let (socket, mut client) = pair(1024);
    let peer = async {
        client.write_all(&GSSENC_REQUEST).await.expect("write");
        assert_eq!(read_byte(&mut client).await, b'N');
        client.write_all(&GSSENC_REQUEST).await.expect("write");
        client
    };
    let (r, mut client) = tokio::join!(h.run(socket, None, true), peer);
    let f = expect_error(r);
    assert!(matches!(f.error, SessionError::Protocol(_)), "{}", f.error);
    assert_eq!(told(f, &mut client).await, ("FATAL".into(), "08P01".into()));
    assert_eq!(h.count(Event::ProtocolViolation), 1);
}

#[tokio::test]
async fn plaintext_startup_refused_unless_allowed() {
    let h = Harness::new();
    let (socket, mut client) = pair(1024);
    client.write_all(&startup()).await.expect("write");
    let f = expect_error(h.run(socket, None, false).await);
    assert!(matches!(f.error, SessionError::PlaintextRefused));
    assert!(f.stream.is_some());
    assert_eq!(h.count(Event::PlaintextRejected), 1);

    let (socket, mut client) = pair(1024);
    client.write_all(&startup()).await.expect("write");
    let r = h.run(socket, None, true).await;
    assert!(expect_startup(r, Path::Plaintext).is_none());
    assert_eq!(h.count(Event::PlaintextAllowed), 1);
}

/// Without a certificate an SSLRequest is declined with `N`, as a
/// PostgreSQL server without ssl does.
#[tokio::test]
async fn ssl_request_without_tls_gets_n() {
    let h = Harness::new();
    let (socket, mut client) = pair(1024);
    let peer = async {
        client.write_all(&SSL_REQUEST).await.expect("write");
        assert_eq!(read_byte(&mut client).await, b'N');
        client.write_all(&startup()).await.expect("write");
        client
    };
    let (r, _client) = tokio::join!(h.run(socket, None, true), peer);
    expect_startup(r, Path::Plaintext);
}

#[tokio::test]
async fn direct_tls_needs_alpn_postgresql() {
    let pki = pki();
    let h = Harness::new();
    let (socket, client) = pair(64 * 1024);
    let peer = async {
        let mut tls = tls_client(&pki, client, Some(b"postgresql"))
            .await
            .expect("handshake");
        tls.write_all(&startup()).await.expect("startup");
        tls
    };
    let (r, _tls) = tokio::join!(h.run(socket, Some(&pki.server), false), peer);
    expect_startup(r, Path::DirectTls);
    assert_eq!(h.count(Event::DirectTls), 1);

    // No ALPN: the no_application_protocol alert, in plaintext.
    let (socket, client) = pair(64 * 1024);
    let (r, handshake) = tokio::join!(
        h.run(socket, Some(&pki.server), false),
        tls_client(&pki, client, None)
    );
    let f = expect_error(r);
    assert!(matches!(f.error, SessionError::DirectTlsWithoutAlpn));
    let err = handshake.expect_err("refused").to_string();
    assert!(err.contains("NoApplicationProtocol"), "{err}");
    assert_eq!(failure_reason(&f.error), "alpn_mismatch");

    // A different protocol offered: rustls refuses it the same way.
    let (socket, client) = pair(64 * 1024);
    let (r, handshake) = tokio::join!(
        h.run(socket, Some(&pki.server), false),
        tls_client(&pki, client, Some(b"http/1.1"))
    );
    assert_eq!(failure_reason(&expect_error(r).error), "alpn_mismatch");
    assert!(handshake.is_err());
}

#[tokio::test]
async fn cancel_requests_plain_and_inside_tls() {
    let pki = pki();
    let h = Harness::new();
    let (socket, mut client) = pair(1024);
    client.write_all(&cancel()).await.expect("write");
    match h.run(socket, Some(&pki.server), false).await {
        Ok(Negotiated::Cancel { packet, path, .. }) => {
            assert_eq!(path, Path::Plaintext);
            assert_eq!(&packet[..], &cancel()[..]);
        }
        _ => panic!("a cancel"),
    }
    let (socket, client) = pair(64 * 1024);
    let peer = via_ssl_request(&pki, client, cancel());
    let (r, _tls) = tokio::join!(h.run(socket, Some(&pki.server), false), peer);
    assert!(matches!(
        r,
        Ok(Negotiated::Cancel {
            path: Path::SslRequest,
            tls: Some(_),
            ..
        })
    ));
    assert_eq!(h.count(Event::Cancel), 2);
}

/// An SSLRequest or GSSENCRequest inside TLS is a protocol violation,
/// answered with FATAL 08P01 over TLS.
#[tokio::test]
async fn encryption_request_inside_tls_is_a_violation() {
    let pki = pki();
    let h = Harness::new();
    for second in [SSL_REQUEST, GSSENC_REQUEST] {
        let (socket, client) = pair(64 * 1024);
        let peer = via_ssl_request(&pki, client, second.to_vec());
        let (r, mut tls) = tokio::join!(h.run(socket, Some(&pki.server), false), peer);
        let f = expect_error(r);
        assert!(matches!(f.error, SessionError::Protocol(_)));
        assert!(matches!(f.stream, Some(MaybeTls::Tls(_))), "told inside TLS");
        assert_eq!(told(f, &mut tls).await, ("FATAL".into(), "08P01".into()));
    }
}

#[tokio::test]
async fn oversized_startup_is_refused_before_reading_it() {
    let h = Harness::new();
    let (socket, mut client) = pair(1024);
    client
        .write_all(&(10_000i32 + 5).to_be_bytes())
        .await
        .expect("write");
    let f = expect_error(h.run(socket, None, true).await);
    assert!(matches!(
        f.error,
        SessionError::Protocol(crate::wire::ProtocolError::StartupLength)
    ));
}

#[tokio::test(start_paused = true)]
async fn silence_runs_into_the_deadline() {
    let h = Harness::new();
    let (socket, _client) = pair(1024);
    let f = expect_error(h.run(socket, None, true).await);
    assert!(matches!(f.error, SessionError::Timeout(Phase::Negotiation)));
    assert!(f.stream.is_none());
}

#[tokio::test]
async fn a_client_that_leaves_is_an_eof() {
    let h = Harness::new();
    let (socket, client) = pair(1024);
    drop(client);
    let f = expect_error(h.run(socket, None, true).await);
    assert!(matches!(f.error, SessionError::ClientEof(_)));
}
