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

    // Protocol 3.2 with a _pq_ option: NegotiateProtocolVersion naming 3.2
    // (what PostgreSQL 18 sends; the backend behind speaks 3.0), then on,
    // with a 3.2 cancel key.
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
    assert_eq!(&body[..4], &196610i32.to_be_bytes(), "newest version 3.2");
    assert_eq!(&body[4..8], &1i32.to_be_bytes(), "one unsupported option");
    assert_eq!(&body[8..], b"_pq_.test\0");
    let key = &msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData")
        .1;
    assert_eq!(key.len(), 4 + 32, "a 32-byte secret, as PostgreSQL 18's");
    assert_eq!(msgs.last().expect("msg").0, b'Z');

    // Each minor version as PostgreSQL 18 answers it: 3.0, 3.1 and 3.2 go
    // on without NegotiateProtocolVersion (libpq 18 refuses one that
    // changes nothing), 3.3 gets one naming 3.2; 3.2 and later get a long key.
    for (minor, negotiated, key_len) in [
        (0, None, 8),
        (1, None, 8),
        (2, None, 36),
        (3, Some(196610), 36),
    ] {
        let mut tls = tls_session(&proxy, &pki).await;
        tls.write_all(&startup_message_version(
            196608 + minor,
            &[("user", "bob"), ("database", "postgres")],
        ))
        .await
        .expect("send");
        let msgs = read_until_ready(&mut tls).await.expect("answer");
        let v = msgs.iter().find(|(t, _)| *t == b'v').map(|(_, b)| {
            assert_eq!(&b[4..], &[0, 0, 0, 0], "no options");
            i32::from_be_bytes([b[0], b[1], b[2], b[3]])
        });
        assert_eq!(v, negotiated, "3.{minor}");
        let key = &msgs
            .iter()
            .find(|(t, _)| *t == b'K')
            .expect("BackendKeyData")
            .1;
        assert_eq!(key.len(), key_len, "3.{minor}");
        assert_eq!(msgs.last().expect("msg").0, b'Z', "3.{minor}");
    }
}
