//! Admission limits: past `limits.max_connections` a client gets FATAL 53300
//! over TLS (not a reset); `limits.max_handshakes_in_flight` makes a second
//! handshake wait while a stalled one holds the only permit, and it goes
//! through once that one's deadline passes; `limits.idle_timeout` closes an
//! idle session with FATAL 57P05.

use std::time::Duration;

use crate::common::client::{
    error_fields, psql, read_message, read_until_ready, startup_message, tls_client, tls_session,
    verify_full, SSL_REQUEST,
};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn session(proxy: &TestProxy, pki: &Pki) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tls = tls_session(proxy.addr, &pki.root_cert).await;
    tls.write_all(&startup_message(&[
        ("user", "bob"),
        ("database", "postgres"),
    ]))
    .await
    .expect("startup");
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);

    // max_connections = 1.
    let mut c = config(&pki, &pg.address());
    c.limits.max_connections = 1;
    let proxy = TestProxy::start(c).await;
    let mut first = session(&proxy, &pki).await;
    read_until_ready(&mut first).await.expect("first session");
    let err = psql(
        &verify_full(proxy.port(), "bob", &pki.root_cert),
        None,
        "SELECT 1",
    )
    .await
    .expect_err("over the limit");
    assert!(err.contains("sorry, too many clients already"), "{err}");
    let mut second = session(&proxy, &pki).await;
    let (tag, body) = read_message(&mut second).await.expect("error over TLS");
    assert_eq!(tag, b'E');
    assert_eq!(error_fields(&body)[&'C'], "53300");
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_connections_closed_total{reason="limit"}"#, 2.0)
            .await,
        2.0
    );
    drop(first);

    // max_handshakes_in_flight = 1, with a stalled handshake holding it.
    let mut c = config(&pki, &pg.address());
    c.limits.max_handshakes_in_flight = 1;
    c.limits.handshake_timeout = Duration::from_secs(4);
    let proxy = TestProxy::start(c).await;
    let mut stalled = TcpStream::connect(proxy.addr).await.expect("connect");
    stalled.write_all(&SSL_REQUEST).await.expect("ssl");
    assert_eq!(stalled.read_u8().await.expect("S"), b'S');
    // A ClientHello, then silence: rustls waits for the rest of the
    // handshake while the permit is held.
    let client_config = tls_client(&pki.root_cert, &[]);
    let mut conn =
        rustls::ClientConnection::new(client_config, "localhost".try_into().expect("name"))
            .expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("ClientHello");
    stalled.write_all(&hello).await.expect("send hello");
    assert_eq!(
        proxy
            .metric_when("pgtls_tls_handshakes_in_flight", 1.0)
            .await,
        1.0
    );
    // The second client waits for the permit, then succeeds. Its own
    // handshake deadline runs from its accept, the wait included: it comes
    // 2.5 s after the stalled one, so it has about that long left once the
    // stalled handshake's 4 s are up (a busy machine needs the margin).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let out = psql(
        &verify_full(proxy.port(), "bob", &pki.root_cert),
        None,
        "SELECT 'admitted'",
    )
    .await
    .expect("admitted after the stalled handshake times out");
    assert_eq!(out, "admitted");
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_tls_handshake_failures_total{reason="timeout"}"#,
                1.0
            )
            .await,
        1.0
    );
    drop(stalled);

    // idle_timeout.
    let mut c = config(&pki, &pg.address());
    c.limits.idle_timeout = Some(Duration::from_millis(500));
    let proxy = TestProxy::start(c).await;
    let mut idle = session(&proxy, &pki).await;
    read_until_ready(&mut idle).await.expect("ready");
    let (tag, body) = read_message(&mut idle)
        .await
        .expect("a message after idling");
    assert_eq!(tag, b'E');
    let fields = error_fields(&body);
    assert_eq!(
        (fields[&'S'].as_str(), fields[&'C'].as_str()),
        ("FATAL", "57P05")
    );
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_connections_closed_total{reason="limit"}"#, 1.0)
            .await,
        1.0
    );
}
