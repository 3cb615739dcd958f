//! Graceful drain: during the grace period a running query may finish and
//! new clients are refused; when it is over, the running query is
//! cancelled and the client gets FATAL 57P01 at a message boundary.

use std::time::Duration;

use crate::common::client::{error_fields, logged_in, query_message, read_message};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_then_terminate_with_57p01() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let mut c = config(&pki, &pg.address());
    c.shutdown.grace_period = Duration::from_millis(800);
    let proxy = TestProxy::start(c).await;
    let addr = proxy.addr;

    let (mut tls, _) = logged_in(addr, &pki.root_cert, "bob").await;
    tls.write_all(&query_message("SELECT pg_sleep(60)"))
        .await
        .expect("query");
    pg.wait_active("SELECT pg_sleep(60)").await;

    let shutdown = tokio::spawn(proxy.shutdown());
    // The listener closes as soon as the drain has begun (polled: the
    // spawned shutdown may take a moment to get there on a busy machine).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new connections while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Everything the client receives until the connection closes.
    let mut codes = Vec::new();
    loop {
        match read_message(&mut tls).await {
            Ok((b'E', body)) => {
                let f = error_fields(&body);
                codes.push((f[&'S'].clone(), f[&'C'].clone()));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let report = shutdown.await.expect("join");
    // The session, and perhaps a probe above that the kernel had queued
    // before the listener closed (taken from the backlog, ended at once).
    assert!(report.sessions_at_start >= 1, "{report:?}");
    assert_eq!(report.terminated, 1);
    assert_eq!(report.cancel_requests, 1);
    assert_eq!(
        codes.last(),
        Some(&("FATAL".to_string(), "57P01".to_string())),
        "the last word is admin_shutdown: {codes:?}"
    );
    // The backend logs the cancel when it acts on it, which may be a
    // moment after the proxy closed its connection.
    let cancelled = || pg.log().contains("canceling statement due to user request");
    for _ in 0..100 {
        if cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cancelled(), "the query was cancelled");
}

/// Connections the kernel completed before the drain began (queued in the
/// listen backlog) are served, not reset when the listener closes: a load
/// balancer sent them before it saw /ready go 503.
///
/// Deterministic: on this current-thread runtime the accept loop cannot run
/// between the connects and the drain's first step, so all three are still
/// queued when accepting stops.
#[tokio::test(flavor = "current_thread")]
async fn drain_serves_the_listen_backlog() {
    use std::future::Future;
    use tokio::io::AsyncReadExt;

    use crate::common::client::{startup_and_query, tls_client, tls_upgrade, SSL_REQUEST};

    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let proxy = TestProxy::start(config(&pki, &pg.address())).await;
    let addr = proxy.addr;

    // Blocking connects: the kernel completes them, nothing accepts them.
    let queued: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    // The drain's first step (readiness off, accepting stops), without
    // letting the accept loop run before it.
    let mut shutdown = Box::pin(proxy.shutdown());
    std::future::poll_fn(|cx| {
        assert!(shutdown.as_mut().poll(cx).is_pending(), "a drain waits");
        std::task::Poll::Ready(())
    })
    .await;
    let shutdown = tokio::spawn(shutdown);

    for tcp in queued {
        tcp.set_nonblocking(true).expect("nonblocking");
        let mut tcp = TcpStream::from_std(tcp).expect("tokio stream");
        tcp.write_all(&SSL_REQUEST).await.expect("ssl request");
        assert_eq!(tcp.read_u8().await.expect("served, not reset"), b'S');
        let mut tls = tls_upgrade(tcp, tls_client(&pki.root_cert, &[]))
            .await
            .expect("TLS");
        assert_eq!(startup_and_query(&mut tls, "bob", "SELECT 1").await, "1");
    }
    let report = shutdown.await.expect("join");
    assert_eq!(report.sessions_at_start, 3, "{report:?}");
    assert_eq!(report.terminated, 0, "{report:?}");
}
