//! GSSENCRequest gets `N`, then SSLRequest on the same socket gets `S` and
//! the session works; each request is allowed once.

use crate::common::client::{
    error_fields, read_message, startup_and_query, tls_client, tls_upgrade, GSSENC_REQUEST,
    SSL_REQUEST,
};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_then_ssl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&GSSENC_REQUEST).await.expect("gssenc");
    assert_eq!(tcp.read_u8().await.expect("answer"), b'N');
    tcp.write_all(&SSL_REQUEST).await.expect("ssl");
    assert_eq!(tcp.read_u8().await.expect("answer"), b'S');
    let mut tls = tls_upgrade(tcp, tls_client(&pki.root_cert, &[b"postgresql"]))
        .await
        .expect("TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    assert_eq!(
        startup_and_query(&mut tls, "bob", "SELECT current_user").await,
        "bob"
    );

    // A second GSSENCRequest is a protocol violation.
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&GSSENC_REQUEST).await.expect("gssenc");
    assert_eq!(tcp.read_u8().await.expect("answer"), b'N');
    tcp.write_all(&GSSENC_REQUEST).await.expect("gssenc again");
    let (tag, body) = read_message(&mut tcp).await.expect("error");
    assert_eq!(tag, b'E');
    assert_eq!(error_fields(&body)[&'C'], "08P01");
}
