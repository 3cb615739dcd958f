//! The real binary: SIGTERM stops accepting, lets a running query finish,
//! and exits 0 once the session ends (within the grace period).

use crate::common;
use std::process::Command;
use std::time::Duration;

use crate::common::client::tokio_pg;
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::write_file;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_query_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let (mut child, mut rx, addr) = start(dir.path(), &pki, &pg).await;
    let port = addr.port();

    let conn = format!("host=localhost port={port} user=bob dbname=postgres sslmode=require");
    let client = tokio_pg(&conn, &pki.root_cert).await.expect("connect");
    let query = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(3)").await.map(|_| ());
        (r, client)
    });
    pg.wait_active("SELECT pg_sleep(3)").await;
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    wait_for(&mut rx, "draining: stopped accepting").await;

    // No new connections while draining.
    let refused = tokio_pg(&conn, &pki.root_cert).await;
    assert!(
        refused.is_err(),
        "new connections are refused while draining"
    );

    let (result, client) = query.await.expect("join");
    result.expect("the running query finishes");
    drop(client);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
}

type Log = tokio::sync::mpsc::UnboundedReceiver<String>;

/// The real binary (20 s grace period) in front of `pg`; its log lines and
/// its listening address.
async fn start(
    dir: &std::path::Path,
    pki: &Pki,
    pg: &PgCluster,
) -> (common::proxy::Spawned, Log, std::net::SocketAddr) {
    let toml = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend]\naddress = \"{}\"\n[shutdown]\ngrace_period = \"20s\"\n[admin]\naddress = \"127.0.0.1:0\"\n",
        pki.server_chain.display(),
        pki.server_key.display(),
        pg.address()
    );
    let file = write_file(&dir.join("proxy.toml"), &toml, 0o644, false);
    let (child, mut rx) = common::proxy::spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
            .arg("--config")
            .arg(&file)
            .env("RUST_LOG", "info"),
    );
    let addr = wait_for(&mut rx, "listening local_addr").await;
    (child, rx, addr)
}

/// Waits for a log line; returns the address in it, if any.
async fn wait_for(rx: &mut Log, needle: &str) -> std::net::SocketAddr {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            if line.contains(needle) {
                return if line.contains("127.0.0.1:") {
                    common::proxy::logged_addr(&line)
                } else {
                    ([0, 0, 0, 0], 0).into()
                };
            }
        }
        panic!("proxy exited before logging {needle:?}");
    })
    .await
    .expect("log line in time")
}
