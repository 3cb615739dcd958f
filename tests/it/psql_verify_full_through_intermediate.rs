//! psql with sslmode=verify-full reaches PostgreSQL through the proxy; the
//! server certificate chains to the root through an intermediate CA that
//! the proxy serves in its chain.

use crate::common::client::{psql, verify_full};
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_verify_full_through_intermediate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        hba: vec!["host all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![PgRole::new("alice", "secret")],
        ..Default::default()
    });
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    let out = psql(
        &verify_full(proxy.port(), "alice", &pki.root_cert),
        Some("secret"),
        "SELECT current_user || ' ' || (SELECT count(*) FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl)",
    )
    .await
    .expect("psql through the proxy");
    // alice is logged in, and the backend link itself is plaintext here.
    assert_eq!(out, "alice 0");
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_negotiations_total{path="sslrequest"}"#, 1.0)
            .await,
        1.0
    );

    // A client trusting another CA refuses the proxy's certificate.
    let other = Pki::generate_named(&dir.path().join("other"), "other");
    let err = psql(
        &verify_full(proxy.port(), "alice", &other.root_cert),
        Some("secret"),
        "SELECT 1",
    )
    .await
    .expect_err("wrong CA must fail");
    assert!(err.contains("certificate verify failed"), "{err}");
}
