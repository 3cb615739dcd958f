//! PostgreSQL 17 direct TLS (`sslnegotiation=direct`): the ClientHello comes
//! first; ALPN "postgresql" is required and selected, as PostgreSQL 17 does.

use crate::common::client::{startup_and_query, tls_client, tls_upgrade};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_requires_alpn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;

    // With ALPN postgresql: works, and the protocol is selected.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let mut tls = tls_upgrade(tcp, tls_client(&pki.root_cert, &[b"postgresql"]))
        .await
        .expect("direct TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    assert_eq!(startup_and_query(&mut tls, "bob", "SELECT 7").await, "7");
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_negotiations_total{path="direct_tls"}"#, 1.0)
            .await,
        1.0
    );

    // Without ALPN: TLS alert no_application_protocol.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let err = tls_upgrade(tcp, tls_client(&pki.root_cert, &[]))
        .await
        .expect_err("no ALPN must be refused");
    assert!(
        format!("{err:?}").contains("NoApplicationProtocol"),
        "{err:?}"
    );

    // ALPN without postgresql: the same alert.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    let err = tls_upgrade(tcp, tls_client(&pki.root_cert, &[b"http/1.1"]))
        .await
        .expect_err("wrong ALPN must be refused");
    assert!(
        format!("{err:?}").contains("NoApplicationProtocol"),
        "{err:?}"
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_connects_total{result="ok",sslmode="disable"}"#,
                1.0
            )
            .await,
        1.0
    );
}
