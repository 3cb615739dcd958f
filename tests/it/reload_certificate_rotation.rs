//! Certificate rotation without dropping anyone: a new certificate renamed
//! over the old file is served after a reload (SIGHUP's code path, and
//! POST /reload); sessions opened before keep running; a broken
//! certificate or an unparsable rules file keeps the old state and counts
//! a failure.

use crate::common::client::{http, pem_der, served_leaf, tokio_pg};
use crate::common::pg::{PgCluster, PgOptions};
use crate::common::pki::Pki;
use crate::common::proxy::{config_file, TestProxy};
use crate::common::write_file;

fn replace(dir: &std::path::Path, name: &str, from: &std::path::Path) {
    // Write next to the target, then rename over it: what cert-manager and
    // certbot do, so readers never see a half-written file.
    let tmp = dir.join(format!("{name}.new"));
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_certificate_and_survive_bad_reloads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(&dir.path().join("pki"));
    let pg = PgCluster::with_trust_roles(&["bob"]);
    let live = dir.path().join("live");
    std::fs::create_dir(&live).expect("live dir");
    replace(&live, "server.crt", &pki.server_chain);
    replace(&live, "server.key", &pki.server_key);
    let file = config_file(
        dir.path(),
        &live.join("server.crt"),
        &live.join("server.key"),
        &pg.address(),
        "",
    );
    let proxy = TestProxy::start_from_file(&file).await;
    let old_leaf = pem_der(&pki.server_leaf);
    assert_eq!(served_leaf(proxy.addr, &pki.root_cert).await, old_leaf);

    // A session opened before the rotation.
    let conn = format!(
        "host=localhost port={} user=bob dbname=postgres sslmode=require",
        proxy.port()
    );
    let before = tokio_pg(&conn, &pki.root_cert).await.expect("connect");
    before.simple_query("SELECT 1").await.expect("query before");

    // Rotate: new certificate and key, renamed over the old files.
    let next = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    replace(&live, "server.crt", &next.chain);
    replace(&live, "server.key", &next.key);
    proxy.handle().reload().await.expect("reload");
    assert_eq!(
        served_leaf(proxy.addr, &pki.root_cert).await,
        pem_der(&next.cert),
        "new leaf served"
    );
    before
        .simple_query("SELECT 2")
        .await
        .expect("the old session still runs");
    let after = tokio_pg(&conn, &pki.root_cert)
        .await
        .expect("connect after");
    after.simple_query("SELECT 3").await.expect("query after");
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_config_reloads_total{result="success"}"#, 1.0)
            .await,
        1.0
    );

    // A broken certificate: the reload fails and the running state stays.
    write_file(
        &live.join("server.crt"),
        "-----BEGIN CERTIFICATE-----\ngarbage\n",
        0o644,
        false,
    );
    let err = proxy
        .handle()
        .reload()
        .await
        .expect_err("broken certificate");
    assert!(err.contains("tls.cert"), "{err}");
    assert_eq!(
        served_leaf(proxy.addr, &pki.root_cert).await,
        pem_der(&next.cert),
        "old state kept"
    );
    // A key that does not match.
    replace(&live, "server.crt", &next.chain);
    replace(&live, "server.key", &pki.server_key);
    let err = proxy.handle().reload().await.expect_err("mismatched key");
    assert!(err.contains("does not match"), "{err}");
    replace(&live, "server.key", &next.key);

    // An unparsable rules file, through POST /reload.
    let good = std::fs::read_to_string(&file).expect("config");
    write_file(
        &file,
        &format!("{good}\n[[rules]]\nidentity = \"cn\"\npattern = '('\nroles = ['x']\n"),
        0o644,
        false,
    );
    let (status, body) = http("POST", &format!("{}/reload", proxy.admin_url())).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("old configuration kept"), "{body}");
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_config_reloads_total{result="failure"}"#, 3.0)
            .await,
        3.0
    );
    after
        .simple_query("SELECT 4")
        .await
        .expect("sessions untouched by failed reloads");

    write_file(&file, &good, 0o644, false);
    let (status, body) = http("POST", &format!("{}/reload", proxy.admin_url())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        served_leaf(proxy.addr, &pki.root_cert).await,
        pem_der(&next.cert)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_interval_picks_up_a_renamed_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(&dir.path().join("pki"));
    let pg = PgCluster::start(PgOptions::default());
    let live = dir.path().join("live");
    std::fs::create_dir(&live).expect("live dir");
    replace(&live, "server.crt", &pki.server_chain);
    replace(&live, "server.key", &pki.server_key);
    let file = config_file(
        dir.path(),
        &live.join("server.crt"),
        &live.join("server.key"),
        &pg.address(),
        "[reload]\npoll_interval = \"200ms\"\n",
    );
    let proxy = TestProxy::start_from_file(&file).await;
    let next = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    replace(&live, "server.key", &next.key);
    replace(&live, "server.crt", &next.chain);
    let want = pem_der(&next.cert);
    let mut served = Vec::new();
    for _ in 0..100 {
        served = served_leaf(proxy.addr, &pki.root_cert).await;
        if served == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        served, want,
        "the renamed certificate is served without a signal"
    );
}
