//! The real binary under a small RLIMIT_NOFILE (200, hard): it admits only
//! the sessions the descriptors can hold, tells the others 53300 (never
//! 08006, never a backend failure), closes clients it cannot afford at
//! accept while counting them, and keeps a reserve so that /metrics and
//! /ready still answer. `check` says all of this before start, and the
//! listen backlog is the configured one (the kernel caps it at
//! net.core.somaxconn).

use crate::common;
use std::process::Command;
use std::time::Duration;

use crate::common::client::{http, tokio_pg};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{logged_addr, spawn_logged};
use crate::common::write_file;
use tokio::net::TcpStream;

const NOFILE: u32 = 200;

fn limited(bin_args: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        &format!(
            "ulimit -n {NOFILE} && exec {} {bin_args}",
            env!("CARGO_BIN_EXE_pg-tls-proxy")
        ),
    ]);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_budget_refuses_clearly_and_keeps_admin_alive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(common::pg::PgOptions {
        max_connections: 60,
        roles: vec![common::pg::PgRole::trust("bob")],
        ..Default::default()
    });
    let toml = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\nbacklog = 1000\nworkers = 1\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend]\naddress = \"{}\"\n[limits]\nhandshake_timeout = \"30s\"\n[admin]\naddress = \"127.0.0.1:0\"\n",
        pki.server_chain.display(),
        pki.server_key.display(),
        pg.address()
    );
    let file = write_file(&dir.path().join("proxy.toml"), &toml, 0o644, false);

    // `check` tells before start.
    let out = limited(&format!("--config {} check", file.display()))
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("RLIMIT_NOFILE {NOFILE} (hard {NOFILE})")),
        "{text}"
    );
    assert!(
        text.contains("limits.max_connections = 10000 needs 20130 file descriptors"),
        "{text}"
    );
    // The reserve, and one session thread's own two descriptors.
    let reserved = pg_tls_proxy::app::RESERVED_DESCRIPTORS + pg_tls_proxy::app::PER_SESSION_THREAD;
    let sessions = (NOFILE as usize - reserved as usize) * 9 / 20;
    assert!(
        text.contains(&format!("admitting at most {sessions} sessions")),
        "{text}"
    );
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1000);
    assert!(
        text.contains(&format!(
            "listen.backlog      1000 (effective {}:",
            somaxconn.min(1000)
        )),
        "{text}"
    );

    let (mut child, mut rx) =
        spawn_logged(limited(&format!("--config {}", file.display())).env("RUST_LOG", "info"));
    let mut log = Vec::new();
    let mut admin = None;
    let port = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            let addr = line.contains("127.0.0.1:").then(|| logged_addr(&line));
            let admin_line = line.contains("admin listening");
            log.push(line);
            match addr {
                Some(a) if admin_line => admin = Some(a),
                Some(a) => return a.port(),
                None => {}
            }
        }
        panic!("the proxy exited: {log:?}");
    })
    .await
    .expect("proxy listens");
    let admin = admin.expect("admin listening");

    // The listen backlog is the configured one (ss shows it as Send-Q).
    let ss = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout);
    assert_eq!(
        ss.split_whitespace().nth(2),
        Some(somaxconn.min(1000).to_string().as_str()),
        "{ss}"
    );

    // Sessions up to the budget; the rest are told 53300.
    let conn = format!("host=localhost port={port} user=bob dbname=postgres sslmode=require");
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..sessions + 5 {
        match tokio_pg(&conn, &pki.root_cert).await {
            Ok(c) => held.push(c),
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(held.len(), sessions, "{refused:?}");
    assert_eq!(refused.len(), 5);
    for e in &refused {
        assert_eq!(
            e.as_db_error().map(|d| d.code().code()),
            Some("53300"),
            "{e}"
        );
    }

    // Idle raw clients beyond the descriptor budget are closed at accept.
    let mut raw = Vec::new();
    for _ in 0..80 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)).await {
            raw.push(s);
        }
    }
    let admin_url = format!("http://{admin}");
    let value_in = |metrics: &str, series: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Scraped until the refusals show (the accept loop meets them a moment
    // after the connects returned), for at most 10 s.
    let exhausted = r#"pgtls_fd_exhausted_total{stage="accept"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, metrics) = http("GET", &format!("{admin_url}/metrics")).await;
        assert_eq!(status, 200, "the reserve keeps /metrics answering");
        if value_in(&metrics, exhausted) >= 1.0 || tokio::time::Instant::now() >= deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let value = |series: &str| value_in(&metrics, series);
    assert!(
        value(r#"pgtls_fd_exhausted_total{stage="accept"}"#) >= 1.0,
        "{metrics}"
    );
    assert_eq!(value("pgtls_fd_limit"), f64::from(NOFILE));
    assert_eq!(
        value(r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#),
        sessions as f64
    );
    let (status, body) = http("GET", &format!("{admin_url}/ready")).await;
    assert_eq!(status, 200, "the backend is not blamed: {body}");
    // The warning is logged (its line may reach us a moment after the
    // counter moved), but not once per refused client.
    let warned = |log: &[String]| {
        log.iter()
            .filter(|l| l.contains("out of file descriptors"))
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while let Ok(line) = rx.try_recv() {
            log.push(line);
        }
        if warned(&log) >= 1 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warnings = warned(&log);
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains("admitting at most")),
        "start-up warning"
    );

    drop((held, raw));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}
