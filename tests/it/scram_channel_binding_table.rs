//! SCRAM channel binding through the proxy, every combination of backend
//! link (disable / verify-full) and libpq channel_binding
//! (disable / prefer / require), with real psql. What can work, works;
//! what cannot fails with a message that says why and what to do.

use crate::common::client::{psql, verify_full};
use crate::common::pg::PgRole;
use crate::common::pki::Pki;
use crate::common::proxy::{backend_tls, config, TestProxy};
use crate::common::tls_cluster;
use pg_tls_proxy::config::SslMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &["host all all 127.0.0.1/32 scram-sha-256"],
        vec![PgRole::new("alice", "secret")],
        false,
    );
    let plain = TestProxy::start(config(&pki, &pg.address())).await;
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    let tls = TestProxy::start(c).await;

    let run = |port: u16, binding: &'static str| {
        let conn = format!(
            "{} channel_binding={binding}",
            verify_full(port, "alice", &pki.root_cert)
        );
        async move { psql(&conn, Some("secret"), "SELECT 'ok'").await }
    };

    // Plaintext backend link: the backend never offers SCRAM-SHA-256-PLUS.
    assert_eq!(
        run(plain.port(), "disable").await.expect("plain/disable"),
        "ok"
    );
    assert_eq!(
        run(plain.port(), "prefer").await.expect("plain/prefer"),
        "ok"
    );
    let err = run(plain.port(), "require")
        .await
        .expect_err("plain/require");
    assert!(
        err.contains("channel binding"),
        "libpq refuses itself: {err}"
    );

    // TLS backend link: only channel_binding=disable can work.
    assert_eq!(run(tls.port(), "disable").await.expect("tls/disable"), "ok");
    for binding in ["prefer", "require"] {
        let err = run(tls.port(), binding).await.expect_err("tls/binding");
        assert!(
            err.contains("SCRAM channel binding cannot pass through pg-tls-proxy"),
            "{err}"
        );
        assert!(
            err.contains("channel_binding=disable"),
            "the hint says what to do: {err}"
        );
    }
}
