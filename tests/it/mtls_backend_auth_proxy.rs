//! `backend_auth = "proxy"`: the certificate is the authentication and the
//! proxy logs into the backend as the role itself, either with its own
//! client certificate (pg_hba `cert` + a pg_ident map from the proxy's CN)
//! or with a per-role SCRAM secret, channel-bound to the backend's
//! certificate over TLS. The client is never asked for a password, and
//! libpq's channel_binding=require refuses such a login, as it must.

use crate::common::client::{psql, verify_full, with_cert};
use crate::common::pg::PgRole;
use crate::common::pki::Pki;
use crate::common::proxy::{backend_tls, config, mtls, TestProxy};
use crate::common::tls_cluster;
use crate::common::write_file;
use pg_tls_proxy::config::{CertKey, ClientAuthMode, SecretSource, SslMode};

const RULES: &str = r#"
[[rules]]
identity = "cn"
pattern = '(alice|svc)'
roles = ['\1']
backend_auth = "proxy"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_login_with_backend_mtls_and_pg_ident() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &["hostssl all all 127.0.0.1/32 cert map=proxymap"],
        vec![PgRole::new("alice", "never-used")],
        true,
    );
    write_file(
        &pg.data_dir().join("pg_ident.conf"),
        "proxymap pg-tls-proxy alice\n",
        0o644,
        false,
    );
    pg.psql("SELECT pg_reload_conf()");

    let proxy_cert = pki.issue_client("pg-tls-proxy");
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    c.backend.client_cert = Some(CertKey {
        cert: proxy_cert.chain.clone(),
        key: proxy_cert.key.clone(),
    });
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    let proxy = TestProxy::start(c).await;
    let conn = with_cert(
        &verify_full(proxy.port(), "alice", &pki.root_cert),
        &pki.issue_client("alice"),
    );
    let out = psql(
        &conn,
        None,
        "SELECT current_user || ' ' || client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .await
    .expect("no password needed");
    assert_eq!(out, "alice /CN=pg-tls-proxy");
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_logins_total{method="trust_or_cert",result="ok"}"#,
                1.0
            )
            .await,
        1.0
    );

    let err = psql(&format!("{conn} channel_binding=require"), None, "SELECT 1")
        .await
        .expect_err("libpq must refuse");
    assert!(err.contains("channel binding required"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_login_with_scram_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &["host all all 127.0.0.1/32 scram-sha-256"],
        vec![
            PgRole::new("svc", "svc-secret"),
            PgRole::new("alice", "alice-secret"),
        ],
        false,
    );
    let secret_file = write_file(
        &dir.path().join("svc.password"),
        "svc-secret\n",
        0o600,
        false,
    );
    // A proxy with a credential for svc only, over a TLS or plaintext link.
    let start = |tls: bool| {
        let mut c = config(&pki, &pg.address());
        if tls {
            backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
        }
        mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
        c.backend
            .credentials
            .insert("svc".into(), SecretSource::File(secret_file.clone()));
        TestProxy::start(c)
    };
    let as_role = |proxy: &TestProxy, role: &str| {
        with_cert(
            &verify_full(proxy.port(), role, &pki.root_cert),
            &pki.issue_client(role),
        )
    };
    let q =
        "SELECT current_user || ' ' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())";

    // TLS backend link: SCRAM-SHA-256-PLUS bound to the backend certificate.
    let proxy = start(true).await;
    assert_eq!(
        psql(&as_role(&proxy, "svc"), None, q)
            .await
            .expect("scram plus"),
        "svc true"
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_logins_total{method="scram-sha-256-plus",result="ok"}"#,
                1.0
            )
            .await,
        1.0
    );
    // No credential for alice: a clear refusal, the client is not prompted.
    let err = psql(&as_role(&proxy, "alice"), None, "SELECT 1")
        .await
        .expect_err("no credential");
    assert!(
        err.contains(r#"could not log in to the PostgreSQL server as role "alice""#),
        "{err}"
    );

    // Plaintext backend link: SCRAM without binding.
    let proxy = start(false).await;
    assert_eq!(
        psql(&as_role(&proxy, "svc"), None, q).await.expect("scram"),
        "svc false"
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_logins_total{method="scram-sha-256",result="ok"}"#,
                1.0
            )
            .await,
        1.0
    );
    // A wrong secret gets the backend's own error.
    write_file(&secret_file, "wrong\n", 0o600, false);
    let proxy = start(false).await;
    let err = psql(&as_role(&proxy, "svc"), None, "SELECT 1")
        .await
        .expect_err("wrong secret");
    assert!(
        err.contains(r#"password authentication failed for user "svc""#),
        "{err}"
    );
}
