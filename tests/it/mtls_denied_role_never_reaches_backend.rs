//! A startup for a role (or database) the certificate may not use gets
//! FATAL 28000 before any byte goes to the backend.

use crate::common;
use crate::common::client::{
    error_fields, psql, read_until_ready, startup_message, verify_full, with_cert, SSL_REQUEST,
};
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::Pki;
use crate::common::proxy::{config, mtls, TestProxy};
use pg_tls_proxy::config::ClientAuthMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULES: &str = r#"
[[rules]]
identity = "cn"
exact = "team"
roles = ["reader", "writer"]
databases = ["app"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_role_never_reaches_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        roles: ["reader", "writer", "admin"]
            .iter()
            .map(|r| PgRole {
                name: r.to_string(),
                password: None,
                superuser: false,
            })
            .collect(),
        ..Default::default()
    });
    pg.psql("CREATE DATABASE app");
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    let proxy = TestProxy::start(c).await;
    let team = pki.issue_client("team");
    let conn = |user: &str, db: &str| {
        with_cert(
            &verify_full(proxy.port(), user, &pki.root_cert)
                .replace("dbname=postgres", &format!("dbname={db}")),
            &team,
        )
    };

    // One team certificate, several roles, one database.
    assert_eq!(
        psql(&conn("reader", "app"), None, "SELECT current_user")
            .await
            .expect("reader"),
        "reader"
    );
    assert_eq!(
        psql(&conn("writer", "app"), None, "SELECT current_user")
            .await
            .expect("writer"),
        "writer"
    );
    let err = psql(&conn("writer", "postgres"), None, "SELECT 1")
        .await
        .expect_err("database");
    assert!(
        err.contains(r#"certificate "team" is not allowed to connect to database "postgres" as role "writer""#),
        "{err}"
    );

    // Denied role, with exact bytes: FATAL 28000, and no backend connection.
    let connects_before =
        proxy.metric(r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#);
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&SSL_REQUEST).await.expect("ssl");
    assert_eq!(tcp.read_u8().await.expect("S"), b'S');
    let config = common::client::mtls_client(&pki.root_cert, &team);
    let mut tls = common::client::tls_upgrade(tcp, config).await.expect("TLS");
    tls.write_all(&startup_message(&[("user", "admin"), ("database", "app")]))
        .await
        .expect("startup");
    let msgs = read_until_ready(&mut tls).await.expect("answer");
    assert_eq!(msgs.len(), 1, "only the error");
    let fields = error_fields(&msgs[0].1);
    assert_eq!(fields[&'S'], "FATAL");
    assert_eq!(fields[&'C'], "28000");
    assert_eq!(
        fields[&'M'],
        r#"certificate "team" is not allowed to connect as role "admin""#
    );
    assert_eq!(
        proxy.metric(r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#),
        connects_before
    );
    assert!(
        !pg.log().contains("user=admin"),
        "the backend never saw admin"
    );
}
