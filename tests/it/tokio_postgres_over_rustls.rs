//! tokio-postgres with tokio-postgres-rustls (verify-full) runs queries
//! through the proxy, including the extended protocol and a cancel.

use crate::common::client::tokio_pg;
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_over_rustls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        hba: vec!["host all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![PgRole::new("app", "pw")],
        ..Default::default()
    });
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;
    let conn = format!(
        "host=localhost port={} user=app password=pw dbname=postgres sslmode=require",
        proxy.port()
    );
    let client = tokio_pg(&conn, &pki.root_cert).await.expect("connect");
    let row = client
        .query_one("SELECT $1::int + 1, current_user::text", &[&41i32])
        .await
        .expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "app");
    let rows = client
        .query("SELECT generate_series(1, 1000)", &[])
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1000);
}
