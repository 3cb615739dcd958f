//! systemd `Type=notify`, with the real binary and a NOTIFY_SOCKET of our
//! own: READY=1 once it listens, RELOADING=1 (with MONOTONIC_USEC) then
//! READY=1 around a SIGHUP reload, STOPPING=1 when SIGTERM starts the
//! drain.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config_file, spawn_logged};

fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_ready_reloading_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let file = config_file(
        dir.path(),
        &pki.server_chain,
        &pki.server_key,
        &pg.address(),
        "",
    );
    let socket_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let (mut child, _rx) = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
            .arg("--config")
            .arg(&file)
            .env("NOTIFY_SOCKET", &socket_path),
    );
    let sock = std::sync::Arc::new(sock);
    let recv = |s: std::sync::Arc<UnixDatagram>| tokio::task::spawn_blocking(move || next(&s));

    let ready = recv(sock.clone()).await.expect("join");
    assert!(ready.contains("READY=1"), "{ready}");
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    let reloading = recv(sock.clone()).await.expect("join");
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let ready = recv(sock.clone()).await.expect("join");
    assert!(
        ready.contains("READY=1") && ready.contains("reloaded"),
        "{ready}"
    );
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let stopping = recv(sock.clone()).await.expect("join");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success());
}
