//! Backend mTLS: the proxy presents its own client certificate to
//! PostgreSQL. By default only on links for proxy-authenticated logins
//! (and cancels): a passthrough client must never be logged in by the
//! proxy's certificate. With `backend.sslcert_scope = "all"` every link
//! presents it, for pg_hba `clientcert=verify-ca` transport checks, while
//! the client's own password still authenticates the role.

use crate::common::client::{psql, verify_full};
use crate::common::pg::{PgCluster, PgOptions, PgRole, PgSsl};
use crate::common::pki::Pki;
use crate::common::proxy::{backend_tls, config, TestProxy};
use pg_tls_proxy::config::{CertKey, SslCertScope, SslMode};

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
        hba: vec![
            // A `cert` line for the proxy's own logins as "svc"...
            "hostssl all svc 127.0.0.1/32 cert".into(),
            // ...and password logins that also require a client certificate.
            "hostssl all all 127.0.0.1/32 scram-sha-256 clientcert=verify-ca".into(),
        ],
        roles: vec![PgRole::trust("svc"), PgRole::new("alice", "secret")],
        ..Default::default()
    });
    let proxy_cert = pki.issue_client("svc");
    let q = "SELECT current_user || ' ' || client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // Default scope: a passthrough client is NOT logged in by the proxy's
    // certificate, and the backend's clientcert check refuses links without one.
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    c.backend.client_cert = Some(CertKey {
        cert: proxy_cert.chain.clone(),
        key: proxy_cert.key.clone(),
    });
    let proxy = TestProxy::start(c.clone()).await;
    let svc = format!(
        "{} channel_binding=disable",
        verify_full(proxy.port(), "svc", &pki.root_cert)
    );
    let err = psql(&svc, None, q)
        .await
        .expect_err("no certificate login for passthrough");
    assert!(err.contains("certificate"), "{err}");

    // Scope "all": the certificate goes on every link; alice still needs her password.
    c.backend.sslcert_scope = SslCertScope::All;
    let proxy = TestProxy::start(c).await;
    let alice = format!(
        "{} channel_binding=disable",
        verify_full(proxy.port(), "alice", &pki.root_cert)
    );
    assert_eq!(
        psql(&alice, Some("secret"), q)
            .await
            .expect("password + proxy cert"),
        "alice /CN=svc"
    );
    let err = psql(&alice, Some("wrong"), q)
        .await
        .expect_err("wrong password");
    assert!(err.contains("password authentication failed"), "{err}");
}
