//! pgbench over the proxy (TLS, a new connection per transaction) while the
//! real binary is sent SIGHUP every second for 30 s, the certificate being
//! renamed over in between: not one transaction may fail.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::Pki;
use crate::common::{clear_pg_env, free_port, pg_bin, write_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_survives_a_reload_every_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(&dir.path().join("pki"));
    let pg = PgCluster::start(PgOptions {
        roles: vec![PgRole {
            name: "bench".into(),
            password: None,
            superuser: true,
        }],
        ..Default::default()
    });
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-s", "1", "-q", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "bench", "postgres"])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let live = dir.path().join("live");
    std::fs::create_dir(&live).expect("live");
    std::fs::copy(&pki.server_chain, live.join("server.crt")).expect("cert");
    std::fs::copy(&pki.server_key, live.join("server.key")).expect("key");
    let port = free_port();
    let toml = format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend]\naddress = \"{}\"\n[log]\nlevel = \"warn,pg_tls_proxy::app::reload=info\"\n",
        live.join("server.crt").display(),
        live.join("server.key").display(),
        pg.address()
    );
    let file = write_file(&dir.path().join("proxy.toml"), &toml, 0o644, false);
    let mut proxy = Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
        .arg("--config")
        .arg(&file)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn proxy");
    let stderr = proxy.stderr.take().expect("stderr");
    let reloads = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("configuration reloaded"))
            .count()
    });
    // Wait for the listener.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut bench = Command::new(pg_bin("pgbench"));
    clear_pg_env(&mut bench)
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &pki.root_cert)
        .args(["-h", "localhost", "-p", &port.to_string(), "-U", "bench"])
        .args(["-C", "-S", "-T", "30", "-c", "4", "-j", "2", "postgres"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let bench = bench.spawn().expect("pgbench");
    let pid = proxy.id().to_string();
    let rotations = {
        let live = live.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                // Rename the same certificate over itself: a new inode, as a
                // renewal would make.
                let tmp = live.join("server.crt.new");
                let _ = std::fs::copy(live.join("server.crt"), &tmp);
                let _ = std::fs::rename(&tmp, live.join("server.crt"));
                let _ = Command::new("kill").args(["-HUP", &pid]).status();
            }
        })
    };
    let out = tokio::task::spawn_blocking(move || bench.wait_with_output())
        .await
        .expect("join")
        .expect("pgbench output");
    rotations.await.expect("rotations");
    let _ = Command::new("kill")
        .args(["-TERM", &proxy.id().to_string()])
        .status();
    let _ = proxy.wait();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("number of failed transactions: 0 (0.000%)"),
        "{text}"
    );
    let processed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .expect("transactions processed");
    assert!(processed > 0, "{text}");
    let reloaded = reloads.join().expect("reader");
    assert!(
        reloaded >= 20,
        "expected ~30 reloads, saw {reloaded}\n{text}"
    );
    eprintln!("pgbench: {processed} transactions across {reloaded} reloads");
}
