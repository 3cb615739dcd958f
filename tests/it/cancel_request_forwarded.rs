//! A CancelRequest inside TLS (libpq 17's PQcancelCreate, tokio-postgres's
//! cancel_token) reaches the backend: a running pg_sleep is cancelled with
//! 57014. The plaintext path (psql's Ctrl-C) is in cancel_with_proxy_keys.rs.

use std::time::{Duration, Instant};

use crate::common::client::{tls_client, tokio_pg};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_forwarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    // Inside TLS.
    let conn = format!(
        "host=localhost port={} user=bob dbname=postgres sslmode=require",
        proxy.port()
    );
    let client = tokio_pg(&conn, &pki.root_cert).await.expect("connect");
    let token = client.cancel_token();
    let sleeper = client.simple_query("SELECT pg_sleep(30)");
    let canceller = async {
        pg.wait_active("SELECT pg_sleep(30)").await;
        let sent = Instant::now();
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
            (*tls_client(&pki.root_cert, &[])).clone(),
        );
        token.cancel_query(tls).await.map(|()| sent)
    };
    let (result, cancelled) = tokio::join!(sleeper, canceller);
    let sent = cancelled.expect("cancel sent");
    let err = result.expect_err("query was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(sent.elapsed() < Duration::from_secs(10));

    assert_eq!(
        proxy
            .metric_when(r#"pgtls_negotiations_total{path="cancel"}"#, 1.0)
            .await,
        1.0
    );
}
