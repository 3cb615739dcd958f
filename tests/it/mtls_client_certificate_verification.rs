//! Client certificate verification in `required` and `optional` modes, with
//! real psql (sslcert/sslkey): missing, wrong CA, expired, not yet valid,
//! revoked by CRL, chain through an intermediate; optional mode without a
//! certificate falls back to the backend's password authentication.

use std::time::{Duration, SystemTime};

use crate::common::client::{psql, verify_full, with_cert};
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::{ClientCertOpts, Pki};
use crate::common::proxy::{config, mtls, TestProxy};
use pg_tls_proxy::config::ClientAuthMode;

const RULES: &str = r#"
[[rules]]
identity = "cn"
pattern = '([a-z]+)'
roles = ['\1']
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["alice"]);
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    let crl_path = dir.path().join("crls.pem");
    let revoked = pki.issue_client("alice");
    let crl = std::fs::read_to_string(pki.crl(&[revoked.serial], 30)).expect("crl");
    let root_crl = std::fs::read_to_string(pki.root_crl(&[], 30)).expect("root crl");
    std::fs::write(&crl_path, format!("{crl}{root_crl}")).expect("write crls");
    c.client_auth.crl = vec![crl_path];
    let proxy = TestProxy::start(c).await;
    let base = verify_full(proxy.port(), "alice", &pki.root_cert);
    let q = "SELECT current_user";

    // A good certificate, chained through the intermediate.
    let good = pki.issue_client("alice");
    assert_eq!(
        psql(&with_cert(&base, &good), None, q)
            .await
            .expect("good cert"),
        "alice"
    );

    // No certificate: the handshake fails with certificate_required.
    let err = psql(&base, None, q).await.expect_err("no certificate");
    assert!(err.contains("certificate required"), "{err}");

    // A certificate from another CA.
    let other = Pki::generate_named(&dir.path().join("other"), "other");
    let err = psql(&with_cert(&base, &other.issue_client("alice")), None, q)
        .await
        .expect_err("wrong CA");
    assert!(err.contains("unknown ca"), "{err}");

    // Expired, and not yet valid.
    let now = SystemTime::now();
    let expired = pki.issue_client_with(ClientCertOpts {
        cn: "alice".into(),
        not_before: Some(now - Duration::from_secs(10 * 86_400)),
        not_after: Some(now - Duration::from_secs(86_400)),
        ..Default::default()
    });
    let err = psql(&with_cert(&base, &expired), None, q)
        .await
        .expect_err("expired");
    assert!(err.contains("certificate expired"), "{err}");
    let future = pki.issue_client_with(ClientCertOpts {
        cn: "alice".into(),
        not_before: Some(now + Duration::from_secs(86_400)),
        not_after: Some(now + Duration::from_secs(10 * 86_400)),
        ..Default::default()
    });
    let err = psql(&with_cert(&base, &future), None, q)
        .await
        .expect_err("not yet valid");
    assert!(err.contains("alert"), "{err}");

    // Revoked by the intermediate's CRL.
    let err = psql(&with_cert(&base, &revoked), None, q)
        .await
        .expect_err("revoked");
    assert!(err.contains("certificate revoked"), "{err}");
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#,
                1.0
            )
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_in_the_ca_bundle_verifies_a_bare_leaf() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["alice"]);
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    c.client_auth.ca = vec![pki.root_cert.clone(), pki.intermediate_cert.clone()];
    let proxy = TestProxy::start(c).await;
    let good = pki.issue_client("alice");
    // sslcert = the leaf alone: the proxy supplies the intermediate.
    let conn = format!(
        "{} sslcert={} sslkey={}",
        verify_full(proxy.port(), "alice", &pki.root_cert),
        good.cert.display(),
        good.key.display()
    );
    assert_eq!(
        psql(&conn, None, "SELECT current_user")
            .await
            .expect("leaf only"),
        "alice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        hba: vec!["host all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![PgRole::new("alice", "secret"), PgRole::new("bob", "bobpw")],
        ..Default::default()
    });
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Optional, RULES);
    let proxy = TestProxy::start(c).await;
    let q = "SELECT current_user";

    // No certificate: a password user, the backend decides.
    let bob = verify_full(proxy.port(), "bob", &pki.root_cert);
    assert_eq!(
        psql(&bob, Some("bobpw"), q).await.expect("password login"),
        "bob"
    );
    let err = psql(&bob, Some("wrong"), q)
        .await
        .expect_err("wrong password");
    assert!(err.contains("password authentication failed"), "{err}");

    // With a certificate, the rules apply (and then the backend's auth).
    let alice = with_cert(
        &verify_full(proxy.port(), "alice", &pki.root_cert),
        &pki.issue_client("alice"),
    );
    assert_eq!(
        psql(&alice, Some("secret"), q)
            .await
            .expect("cert + password"),
        "alice"
    );
    let as_bob = with_cert(
        &verify_full(proxy.port(), "bob", &pki.root_cert),
        &pki.issue_client("alice"),
    );
    let err = psql(&as_bob, Some("bobpw"), q)
        .await
        .expect_err("rules deny");
    assert!(
        err.contains(r#"certificate "alice" is not allowed to connect as role "bob""#),
        "{err}"
    );
}
