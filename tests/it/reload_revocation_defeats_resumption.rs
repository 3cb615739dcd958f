//! A resumed TLS session carries the client certificate it was first
//! verified with. After a CRL change and a reload, an old session ticket
//! must not let a revoked client back in: every reload starts a fresh
//! ticket key and session cache, so the client is fully re-verified.

use crate::common;
use std::sync::Arc;

use crate::common::client::{read_until_ready, startup_message, tls_upgrade, SSL_REQUEST};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config_file, TestProxy};
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(Option<HandshakeKind>, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(&SSL_REQUEST).await?;
    assert_eq!(tcp.read_u8().await?, b'S');
    let mut tls = tls_upgrade(tcp, config).await?;
    let kind = tls.get_ref().1.handshake_kind();
    // In TLS 1.3 the server checks the client certificate after the client
    // considers the handshake done: a refusal arrives on the first read.
    // Reading the answer also takes in the session tickets.
    tls.write_all(&startup_message(&[
        ("user", "alice"),
        ("database", "postgres"),
    ]))
    .await?;
    let msgs = read_until_ready(&mut tls).await?;
    let last = msgs.last().map(|m| m.0);
    Ok((
        kind,
        if last == Some(b'Z') {
            "alice".into()
        } else {
            "refused".into()
        },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_after_reload_defeats_resumption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(&dir.path().join("pki"));
    let pg = PgCluster::with_trust_roles(&["alice"]);
    let alice = pki.issue_client("alice");
    let crl_file = dir.path().join("crls.pem");
    let write_crls = |revoked: &[u64]| {
        let a = std::fs::read_to_string(pki.crl(revoked, 30)).expect("crl");
        let b = std::fs::read_to_string(pki.root_crl(&[], 30)).expect("root crl");
        std::fs::write(&crl_file, format!("{a}{b}")).expect("write crls");
    };
    write_crls(&[]);
    let extra = format!(
        "[client_auth]\nca = \"{}\"\ncrl = \"{}\"\n[[rules]]\nidentity = \"cn\"\nexact = \"alice\"\nroles = [\"alice\"]\n",
        pki.root_cert.display(),
        crl_file.display()
    );
    let file = config_file(
        dir.path(),
        &pki.server_chain,
        &pki.server_key,
        &pg.address(),
        &extra,
    );
    let proxy = TestProxy::start_from_file(&file).await;

    let client = common::client::mtls_client(&pki.root_cert, &alice);

    let (kind, who) = connect(proxy.addr, client.clone())
        .await
        .expect("first connection");
    assert_eq!((kind, who.as_str()), (Some(HandshakeKind::Full), "alice"));
    let (kind, _) = connect(proxy.addr, client.clone())
        .await
        .expect("second connection");
    assert_eq!(kind, Some(HandshakeKind::Resumed), "resumption works");

    // Revoke alice. Until the proxy reloads, its old CRL applies: a resumed
    // session is still accepted (this is what a reload must fix).
    write_crls(&[alice.serial]);
    let (kind, _) = connect(proxy.addr, client.clone())
        .await
        .expect("before reload");
    assert_eq!(kind, Some(HandshakeKind::Resumed));

    proxy.handle().reload().await.expect("reload");
    let err = connect(proxy.addr, client.clone())
        .await
        .expect_err("revoked after reload");
    assert!(format!("{err:?}").contains("CertificateRevoked"), "{err:?}");
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_tls_handshake_failures_total{reason="revoked"}"#,
                1.0
            )
            .await,
        1.0
    );
}
