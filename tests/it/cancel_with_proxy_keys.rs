//! Proxy-issued cancel keys: psql's own Ctrl-C (libpq's PQcancel, a new
//! plaintext connection) cancels a running pg_sleep through the proxy; the
//! BackendKeyData a client sees carries the backend's own pid (so NOTIFY's
//! sender pid and pg_terminate_backend work as against PostgreSQL) and a
//! secret of the proxy's; a wrong key cancels nothing and gets no reply.

use std::process::Command;
use std::time::Duration;

use crate::common::client::{error_fields, logged_in, query_message, read_until_ready};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use crate::common::{clear_pg_env, pg_bin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs psql in a pseudo-terminal, starts `SELECT pg_sleep(60)`, presses
/// Ctrl-C after a second, and returns everything psql printed.
const PTY_SCRIPT: &str = r#"
import os, pty, subprocess, sys, time, select
psql, conn, sock, port = sys.argv[1:5]
pid, fd = pty.fork()
if pid == 0:
    os.execv(psql, [psql, "-X", conn])
out = b""
def pump(seconds):
    global out
    end = time.time() + seconds
    while time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                out += os.read(fd, 4096)
            except OSError:
                return
def running():
    # The server's view, over its unix socket: Ctrl-C only once the query
    # runs (a fixed wait races it on a busy machine).
    out = subprocess.run([psql, "-X", "-At", "-h", sock, "-p", port, "-U", "postgres", "-d", "postgres",
                          "-c", "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                "AND query LIKE 'SELECT pg_sleep(60)%'"], capture_output=True, text=True)
    return out.stdout.strip() not in ("", "0")
deadline = time.time() + 15
while b"=>" not in out and time.time() < deadline:
    pump(0.1)
os.write(fd, b"\\timing on\nSELECT pg_sleep(60);\n")
deadline = time.time() + 15
while not running() and time.time() < deadline:
    pump(0.1)
os.write(fd, b"\x03")
deadline = time.time() + 10
while b"canceling statement" not in out and time.time() < deadline:
    pump(0.2)
os.write(fd, b"\\q\n")
pump(0.5)
sys.stdout.write(out.decode(errors="replace"))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_and_wrong_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    // psql's own Ctrl-C.
    let conn = format!(
        "host=localhost port={} user=bob dbname=postgres sslmode=verify-full sslrootcert={}",
        proxy.port(),
        pki.root_cert.display()
    );
    let psql = pg_bin("psql");
    let (sock, port) = (pg.socket_dir(), pg.port().to_string());
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("python3");
        clear_pg_env(&mut cmd)
            .arg("-c")
            .arg(PTY_SCRIPT)
            .arg(psql)
            .arg(conn)
            .arg(sock)
            .arg(port);
        cmd.output().expect("python3 pty")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("canceling statement due to user request"),
        "{text}"
    );
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_cancel_requests_total{result="forwarded"}"#, 1.0)
            .await,
        1.0
    );

    // A raw session: its key carries the backend's pid.
    let (mut tls, msgs) = logged_in(proxy.addr, &pki.root_cert, "bob").await;
    let key = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData")
        .1
        .clone();
    let seen_pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    tls.write_all(&query_message("SELECT pg_backend_pid()"))
        .await
        .expect("query");
    let rows = read_until_ready(&mut tls).await.expect("pid");
    let row = &rows.iter().find(|(t, _)| *t == b'D').expect("row").1;
    let real_pid: i32 = String::from_utf8_lossy(&row[6..]).parse().expect("pid");
    assert_eq!(seen_pid, real_pid, "the client sees the backend's pid");

    // "Is this NOTIFY my own?": the sender pid is the key's pid.
    tls.write_all(&query_message("LISTEN ch; NOTIFY ch"))
        .await
        .expect("query");
    let answer = read_until_ready(&mut tls).await.expect("notify");
    let note = &answer
        .iter()
        .find(|(t, _)| *t == b'A')
        .expect("NotificationResponse")
        .1;
    assert_eq!(
        i32::from_be_bytes([note[0], note[1], note[2], note[3]]),
        seen_pid
    );

    // A wrong secret cancels nothing and gets no reply.
    tls.write_all(&query_message("SELECT pg_sleep(1)"))
        .await
        .expect("query");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut wrong = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
    wrong.extend_from_slice(&key[..4]);
    wrong.extend_from_slice(&[key[4] ^ 0xff, key[5], key[6], key[7]]);
    let mut plain = TcpStream::connect(proxy.addr).await.expect("connect");
    plain.write_all(&wrong).await.expect("cancel");
    let mut nothing = Vec::new();
    plain.read_to_end(&mut nothing).await.expect("closed");
    assert!(nothing.is_empty());
    let answer = read_until_ready(&mut tls).await.expect("answer");
    assert!(
        answer.iter().all(|(t, _)| *t != b'E'),
        "the query ran to the end: {:?}",
        answer
            .iter()
            .find(|(t, _)| *t == b'E')
            .map(|e| error_fields(&e.1))
    );
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_cancel_requests_total{result="unknown"}"#, 1.0)
            .await,
        1.0
    );

    // pg_terminate_backend with the key's pid, from another session, ends
    // this one: the client gets the backend's FATAL 57P01.
    assert_eq!(
        pg.psql(&format!("SELECT pg_terminate_backend({seen_pid})"))
            .trim(),
        "t"
    );
    let (tag, body) = crate::common::client::read_message(&mut tls)
        .await
        .expect("the backend's goodbye");
    assert_eq!(tag, b'E');
    assert_eq!(error_fields(&body)[&'C'], "57P01");
}
