//! Clients for tests: the real `psql` binary, tokio-postgres over rustls,
//! and raw-socket probes that send exact bytes.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{clear_pg_env, pg_bin, run};

pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// Runs real psql with a connection string; `Ok(stdout)` or `Err(stderr…)`.
/// Blocking work runs on the blocking pool so the proxy keeps running.
pub async fn psql(conn: &str, password: Option<&str>, sql: &str) -> Result<String, String> {
    let conn = conn.to_string();
    let password = password.map(str::to_string);
    let sql = sql.to_string();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(pg_bin("psql"));
        clear_pg_env(&mut cmd);
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.env("PGCONNECT_TIMEOUT", "20");
        cmd.args([
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &conn,
            "-c",
            &sql,
        ]);
        run(&mut cmd).map(|out| out.trim_end_matches('\n').to_string())
    })
    .await
    .expect("psql task")
}

/// A libpq connection string for a verify-full TLS session to the proxy.
pub fn verify_full(port: u16, user: &str, root: &Path) -> String {
    format!(
        "host=localhost port={port} user={user} dbname=postgres sslmode=verify-full sslrootcert={}",
        root.display()
    )
}

pub fn roots(root: &Path) -> RootCertStore {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).expect("read root") {
        store.add(cert.expect("root PEM")).expect("add root");
    }
    store
}

/// A rustls client config trusting `root`, with the given ALPN offer.
pub fn tls_client(root: &Path, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(root))
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A rustls client config trusting `root` that presents `cert` (its chain
/// file: leaf + intermediate) and key.
pub fn mtls_client(root: &Path, cert: &super::pki::CertFiles) -> Arc<ClientConfig> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(&cert.chain)
        .expect("chain")
        .map(|c| c.expect("cert"))
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&cert.key).expect("key");
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots(root))
            .with_client_auth_cert(chain, key)
            .expect("client cert"),
    )
}

/// tokio-postgres over rustls (verify-full against `root`).
pub async fn tokio_pg(
    conn: &str,
    root: &Path,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls_client(root, &[])).clone());
    let (client, connection) = tokio_postgres::connect(conn, tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// TLS over an already negotiated socket (after `S`, or direct).
pub async fn tls_upgrade(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A protocol 3.0 StartupMessage.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    startup_message_version(196608, params)
}

pub fn startup_message_version(version: i32, params: &[(&str, &str)]) -> Vec<u8> {
    pg_tls_proxy::wire::packet::encode_startup(version, params)
}

/// Reads one typed message: (tag, body).
pub async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(u8, Vec<u8>)> {
    let tag = s.read_u8().await?;
    let len = s.read_i32().await?;
    let mut body = vec![0; (len as usize).saturating_sub(4)];
    s.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// Reads messages until ReadyForQuery or ErrorResponse (inclusive).
pub async fn read_until_ready<S: AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    loop {
        let (tag, body) = read_message(s).await?;
        let end = tag == b'Z' || tag == b'E';
        out.push((tag, body));
        if end {
            return Ok(out);
        }
    }
}

/// The fields of an ErrorResponse body by code: S, C (SQLSTATE), M, H, …
pub fn error_fields(body: &[u8]) -> HashMap<char, String> {
    body.split(|&b| b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0] as char, String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// Sends a startup and a simple query, returns the first DataRow's first
/// column (the backend must trust the user).
pub async fn startup_and_query<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    user: &str,
    sql: &str,
) -> String {
    s.write_all(&startup_message(&[
        ("user", user),
        ("database", "postgres"),
    ]))
    .await
    .expect("send startup");
    let msgs = read_until_ready(s).await.expect("startup answer");
    let last = msgs.last().expect("messages");
    assert_eq!(last.0, b'Z', "startup failed: {:?}", error_fields(&last.1));
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    s.write_all(&q).await.expect("send query");
    let msgs = read_until_ready(s).await.expect("query answer");
    let row = msgs.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    let len = i32::from_be_bytes([row.1[2], row.1[3], row.1[4], row.1[5]]) as usize;
    String::from_utf8_lossy(&row.1[6..6 + len]).into_owned()
}

/// Adds a client certificate (chain: leaf + intermediate) to a libpq
/// connection string.
pub fn with_cert(conn: &str, cert: &super::pki::CertFiles) -> String {
    format!(
        "{conn} sslcert={} sslkey={}",
        cert.chain.display(),
        cert.key.display()
    )
}

/// A minimal HTTP/1.1 GET or POST against the admin listener: (status, body).
pub async fn http(method: &str, url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut tcp = TcpStream::connect(host).await.expect("connect admin");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("send request");
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.expect("read response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The leaf certificate (DER) a TLS handshake with the proxy serves.
pub async fn served_leaf(addr: std::net::SocketAddr, root: &Path) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&SSL_REQUEST).await.expect("ssl");
    assert_eq!(tcp.read_u8().await.expect("S"), b'S');
    let tls = tls_upgrade(tcp, tls_client(root, &[])).await.expect("TLS");
    tls.get_ref().1.peer_certificates().expect("certificates")[0].to_vec()
}

/// DER of the first certificate in a PEM file.
pub fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .expect("read PEM")
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// SSLRequest, `S`, then TLS: a raw encrypted session to the proxy.
pub async fn tls_session(
    addr: std::net::SocketAddr,
    root: &Path,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&SSL_REQUEST).await.expect("ssl");
    assert_eq!(tcp.read_u8().await.expect("S"), b'S');
    tls_upgrade(tcp, tls_client(root, &[])).await.expect("TLS")
}

/// A raw TLS session logged in as `user` (trust auth) to database
/// postgres; returns it with the messages up to ReadyForQuery.
pub async fn logged_in(
    addr: std::net::SocketAddr,
    root: &Path,
    user: &str,
) -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    Vec<(u8, Vec<u8>)>,
) {
    let mut tls = tls_session(addr, root).await;
    tls.write_all(&startup_message(&[
        ("user", user),
        ("database", "postgres"),
    ]))
    .await
    .expect("startup");
    let msgs = read_until_ready(&mut tls).await.expect("ready");
    (tls, msgs)
}

/// A simple Query message.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    q
}
