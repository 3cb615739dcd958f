//! The real binary with `log.format = "json"`: every stderr line is a JSON
//! object; the connection span carries id, peer, SNI, TLS version, cipher,
//! identity, user and database; one audit event per connection carries the
//! whole story; nothing secret is logged. On SIGTERM /ready turns 503 while
//! sessions drain.

use std::process::Command;
use std::time::Duration;

use crate::common::client::{http, psql, verify_full, with_cert};
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::Pki;
use crate::common::proxy::logged_addr;
use crate::common::write_file;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_audit_and_ready_on_drain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        hba: vec!["host all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![PgRole::new("alice", "TopSecret-Password-42")],
        ..Default::default()
    });
    let toml = format!(
        r#"
[listen]
address = "127.0.0.1:0"
[tls]
cert = "{chain}"
key = "{key}"
[backend]
address = "{backend}"
[client_auth]
mode = "optional"
ca = "{root}"
[[rules]]
identity = "cn"
exact = "alice"
roles = ["alice"]
[admin]
address = "127.0.0.1:0"
[shutdown]
grace_period = "20s"
[log]
format = "json"
level = "debug"
"#,
        chain = pki.server_chain.display(),
        key = pki.server_key.display(),
        backend = pg.address(),
        root = pki.root_cert.display(),
    );
    let file = write_file(&dir.path().join("proxy.toml"), &toml, 0o644, false);
    let (mut child, mut rx) = crate::common::proxy::spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
            .arg("--config")
            .arg(&file)
            .env_remove("RUST_LOG"),
    );
    let mut lines = Vec::new();
    let admin = logged_addr(&wait_for(&mut rx, &mut lines, "admin listening").await);
    let port = logged_addr(&wait_for(&mut rx, &mut lines, "\"listening\"").await).port();
    let admin_url = format!("http://{admin}");
    assert_eq!(http("GET", &format!("{admin_url}/ready")).await.0, 200);

    let conn = with_cert(
        &verify_full(port, "alice", &pki.root_cert),
        &pki.issue_client("alice"),
    );
    let out = psql(&conn, Some("TopSecret-Password-42"), "SELECT 'hello'")
        .await
        .expect("session");
    assert_eq!(out, "hello");
    wait_for(&mut rx, &mut lines, "session_end").await;

    // A session that stays open while we SIGTERM.
    let held = tokio::spawn({
        let conn = conn.clone();
        async move { psql(&conn, Some("TopSecret-Password-42"), "SELECT pg_sleep(6)").await }
    });
    wait_for(&mut rx, &mut lines, "session established").await;
    // SIGTERM while the query runs (an idle session would be ended at once).
    pg.wait_active("SELECT pg_sleep(6)").await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    wait_for(&mut rx, &mut lines, "draining: stopped accepting").await;
    let (status, body) = http("GET", &format!("{admin_url}/ready")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(http("GET", &format!("{admin_url}/live")).await.0, 200);
    held.await
        .expect("join")
        .expect("the held session finishes");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success());
    while let Ok(line) = rx.try_recv() {
        lines.push(line);
    }

    // Every line is JSON; nothing secret anywhere.
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(!l.contains("TopSecret"), "a password reached the log: {l}");
        assert!(!l.contains("PRIVATE KEY"), "a key reached the log: {l}");
    }
    // The audit event of the first session.
    let audit = events
        .iter()
        .find(|e| {
            e["target"] == "pgtls::audit"
                && e["fields"]["bytes_backend_to_client"].as_u64() > Some(0)
        })
        .expect("an audit event");
    let f = &audit["fields"];
    assert_eq!(f["event"], "session_end");
    assert_eq!(f["user"], "alice");
    assert_eq!(f["database"], "postgres");
    assert_eq!(f["role"], "alice");
    assert_eq!(f["client_identity"], "alice");
    assert_eq!(f["sni"], "localhost");
    assert_eq!(f["tls_version"], "TLSv1.3");
    assert_eq!(f["path"], "sslrequest");
    assert_eq!(f["backend"], pg.address());
    assert_eq!(f["backend_sslmode"], "disable");
    assert_eq!(f["close_reason"], "client_eof");
    assert!(
        f["cipher"]
            .as_str()
            .is_some_and(|c| c.starts_with("TLS13_")),
        "{f}"
    );
    assert!(
        f["conn_id"].as_u64().is_some()
            && f["peer"].as_str().is_some()
            && f["duration_ms"].as_u64().is_some()
    );
    // The connection span carries the same context on other events.
    let established = events
        .iter()
        .find(|e| e["fields"]["message"] == "session established")
        .expect("session established");
    let span = &established["span"];
    for key in [
        "id",
        "peer",
        "sni",
        "tls_version",
        "cipher",
        "client_identity",
        "user",
        "database",
    ] {
        assert!(!span[key].is_null(), "span lacks {key}: {established}");
    }
}

async fn wait_for(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
) -> String {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            let hit = line.contains(needle);
            seen.push(line.clone());
            if hit {
                return line;
            }
        }
        panic!(
            "proxy exited before logging {needle:?}; saw:\n{}",
            seen.join("\n")
        );
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in time; saw:\n{}", seen.join("\n")))
}
