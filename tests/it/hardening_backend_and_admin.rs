//! Hostile or broken peers on the other side of the proxy, and on its
//! admin port: each is bounded, named for what it is, and counted.
//! - a backend that accepts TCP and never answers: 08006 "did not answer"
//!   within backend.connect_timeout, a backend failure for /ready;
//! - a backend that closes during authentication: 08006, not a bare close;
//! - a backend asking for 2,000,000 SCRAM iterations: refused before any
//!   hashing;
//! - unfinished HTTP requests on the admin port: closed after the header
//!   read timeout, capped in number, and /metrics answers again;
//! - relayed bytes published while a session runs.

use crate::common;
use std::time::Duration;

use crate::common::client::{
    error_fields, http, logged_in, query_message, read_message, read_until_ready, startup_message,
    tls_session, verify_full, with_cert,
};
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::Pki;
use crate::common::proxy::{config, mtls, TestProxy};
use pg_tls_proxy::config::{ClientAuthMode, SecretSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn fatal(msgs: &[(u8, Vec<u8>)]) -> (String, String) {
    let (tag, body) = msgs.last().expect("a message");
    assert_eq!(*tag, b'E', "{msgs:?}");
    let f = error_fields(body);
    assert_eq!(f[&'S'], "FATAL");
    (f[&'C'].clone(), f[&'M'].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_backend_is_unreachable_and_unready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    // Accepts, reads, never answers; keeps every socket open.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut c = config(&pki, &silent_addr.to_string());
    c.backend.connect_timeout = Duration::from_millis(500);
    c.admin.unready_after_backend_failures = 2;
    let proxy = TestProxy::start(c).await;
    for _ in 0..2 {
        let mut tls = tls_session(proxy.addr, &pki.root_cert).await;
        tls.write_all(&startup_message(&[("user", "u"), ("database", "d")]))
            .await
            .expect("startup");
        let msgs = read_until_ready(&mut tls).await.expect("answer");
        assert_eq!(
            fatal(&msgs),
            (
                "08006".to_string(),
                "pg-tls-proxy could not reach the PostgreSQL server: the PostgreSQL server did not answer"
                    .to_string()
            )
        );
    }
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_connects_total{result="no_answer",sslmode="disable"}"#,
                2.0
            )
            .await,
        2.0
    );
    let (status, body) = http("GET", &format!("{}/ready", proxy.admin_url())).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("backend unreachable"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_during_authentication_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    // Asks for a cleartext password, then hangs up.
    let rude = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let rude_addr = rude.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = rude.accept().await {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).await.is_err() {
                continue;
            }
            let mut rest = vec![0u8; i32::from_be_bytes(len) as usize - 4];
            let _ = s.read_exact(&mut rest).await;
            let _ = s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await;
            let mut answer = [0u8; 64];
            let _ = s.read(&mut answer).await;
            drop(s);
        }
    });
    let proxy = TestProxy::start(config(&pki, &rude_addr.to_string())).await;
    let mut tls = tls_session(proxy.addr, &pki.root_cert).await;
    tls.write_all(&startup_message(&[("user", "u"), ("database", "d")]))
        .await
        .expect("startup");
    let (tag, _) = read_message(&mut tls).await.expect("password request");
    assert_eq!(tag, b'R');
    let mut password = vec![b'p', 0, 0, 0, 7];
    password.extend_from_slice(b"pw\0");
    tls.write_all(&password).await.expect("password");
    let msgs = read_until_ready(&mut tls).await.expect("answer");
    assert_eq!(
        fatal(&msgs),
        (
            "08006".to_string(),
            "pg-tls-proxy could not reach the PostgreSQL server: the server closed the connection unexpectedly"
                .to_string()
        )
    );
}

/// PostgreSQL stores whatever verifier it is given; one with 2,000,000
/// iterations makes the proxy's own SCRAM login refuse before hashing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_login_refuses_huge_scram_iteration_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        hba: vec!["host all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![PgRole::new("svc", "ignored")],
        ..Default::default()
    });
    let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    pg.psql(&format!(
        "ALTER ROLE svc PASSWORD 'SCRAM-SHA-256$2000000:c2FsdHNhbHRzYWx0${key}:{key}'"
    ));
    let secret = common::write_file(&dir.path().join("pw"), "secret\n", 0o600, false);
    let mut c = config(&pki, &pg.address());
    mtls(
        &mut c,
        &pki,
        ClientAuthMode::Required,
        "[[rules]]\nidentity = \"cn\"\nexact = \"svc\"\nroles = [\"svc\"]\nbackend_auth = \"proxy\"\n",
    );
    c.backend
        .credentials
        .insert("svc".into(), SecretSource::File(secret));
    let proxy = TestProxy::start(c).await;
    let conn = with_cert(
        &verify_full(proxy.port(), "svc", &pki.root_cert),
        &pki.issue_client("svc"),
    );
    let err = common::client::psql(&conn, None, "SELECT 1")
        .await
        .expect_err("refused");
    assert!(
        err.contains(r#"could not log in to the PostgreSQL server as role "svc""#),
        "{err}"
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_logins_total{method="unknown",result="failed"}"#,
                1.0
            )
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_sheds_unfinished_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let proxy = TestProxy::start(config(&pki, "127.0.0.1:1")).await;
    let admin = proxy.handle().admin_addr().expect("admin");
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(admin).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("partial request");
        slow.push(s);
    }
    // Past the cap, connections are closed at once.
    assert!(
        proxy
            .metric_at_least("pgtls_admin_connections_refused_total", 36.0)
            .await
            >= 36.0
    );
    // Within the header timeout (5 s) every unfinished request is closed.
    for mut s in slow {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
            .await
            .expect("closed by the server in time")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let (status, body) = http("GET", &format!("{}/metrics", proxy.admin_url())).await;
    assert_eq!(status, 200);
    assert!(body.contains("pgtls_admin_connections_refused_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_bytes_are_published_while_the_session_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;
    let (mut tls, _) = logged_in(proxy.addr, &pki.root_cert, "bob").await;
    tls.write_all(&query_message("SELECT repeat('x', 100000)"))
        .await
        .expect("query");
    read_until_ready(&mut tls).await.expect("result");
    let series = r#"pgtls_relayed_bytes_total{direction="backend_to_client"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while proxy.metric(series) < 100_000.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bytes of a running session never showed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The session is still open and usable.
    tls.write_all(&query_message("SELECT 1"))
        .await
        .expect("query");
    read_until_ready(&mut tls).await.expect("still running");
}
