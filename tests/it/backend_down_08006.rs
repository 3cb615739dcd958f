//! An unreachable backend gives the client FATAL 08006 saying why, not a
//! silent close.

use crate::common;
use crate::common::client::psql;
use crate::common::free_port;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_08006() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy = TestProxy::start(config(&pki, &dead)).await;
    let conn = common::client::verify_full(proxy.port(), "alice", &pki.root_cert);
    let err = psql(&conn, Some("x"), "SELECT 1")
        .await
        .expect_err("backend is down");
    assert!(
        err.contains("could not reach the PostgreSQL server: connection refused"),
        "{err}"
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_backend_connects_total{result="connect",sslmode="disable"}"#,
                1.0
            )
            .await,
        1.0
    );

    // The SQLSTATE, through a driver that exposes it.
    let conn = format!(
        "host=localhost port={} user=alice password=x dbname=postgres",
        proxy.port()
    );
    let Err(err) = common::client::tokio_pg(&conn, &pki.root_cert).await else {
        panic!("backend is down, the connection must fail");
    };
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08006");
    assert_eq!(db.severity(), "FATAL");
}
