//! Startup packets over PostgreSQL's 10000-byte cap and unsupported protocol
//! versions get 08P01; protocol 3.2 is answered with NegotiateProtocolVersion
//! (3.0) and then works, as PostgreSQL 15 does.

use crate::common;
use crate::common::client::{
    error_fields, read_message, read_until_ready, startup_message_version,
};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn tls_session(proxy: &TestProxy, pki: &Pki) -> tokio_rustls::client::TlsStream<TcpStream> {
    common::client::tls_session(proxy.addr, &pki.root_cert).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_startup_and_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    // 10001-byte body claimed in plaintext and inside TLS.
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&10_005i32.to_be_bytes()).await.expect("send");
    let (tag, body) = read_message(&mut tcp).await.expect("answer");
    assert_eq!(tag, b'E');
    assert_eq!(error_fields(&body)[&'C'], "08P01");
    assert!(error_fields(&body)[&'M'].contains("invalid length of startup packet"));

    let mut tls = tls_session(&proxy, &pki).await;
    tls.write_all(&20_000i32.to_be_bytes()).await.expect("send");
    let (tag, body) = read_message(&mut tls).await.expect("answer");
    assert_eq!(tag, b'E');
    assert_eq!(error_fields(&body)[&'C'], "08P01");

    // Exactly at the cap is accepted (and reaches the backend).
    let base = [("user", "bob"), ("database", "postgres"), ("pgtls.pad", "")];
    let pad = "x".repeat(10_004 - startup_message_version(196608, &base).len());
    let mut tls = tls_session(&proxy, &pki).await;
    let startup = startup_message_version(
        196608,
        &[
            ("user", "bob"),
            ("database", "postgres"),
            ("pgtls.pad", &pad),
        ],
    );
    assert_eq!(startup.len(), 10_004);
    tls.write_all(&startup).await.expect("send");
    let msgs = read_until_ready(&mut tls).await.expect("answer");
    let last = msgs.last().expect("msg");
    assert_eq!(last.0, b'Z', "{:?}", error_fields(&last.1));

    // Protocol 2.0: unsupported.
    let mut tls = tls_session(&proxy, &pki).await;
    tls.write_all(&startup_message_version(2 << 16, &[("user", "bob")]))
        .await
        .expect("send");
    let (tag, body) = read_message(&mut tls).await.expect("answer");
    assert_eq!(tag, b'E');
    assert!(error_fields(&body)[&'M'].contains("unsupported frontend protocol"));

    // Protocol 3.2 with a _pq_ option: NegotiateProtocolVersion, then on.
    let mut tls = tls_session(&proxy, &pki).await;
    tls.write_all(&startup_message_version(
        196610,
        &[
            ("user", "bob"),
            ("database", "postgres"),
            ("_pq_.test", "1"),
        ],
    ))
    .await
    .expect("send");
    let msgs = read_until_ready(&mut tls).await.expect("answer");
    let (tag, body) = &msgs[0];
    assert_eq!(*tag, b'v');
    assert_eq!(
        &body[..4],
        &196608i32.to_be_bytes(),
        "newest version 3.0, as PostgreSQL 15 sends it"
    );
    assert_eq!(&body[4..8], &1i32.to_be_bytes(), "one unsupported option");
    assert_eq!(&body[8..], b"_pq_.test\0");
    assert_eq!(msgs.last().expect("msg").0, b'Z');
}
