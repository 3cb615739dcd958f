//! Backend mTLS: the proxy presents its own client certificate; PostgreSQL
//! authenticates the role by it (pg_hba `cert`), so the client needs no
//! password.

mod common;

use common::client::{psql, verify_full};
use common::pg::{PgCluster, PgOptions, PgRole, PgSsl};
use common::pki::Pki;
use common::proxy::{backend_tls, config, TestProxy};
use pg_tls_proxy::config::SslMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_mtls_with_proxy_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let backend_cert = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    let pg = PgCluster::start(PgOptions {
        ssl: Some(PgSsl {
            cert: backend_cert.chain.clone(),
            key: backend_cert.key.clone(),
            ca: Some(pki.root_cert.clone()),
        }),
        hba: vec!["hostssl all all 127.0.0.1/32 cert".into()],
        roles: vec![PgRole {
            name: "svc".into(),
            password: None,
            superuser: false,
        }],
        ..Default::default()
    });
    let proxy_cert = pki.issue_client("svc");

    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    c.backend.sslcert = Some(proxy_cert.chain.clone());
    c.backend.sslkey = Some(proxy_cert.key.clone());
    let proxy = TestProxy::start(c).await;
    let conn = verify_full(proxy.port(), "svc", &pki.root_cert);
    let out = psql(
        &conn,
        None,
        "SELECT current_user || ' ' || client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await
    .expect("cert login through the proxy");
    assert_eq!(out, "svc /CN=svc");

    // Without the client certificate the backend refuses; the client sees why.
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    let proxy = TestProxy::start(c).await;
    let conn = verify_full(proxy.port(), "svc", &pki.root_cert);
    let err = psql(&conn, None, "SELECT 1")
        .await
        .expect_err("no proxy certificate");
    assert!(err.contains("certificate"), "{err}");
}
