//! PROXY protocol v2 (`listen.proxy_protocol = "required"`), with the real
//! binary and its text log: the client address a trusted balancer sends is
//! the one the connection span and the audit event carry (the balancer's
//! own address as `via`); LOCAL health checks keep the socket's address;
//! untrusted sources, truncated and oversized headers and clients that send
//! no header are refused and counted, never a panic.

use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::client::{
    http, query_message, read_until_ready, startup_message, tls_client, tls_upgrade, SSL_REQUEST,
};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{logged_addr, spawn_logged};
use crate::common::write_file;

const SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn header(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.extend_from_slice(&[command, family]);
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// PROXY, TCP over IPv4, from 203.0.113.7:40000.
fn proxied(to_port: u16) -> Vec<u8> {
    let mut p = vec![203, 0, 113, 7, 127, 0, 0, 1];
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&to_port.to_be_bytes());
    header(0x21, 0x11, &p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_from_trusted_balancers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let start = |trusted: &str, name: &str| {
        let toml = format!(
            "[listen]\naddress = \"127.0.0.1:0\"\nproxy_protocol = \"required\"\nproxy_trusted = [\"{trusted}\"]\n[admin]\naddress = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[backend]\naddress = \"{}\"\n",
            pki.server_chain.display(),
            pki.server_key.display(),
            pg.address()
        );
        let file = write_file(&dir.path().join(name), &toml, 0o644, false);
        spawn_logged(
            Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
                .arg("--config")
                .arg(&file)
                .env("RUST_LOG", "info"),
        )
    };
    let (_child, mut rx) = start("127.0.0.0/8", "trusted.toml");
    let admin = logged_addr(&line_with(&mut rx, "admin listening").await);
    let port = logged_addr(&line_with(&mut rx, "listening local_addr").await).port();

    // A session through a trusted balancer: the client's address is logged.
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(&proxied(port)).await.expect("PROXY");
    tcp.write_all(&SSL_REQUEST).await.expect("SSLRequest");
    assert_eq!(tcp.read_u8().await.expect("S"), b'S');
    let mut tls = tls_upgrade(tcp, tls_client(&pki.root_cert, &[]))
        .await
        .expect("TLS");
    tls.write_all(&startup_message(&[
        ("user", "bob"),
        ("database", "postgres"),
    ]))
    .await
    .expect("startup");
    read_until_ready(&mut tls).await.expect("logged in");
    tls.write_all(&query_message("SELECT 1"))
        .await
        .expect("query");
    read_until_ready(&mut tls).await.expect("answer");
    drop(tls);
    let audit = line_with(&mut rx, "session ended").await;
    assert!(audit.contains("peer=203.0.113.7:40000"), "{audit}");
    assert!(
        audit.contains("via=127.0.0.1:"),
        "the balancer is kept too: {audit}"
    );

    // A LOCAL health check, then refusals.
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(&header(0x20, 0x00, &[]))
        .await
        .expect("LOCAL");
    tcp.write_all(&SSL_REQUEST).await.expect("SSLRequest");
    assert_eq!(
        tcp.read_u8().await.expect("S"),
        b'S',
        "LOCAL goes on as a connection"
    );
    drop(tcp);
    let mut oversized = proxied(port);
    oversized[14..16].copy_from_slice(&60_000u16.to_be_bytes());
    for (bytes, why) in [
        (&SSL_REQUEST[..], "truncated"),
        (&oversized[..], "oversized"),
        (
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nXXXXXXXXXX"[..],
            "invalid",
        ),
        (&proxied(port)[..20], "truncated"),
    ] {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        tcp.write_all(bytes).await.expect("write");
        tcp.shutdown().await.expect("half-close");
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{why}: closed without an answer");
    }
    let (_, metrics) = http("GET", &format!("http://{admin}/metrics")).await;
    for (result, n) in [
        ("ok", 1),
        ("local", 1),
        ("truncated", 2),
        ("oversized", 1),
        ("invalid", 1),
    ] {
        let series = format!("pgtls_proxy_protocol_total{{result=\"{result}\"}} {n}");
        assert!(metrics.contains(&series), "{series} in:\n{metrics}");
    }

    // A replica that trusts only another network closes the connection.
    let (_other, mut rx) = start("10.0.0.0/8", "untrusted.toml");
    let port = logged_addr(&line_with(&mut rx, "listening local_addr").await).port();
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(&proxied(port)).await.expect("PROXY");
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    let refused = line_with(&mut rx, "PROXY header refused").await;
    assert!(refused.contains("untrusted"), "{refused}");
}

/// The next log line that contains `needle`.
async fn line_with(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, needle: &str) -> String {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = rx.recv().await {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the proxy exited before logging {needle:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in time"))
}
