//! A plaintext startup is refused with FATAL 28000 telling the user to use
//! sslmode=require, unless tls.allow_plaintext = true.

use crate::common::client::{error_fields, psql, read_message, startup_message};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_refused_with_28000() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    let conn = format!(
        "host=127.0.0.1 port={} user=bob dbname=postgres sslmode=disable",
        proxy.port()
    );
    let err = psql(&conn, None, "SELECT 1")
        .await
        .expect_err("plaintext refused");
    assert!(err.contains("sslmode=require"), "{err}");

    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&startup_message(&[("user", "bob")]))
        .await
        .expect("send");
    let (tag, body) = read_message(&mut tcp).await.expect("answer");
    assert_eq!(tag, b'E');
    let fields = error_fields(&body);
    assert_eq!(fields[&'S'], "FATAL");
    assert_eq!(fields[&'C'], "28000");
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_negotiations_total{path="plaintext_rejected"}"#,
                2.0
            )
            .await,
        2.0
    );
    assert_eq!(
        proxy.metric(r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#),
        0.0
    );

    // Opt-in plaintext works.
    let mut c = config(&pki, &pg.address());
    c.tls.allow_plaintext = true;
    let open = TestProxy::start(c).await;
    let conn = format!(
        "host=127.0.0.1 port={} user=bob dbname=postgres sslmode=disable",
        open.port()
    );
    assert_eq!(
        psql(&conn, None, "SELECT 'plain'").await.expect("allowed"),
        "plain"
    );
}
