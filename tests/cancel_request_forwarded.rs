//! CancelRequests reach the backend whether they arrive inside TLS (libpq
//! 17's PQcancelCreate, tokio-postgres) or in plaintext on a new connection
//! (libpq's legacy PQcancel, psql's Ctrl-C up to 16): a running pg_sleep is
//! cancelled with 57014, and the canceller gets no reply.

mod common;

use std::time::{Duration, Instant};

use common::client::{
    error_fields, read_until_ready, startup_message, tls_client, tls_upgrade, tokio_pg, SSL_REQUEST,
};
use common::pg::{PgCluster, PgOptions, PgRole};
use common::pki::Pki;
use common::proxy::{config, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_forwarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        roles: vec![PgRole {
            name: "bob".into(),
            password: None,
            superuser: false,
        }],
        ..Default::default()
    });
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    // Inside TLS.
    let conn = format!(
        "host=localhost port={} user=bob dbname=postgres sslmode=require",
        proxy.port()
    );
    let client = tokio_pg(&conn, &pki.root_cert).await.expect("connect");
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = client.simple_query("SELECT pg_sleep(30)");
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
            (*tls_client(&pki.root_cert, &[])).clone(),
        );
        token.cancel_query(tls).await
    };
    let (result, cancelled) = tokio::join!(sleeper, canceller);
    cancelled.expect("cancel sent");
    let err = result.expect_err("query was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // In plaintext, with the key from BackendKeyData.
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&SSL_REQUEST).await.expect("ssl");
    assert_eq!(tcp.read_u8().await.expect("S"), b'S');
    let mut tls = tls_upgrade(tcp, tls_client(&pki.root_cert, &[]))
        .await
        .expect("TLS");
    tls.write_all(&startup_message(&[
        ("user", "bob"),
        ("database", "postgres"),
    ]))
    .await
    .expect("startup");
    let msgs = read_until_ready(&mut tls).await.expect("ready");
    let key = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData")
        .1
        .clone();
    let query = b"SELECT pg_sleep(30)\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((query.len() + 4) as i32).to_be_bytes());
    q.extend_from_slice(query);
    tls.write_all(&q).await.expect("query");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    cancel.extend_from_slice(&key);
    let mut plain = TcpStream::connect(proxy.addr).await.expect("connect");
    plain.write_all(&cancel).await.expect("cancel");
    let mut nothing = Vec::new();
    plain.read_to_end(&mut nothing).await.expect("closed");
    assert!(nothing.is_empty(), "a CancelRequest never gets a reply");
    let answer = read_until_ready(&mut tls).await.expect("answer");
    let error = answer.iter().find(|(t, _)| *t == b'E').expect("an error");
    assert_eq!(error_fields(&error.1)[&'C'], "57014");

    assert_eq!(
        proxy.metric(r#"pgtls_negotiations_total{path="cancel"}"#),
        2.0
    );
}
