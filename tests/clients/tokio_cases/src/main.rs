//! tokio-postgres (with tokio-postgres-rustls, ring) through pg-tls-proxy.
//!
//!   tokio-cases CASE     CASE: tls-login direct-tls mtls refused-cert cancel copy
//!
//! Connection parameters come from PGT_* environment variables (see run.sh).
//! Prints "ok", "FAIL <reason>" or "skip <reason>" first, then "note: ..."
//! lines.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::{SslMode, SslNegotiation};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

const CLIENT: &str = "tokio-postgres";

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("missing {k}"))
}

/// rustls' own WebPKI verifier (chain to PGT_CA and the host name: libpq's
/// verify-full), recording which TLS version's handshake signature it
/// checked, so the case can show the session was TLS and which version.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Arc<Mutex<Option<&'static str>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        *self.seen.lock().unwrap() = Some("TLSv1.2");
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        *self.seen.lock().unwrap() = Some("TLSv1.3");
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

struct Tls {
    connect: MakeRustlsConnect,
    seen: Arc<Mutex<Option<&'static str>>>,
}

impl Tls {
    fn version(&self) -> Option<&'static str> {
        *self.seen.lock().unwrap()
    }
}

/// A rustls client config trusting PGT_CA, offering ALPN "postgresql" (as
/// libpq 17+; required for direct TLS), with an optional client certificate.
fn tls(client_cert: Option<(&str, &str)>) -> Result<Tls, Box<dyn std::error::Error>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(env("PGT_CA"))? {
        roots.add(cert?)?;
    }
    let seen = Arc::new(Mutex::new(None));
    let verifier = Recording {
        inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?,
        seen: seen.clone(),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?
        }
    };
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Tls {
        connect: MakeRustlsConnect::new(config),
        seen,
    })
}

/// sslmode=require: tokio-postgres insists on TLS; rustls does the checks.
fn config(user: &str, password: Option<&str>) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(env("PGT_HOST"))
        .port(env("PGT_PORT").parse().expect("PGT_PORT"))
        .dbname(env("PGT_DB"))
        .user(user)
        .ssl_mode(SslMode::Require)
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = password {
        c.password(p);
    }
    c
}

fn app() -> tokio_postgres::Config {
    config(&env("PGT_USER"), Some(&env("PGT_PASSWORD")))
}

async fn connect(
    c: &tokio_postgres::Config,
    tls: &Tls,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = c.connect(tls.connect.clone()).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

type R = Result<Option<String>, Box<dyn std::error::Error>>;

async fn login(direct: bool) -> R {
    let tls = tls(None)?;
    let mut c = app();
    if direct {
        c.ssl_negotiation(SslNegotiation::Direct);
    }
    let client = connect(&c, &tls).await?;
    let Some(version) = tls.version() else {
        return Ok(Some("FAIL connected without a TLS handshake".into()));
    };
    let row = client.query_one("SELECT 1, pg_backend_pid()", &[]).await?;
    if row.get::<_, i32>(0) != 1 {
        return Ok(Some("FAIL SELECT 1 did not return 1".into()));
    }
    println!("ok");
    println!(
        "note: tokio-postgres 0.7 + rustls (ring), sslnegotiation={}, {version}",
        if direct { "direct" } else { "postgres" }
    );
    println!("note: pg_backend_pid() {}", row.get::<_, i32>(1));
    Ok(None)
}

async fn mtls() -> R {
    let tls = tls(Some((&env("PGT_CERT"), &env("PGT_KEY"))))?;
    let client = connect(&config(&env("PGT_CERT_USER"), None), &tls).await?;
    let who: String = client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0);
    if who != env("PGT_CERT_USER") {
        return Ok(Some(format!("FAIL current_user is {who}")));
    }
    if tls.version().is_none() {
        return Ok(Some("FAIL connected without a TLS handshake".into()));
    }
    println!("ok");
    Ok(None)
}

