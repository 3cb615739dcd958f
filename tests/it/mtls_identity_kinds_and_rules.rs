//! Each identity kind a certificate carries can be mapped to roles: CN, DN
//! (RFC 4514), SAN DNS, email, URI (SPIFFE, with captures) and IP.
//! Comparison is exact: a case mismatch is denied, a wildcard-looking CN is
//! literal, and a later SAN can match.

use crate::common::client::{psql, verify_full, with_cert};
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::{ClientCertOpts, Pki};
use crate::common::proxy::{config, mtls, TestProxy};
use pg_tls_proxy::config::ClientAuthMode;

const RULES: &str = r#"
[[rules]]
identity = "cn"
exact = "alice"
roles = ["alice"]

[[rules]]
identity = "dn"
exact = "CN=dn-user,OU=DBA,O=Acme"
roles = ["dba"]

[[rules]]
identity = "dns"
exact = "reporting.internal"
roles = ["reporting"]

[[rules]]
identity = "email"
pattern = '([a-z]+)@example\.com'
roles = ['\1']

[[rules]]
identity = "uri"
pattern = 'spiffe://prod\.example\.org/ns/([a-z0-9-]+)/sa/([a-z0-9-]+)'
roles = ['\2', "readonly"]

[[rules]]
identity = "ip"
exact = "10.9.8.7"
roles = ["batch"]

[[rules]]
identity = "cn"
exact = "*.example.com"
roles = ["wildcard"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_kinds_and_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let roles = [
        "alice",
        "Alice",
        "dba",
        "reporting",
        "carol",
        "web",
        "readonly",
        "batch",
        "wildcard",
        "db",
    ];
    let pg = PgCluster::start(PgOptions {
        roles: roles
            .iter()
            .map(|r| PgRole {
                name: r.to_string(),
                password: None,
                superuser: false,
            })
            .collect(),
        ..Default::default()
    });
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    let proxy = TestProxy::start(c).await;
    let connect = |user: &'static str, opts: ClientCertOpts| {
        let cert = pki.issue_client_with(opts);
        let conn = with_cert(&verify_full(proxy.port(), user, &pki.root_cert), &cert);
        async move { psql(&conn, None, "SELECT current_user").await }
    };
    let cn = |cn: &str| ClientCertOpts {
        cn: cn.into(),
        ..Default::default()
    };

    assert_eq!(connect("alice", cn("alice")).await.expect("cn"), "alice");
    let err = connect("alice", cn("Alice"))
        .await
        .expect_err("case mismatch");
    assert!(
        err.contains(r#"certificate "Alice" is not allowed to connect as role "alice""#),
        "{err}"
    );

    let dn = ClientCertOpts {
        cn: "dn-user".into(),
        org: Some("Acme".into()),
        ou: Some("DBA".into()),
        ..Default::default()
    };
    assert_eq!(connect("dba", dn).await.expect("dn"), "dba");

    let two_sans = ClientCertOpts {
        cn: "svc".into(),
        dns: vec!["other.internal".into(), "reporting.internal".into()],
        ..Default::default()
    };
    assert_eq!(
        connect("reporting", two_sans).await.expect("second SAN"),
        "reporting"
    );

    let email = ClientCertOpts {
        cn: "x".into(),
        emails: vec!["carol@example.com".into()],
        ..Default::default()
    };
    assert_eq!(connect("carol", email).await.expect("email"), "carol");

    let spiffe = || ClientCertOpts {
        cn: "workload".into(),
        uris: vec!["spiffe://prod.example.org/ns/shop/sa/web".into()],
        ..Default::default()
    };
    assert_eq!(
        connect("web", spiffe()).await.expect("spiffe capture"),
        "web"
    );
    assert_eq!(
        connect("readonly", spiffe())
            .await
            .expect("spiffe literal role"),
        "readonly"
    );
    let err = connect("alice", spiffe())
        .await
        .expect_err("not a role of this rule");
    assert!(
        err.contains("spiffe://prod.example.org/ns/shop/sa/web"),
        "{err}"
    );

    let ip = ClientCertOpts {
        cn: "batch-host".into(),
        ips: vec!["10.9.8.7".parse().expect("ip")],
        ..Default::default()
    };
    assert_eq!(connect("batch", ip).await.expect("ip"), "batch");

    // A wildcard-looking CN is a literal string.
    assert_eq!(
        connect("wildcard", cn("*.example.com"))
            .await
            .expect("literal"),
        "wildcard"
    );
    let err = connect("wildcard", cn("db.example.com"))
        .await
        .expect_err("no wildcard matching");
    assert!(
        err.contains("28000") || err.contains("is not allowed"),
        "{err}"
    );

    // A verified certificate matching no rule gets nothing.
    let err = connect("db", cn("nobody"))
        .await
        .expect_err("deny by default");
    assert!(
        err.contains(r#"certificate "nobody" is not allowed to connect as role "db""#),
        "{err}"
    );
    assert_eq!(
        proxy.metric_when(r#"pgtls_role_decisions_total{decision="denied",identity_kind="none",reason="no_rule_matched"}"#, 3.0).await,
        3.0
    );
    assert_eq!(
        proxy.metric(
            r#"pgtls_role_decisions_total{decision="allowed",identity_kind="uri",reason="allowed"}"#
        ),
        2.0
    );
}
