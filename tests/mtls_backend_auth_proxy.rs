//! `backend_auth = "proxy"`: the certificate is the authentication and the
//! proxy logs into the backend as the role itself, either with its own
//! client certificate (pg_hba `cert` + a pg_ident map from the proxy's CN)
//! or with a per-role SCRAM secret, channel-bound to the backend's
//! certificate over TLS. The client is never asked for a password, and
//! libpq's channel_binding=require refuses such a login, as it must.

mod common;

use common::client::{psql, verify_full, with_cert};
use common::pg::{PgCluster, PgOptions, PgRole, PgSsl};
use common::pki::Pki;
use common::proxy::{backend_tls, config, mtls, TestProxy};
use common::write_file;
use pg_tls_proxy::config::{ClientAuthMode, Credential, SslMode};

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
    let backend_cert = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    let pg = PgCluster::start(PgOptions {
        ssl: Some(PgSsl {
            cert: backend_cert.chain.clone(),
            key: backend_cert.key.clone(),
            ca: Some(pki.root_cert.clone()),
        }),
        hba: vec!["hostssl all all 127.0.0.1/32 cert map=proxymap".into()],
        roles: vec![PgRole::new("alice", "never-used")],
        ..Default::default()
    });
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
    c.backend.sslcert = Some(proxy_cert.chain.clone());
    c.backend.sslkey = Some(proxy_cert.key.clone());
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
        proxy.metric(r#"pgtls_backend_logins_total{method="trust_or_cert",result="ok"}"#),
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
    let backend_cert = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    let pg = PgCluster::start(PgOptions {
        ssl: Some(PgSsl {
            cert: backend_cert.chain.clone(),
            key: backend_cert.key.clone(),
            ca: None,
        }),
        hba: vec!["host all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![
            PgRole::new("svc", "svc-secret"),
            PgRole::new("alice", "alice-secret"),
        ],
        ..Default::default()
    });
    let secret_file = write_file(
        &dir.path().join("svc.password"),
        "svc-secret\n",
        0o600,
        false,
    );
    let with_credentials = |c: &mut pg_tls_proxy::config::Config| {
        c.backend.credentials.insert(
            "svc".into(),
            Credential {
                password_file: Some(secret_file.clone()),
                password_env: None,
            },
        );
        c.backend.credentials.insert(
            "alice".into(),
            Credential {
                password_file: None,
                password_env: Some("PGTLS_TEST_NO_SUCH_VAR_IS_SET_HERE".into()),
            },
        );
    };

    // TLS backend link: SCRAM-SHA-256-PLUS bound to the backend certificate.
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    with_credentials(&mut c);
    c.backend.credentials.remove("alice");
    let proxy = TestProxy::start(c).await;
    let svc = with_cert(
        &verify_full(proxy.port(), "svc", &pki.root_cert),
        &pki.issue_client("svc"),
    );
    let q =
        "SELECT current_user || ' ' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())";
    assert_eq!(psql(&svc, None, q).await.expect("scram plus"), "svc true");
    assert_eq!(
        proxy.metric(r#"pgtls_backend_logins_total{method="scram-sha-256-plus",result="ok"}"#),
        1.0
    );

    // No credential for alice: a clear refusal, the client is not prompted.
    let alice = with_cert(
        &verify_full(proxy.port(), "alice", &pki.root_cert),
        &pki.issue_client("alice"),
    );
    let err = psql(&alice, None, "SELECT 1")
        .await
        .expect_err("no credential");
    assert!(
        err.contains(r#"could not log in to the PostgreSQL server as role "alice""#),
        "{err}"
    );

    // Plaintext backend link: SCRAM without binding; a wrong secret gets the
    // backend's own error.
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    with_credentials(&mut c);
    c.backend.credentials.remove("alice");
    let proxy = TestProxy::start(c).await;
    let svc = with_cert(
        &verify_full(proxy.port(), "svc", &pki.root_cert),
        &pki.issue_client("svc"),
    );
    assert_eq!(psql(&svc, None, q).await.expect("scram"), "svc false");
    assert_eq!(
        proxy.metric(r#"pgtls_backend_logins_total{method="scram-sha-256",result="ok"}"#),
        1.0
    );
    write_file(&secret_file, "wrong\n", 0o600, false);
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    with_credentials(&mut c);
    c.backend.credentials.remove("alice");
    let proxy = TestProxy::start(c).await;
    let svc = with_cert(
        &verify_full(proxy.port(), "svc", &pki.root_cert),
        &pki.issue_client("svc"),
    );
    let err = psql(&svc, None, "SELECT 1")
        .await
        .expect_err("wrong secret");
    assert!(
        err.contains(r#"password authentication failed for user "svc""#),
        "{err}"
    );
}
