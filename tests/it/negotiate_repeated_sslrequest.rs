//! A second SSLRequest inside an established TLS session is a protocol
//! violation (08P01), sent over TLS before the close.

use crate::common::client::{
    error_fields, read_message, tls_client, tls_upgrade, GSSENC_REQUEST, SSL_REQUEST,
};
use crate::common::pg::{PgCluster, PgOptions};
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sslrequest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions::default());
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    for second in [SSL_REQUEST, GSSENC_REQUEST] {
        let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
        tcp.write_all(&SSL_REQUEST).await.expect("ssl");
        assert_eq!(tcp.read_u8().await.expect("S"), b'S');
        let mut tls = tls_upgrade(tcp, tls_client(&pki.root_cert, &[]))
            .await
            .expect("TLS");
        tls.write_all(&second).await.expect("second request");
        let (tag, body) = read_message(&mut tls).await.expect("error");
        assert_eq!(tag, b'E');
        let fields = error_fields(&body);
        assert_eq!(fields[&'S'], "FATAL");
        assert_eq!(fields[&'C'], "08P01");
    }
    assert_eq!(
        proxy.metric(r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#),
        0.0
    );
}