async fn refused_cert() -> R {
    let tls = tls(Some((&env("PGT_BAD_CERT"), &env("PGT_BAD_KEY"))))?;
    let c = config(&env("PGT_CERT_USER"), None);
    match connect(&c, &tls).await {
        Ok(client) => match client.query_one("SELECT 1", &[]).await {
            Ok(_) => Ok(Some(
                "FAIL logged in with a certificate from a foreign CA".into(),
            )),
            Err(e) => {
                println!("ok");
                println!("note: error (first query): {}", chain(&e));
                Ok(None)
            }
        },
        Err(e) => {
            println!("ok");
            println!("note: error: {}", chain(&e));
            Ok(None)
        }
    }
}

async fn cancel() -> R {
    // CancelToken::cancel_query(tls): a new connection with the session's
    // sslmode, so SSLRequest + TLS, then the CancelRequest.
    let tls = tls(None)?;
    let client = connect(&app(), &tls).await?;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let watcher = connect(&app(), &tls).await?;
    let token = client.cancel_token();
    let connector = tls.connect.clone();
    // Cancel only once the server runs the query (read from a second
    // connection): a CancelRequest that came before it would hit an idle
    // backend and prove nothing.
    let canceller = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let row = watcher
                .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await?;
            if row.and_then(|r| r.get::<_, Option<String>>(0)).as_deref() == Some("active") {
                let sent = Instant::now();
                token.cancel_query(connector).await?;
                return Ok(Some(sent));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, tokio_postgres::Error>(None)
    });
    let result = client.batch_execute("SELECT pg_sleep(30)").await;
    let sent = match canceller.await? {
        Err(e) => return Ok(Some(format!("FAIL cancel_query: {}", chain(&e)))),
        Ok(None) => return Ok(Some("FAIL pg_sleep(30) never showed as active".into())),
        Ok(Some(sent)) => sent,
    };
    let elapsed = sent.elapsed().as_secs_f64();
    match result {
        Ok(()) => Ok(Some(
            "FAIL pg_sleep(30) finished without being cancelled".into(),
        )),
        Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) && elapsed < 10.0 => {
            client.query_one("SELECT 1", &[]).await?; // the session goes on
            println!("ok");
            println!(
                "note: CancelToken::cancel_query(tls), 57014 {elapsed:.1} s after it: {}",
                chain(&e)
            );
            Ok(None)
        }
        Err(e) => Ok(Some(format!(
            "FAIL {elapsed:.1} s after the cancel: {}",
            chain(&e)
        ))),
    }
}

async fn copy() -> R {
    let n: usize = env("PGT_COPY_ROWS").parse()?;
    let mut input = String::new();
    let mut expected = String::new();
    for i in 1..=n {
        let row = format!("{i}\t{i:06}-{i:080}\n");
        input.push_str(CLIENT);
        input.push('\t');
        input.push_str(&row);
        expected.push_str(&row);
    }
    let tls = tls(None)?;
    let client = connect(&app(), &tls).await?;
    let sink = client
        .copy_in::<_, Bytes>("COPY copy_rows (client, n, payload) FROM STDIN")
        .await?;
    pin_mut!(sink);
    // In 64 KiB chunks, as a streaming client would send them.
    for chunk in input.as_bytes().chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await?;
    }
    let written = sink.as_mut().finish().await?;
    if written != n as u64 {
        return Ok(Some(format!("FAIL COPY FROM reported {written} rows")));
    }
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT n, payload FROM copy_rows WHERE client = '{CLIENT}' ORDER BY n) TO STDOUT"
        ))
        .await?;
    pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    if out != expected.as_bytes() {
        return Ok(Some(format!(
            "FAIL COPY TO returned {} bytes, not the {} written",
            out.len(),
            expected.len()
        )));
    }
    println!("ok");
    println!("note: {n} rows in (copy_in) and out (copy_out), identical");
    Ok(None)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let result = match name.as_str() {
        "tls-login" => login(false).await,
        "direct-tls" => login(true).await,
        "mtls" => mtls().await,
        "refused-cert" => refused_cert().await,
        "cancel" => cancel().await,
        "copy" => copy().await,
        other => Ok(Some(format!("FAIL unknown case {other}"))),
    };
    let line = match result {
        Ok(line) => line,
        Err(e) => Some(format!("FAIL {}", chain(e.as_ref()))),
    };
    if let Some(line) = line {
        println!("{line}");
        if line.starts_with("FAIL") {
            std::process::exit(1);
        }
    }
}
