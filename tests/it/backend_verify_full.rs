//! Backend link with sslmode=verify-full: the right CA works (and the
//! backend sees TLS), a wrong CA or a wrong name gives the client 08006
//! naming the reason; verify-ca ignores the name.

use crate::common::client::{psql, verify_full};
use crate::common::pg::{PgCluster, PgOptions, PgRole, PgSsl};
use crate::common::pki::Pki;
use crate::common::proxy::{backend_tls, config, TestProxy};
use pg_tls_proxy::config::SslMode;

/// SCRAM channel binding cannot cross a TLS backend link (see
/// scram_channel_binding_table.rs), so these clients turn it off.
fn no_binding(port: u16, pki: &Pki) -> String {
    format!(
        "{} channel_binding=disable",
        verify_full(port, "alice", &pki.root_cert)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_verify_full() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let backend_cert = pki.issue_server("db.internal", &["db.internal", "127.0.0.1"]);
    let pg = PgCluster::start(PgOptions {
        ssl: Some(PgSsl {
            cert: backend_cert.chain.clone(),
            key: backend_cert.key.clone(),
            ca: None,
        }),
        hba: vec!["hostssl all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![PgRole::new("alice", "secret")],
        ..Default::default()
    });
    let q = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // Right CA, the IP address as the name (IP SAN).
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    let proxy = TestProxy::start(c).await;
    let conn = no_binding(proxy.port(), &pki);
    assert_eq!(
        psql(&conn, Some("secret"), q).await.expect("verify-full"),
        "t"
    );

    // Right CA, a DNS name given by server_name (also sent as SNI).
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    c.backend.server_name = Some("db.internal".into());
    let proxy = TestProxy::start(c).await;
    let conn = no_binding(proxy.port(), &pki);
    assert_eq!(
        psql(&conn, Some("secret"), q).await.expect("server_name"),
        "t"
    );

    // Wrong CA.
    let other = Pki::generate_named(&dir.path().join("other"), "other");
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(other.root_cert.clone()));
    let proxy = TestProxy::start(c).await;
    let conn = no_binding(proxy.port(), &pki);
    let err = psql(&conn, Some("secret"), q).await.expect_err("wrong CA");
    assert!(
        err.contains("certificate was rejected: it is not signed by a CA in backend.sslrootcert"),
        "{err}"
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_connects_total{result="tls",sslmode="verify-full"}"#,
                1.0
            )
            .await,
        1.0
    );

    // Wrong name under verify-full; the same name passes verify-ca.
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    c.backend.server_name = Some("other.internal".into());
    let proxy = TestProxy::start(c).await;
    let conn = no_binding(proxy.port(), &pki);
    let err = psql(&conn, Some("secret"), q)
        .await
        .expect_err("wrong name");
    assert!(
        err.contains("does not match the backend server name"),
        "{err}"
    );

    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyCa, Some(pki.root_cert.clone()));
    c.backend.server_name = Some("other.internal".into());
    let proxy = TestProxy::start(c).await;
    let conn = no_binding(proxy.port(), &pki);
    assert_eq!(
        psql(&conn, Some("secret"), q).await.expect("verify-ca"),
        "t"
    );

    // require without a root: encrypted, unauthenticated server.
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::Require, None);
    let proxy = TestProxy::start(c).await;
    let conn = no_binding(proxy.port(), &pki);
    assert_eq!(psql(&conn, Some("secret"), q).await.expect("require"), "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_without_tls_refuses_require() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions::default());
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::Require, None);
    let proxy = TestProxy::start(c).await;
    let conn = verify_full(proxy.port(), "bob", &pki.root_cert);
    let err = psql(&conn, None, "SELECT 1")
        .await
        .expect_err("no TLS at the backend");
    assert!(err.contains("does not accept TLS"), "{err}");
}
