//! 200 TLS sessions open at once through one proxy, each with its own
//! backend connection, spread evenly over the session threads.

use std::collections::HashSet;

use crate::common::client::tokio_pg;
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};

const SESSIONS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_200_sessions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        max_connections: 230,
        roles: vec![PgRole::trust("many")],
        ..Default::default()
    });
    let mut c = config(&pki, &pg.address());
    c.listen.workers = 4;
    let proxy = TestProxy::start(c).await;
    let conn = format!(
        "host=localhost port={} user=many dbname=postgres sslmode=require",
        proxy.port()
    );

    let mut tasks = Vec::new();
    for _ in 0..SESSIONS {
        let conn = conn.clone();
        let root = pki.root_cert.clone();
        tasks.push(tokio::spawn(async move {
            tokio_pg(&conn, &root).await.expect("connect")
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("join"));
    }
    assert_eq!(proxy.metric("pgtls_connections_active"), SESSIONS as f64);
    // Each new session went to the thread with the fewest.
    let per_thread =
        |t: usize| proxy.metric(&format!(r#"pgtls_session_thread_sessions{{thread="{t}"}}"#));
    assert_eq!(
        (0..4).map(per_thread).collect::<Vec<_>>(),
        [50.0; 4],
        "balanced over 4 threads"
    );

    let mut pids = HashSet::new();
    for client in &clients {
        let row = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("query");
        pids.insert(row.get::<_, i32>(0));
    }
    assert_eq!(pids.len(), SESSIONS, "one backend per session");
    drop(clients);
    for _ in 0..400 {
        // A thread's count drops a moment after the session's record.
        if proxy.metric("pgtls_connections_active") == 0.0
            && (0..4).map(per_thread).sum::<f64>() == 0.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(proxy.metric("pgtls_connections_active"), 0.0);
    assert_eq!(
        (0..4).map(per_thread).collect::<Vec<_>>(),
        [0.0; 4],
        "every thread's count goes back to 0"
    );
    assert_eq!(
        proxy.metric(r#"pgtls_connections_accepted_total"#),
        SESSIONS as f64
    );
}
