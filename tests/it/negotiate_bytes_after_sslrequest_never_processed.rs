//! CVE-2021-23214 / CVE-2021-3935 class: plaintext bytes injected behind an
//! SSLRequest are never processed, whether they arrive before our `S` (the
//! client is refused with 08P01) or after it (the TLS handshake fails).
//! Either way the backend is never contacted.

use crate::common::client::{error_fields, read_message, startup_message, SSL_REQUEST};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_sslrequest_never_processed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["victim"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;
    let injected = startup_message(&[("user", "victim"), ("database", "postgres")]);

    // Before `S`: one segment with SSLRequest + a plaintext startup.
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut packet = SSL_REQUEST.to_vec();
    packet.extend_from_slice(&injected);
    tcp.write_all(&packet).await.expect("send");
    let (tag, body) = read_message(&mut tcp).await.expect("answer");
    assert_eq!(tag, b'E', "no `S` may be sent");
    let fields = error_fields(&body);
    assert_eq!(fields[&'C'], "08P01");
    assert!(fields[&'M'].contains("unencrypted data after SSL request"));
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "connection closed after the error");

    // After `S`: plaintext where a ClientHello belongs fails the handshake.
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&SSL_REQUEST).await.expect("send");
    assert_eq!(tcp.read_u8().await.expect("S"), b'S');
    tcp.write_all(&injected).await.expect("inject");
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(!rest.windows(1).any(|w| w == b"Z"), "never a ReadyForQuery");

    assert_eq!(
        proxy
            .metric_when(r#"pgtls_negotiations_total{path="early_data"}"#, 1.0)
            .await,
        1.0
    );
    assert_eq!(
        proxy.metric(r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#),
        0.0
    );
    let seen = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'victim'");
    assert_eq!(seen, "0");
    assert!(
        !pg.log().contains("user=victim"),
        "backend never saw the injected startup"
    );
}
