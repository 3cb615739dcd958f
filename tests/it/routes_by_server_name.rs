//! One listener in front of two PostgreSQL clusters (`[[routes]]`): the
//! server name (SNI) of psql's `host=` picks the route, each route
//! verified against its own certificate (exact name, `*.suffix` wildcard,
//! cert-manager's `tls.crt`/`tls.key` directory); without a server name
//! (an address) the default route, or the route named in options (which
//! the backend never sees), or a database pattern; direct TLS routes the
//! same way; unknown names without a default route get the TLS alert
//! unrecognized_name, and no route at all FATAL 08004.

use pg_tls_proxy::config::{Backend, Config, RouteConfig};
use tokio::io::AsyncWriteExt;

use crate::common::client::{psql, query_message, read_until_ready, startup_message, tls_client};
use crate::common::pg::PgCluster;
use crate::common::pki::Pki;
use crate::common::proxy::{config, TestProxy};

fn route(name: &str, names: &[&str], databases: &[&str], backend: &PgCluster) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        server_names: names.iter().map(|s| s.to_string()).collect(),
        databases: databases.iter().map(|s| s.to_string()).collect(),
        cert: None,
        key: None,
        cert_dir: None,
        backend: Backend {
            address: backend.address(),
            ..Backend::default()
        },
        client_auth: None,
        rules: None,
    }
}

fn conn(proxy: &TestProxy, host: &str, root: &std::path::Path, extra: &str) -> String {
    format!(
        "host={host} hostaddr=127.0.0.1 port={} user=bob dbname=postgres sslmode=verify-full sslrootcert={} {extra}",
        proxy.port(),
        root.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_server_name_options_and_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg1 = PgCluster::with_trust_roles(&["bob"]);
    let pg2 = PgCluster::with_trust_roles(&["bob"]);
    pg2.psql("CREATE DATABASE shard2_eu");
    let (port1, port2) = (pg1.port().to_string(), pg2.port().to_string());

    let db1 = pki.issue_server("db1.example.test", &["db1.example.test"]);
    let db2 = pki.issue_server("db2.example.test", &["db2.example.test"]);
    let tenants = pki.issue_server("tenants", &["*.tenants.example.test"]);
    // cert-manager's layout for the wildcard route.
    let tenants_dir = dir.path().join("tenants-tls");
    std::fs::create_dir_all(&tenants_dir).expect("dir");
    std::fs::copy(&tenants.chain, tenants_dir.join("tls.crt")).expect("crt");
    std::fs::copy(&tenants.key, tenants_dir.join("tls.key")).expect("key");

    let mut c: Config = config(&pki, &pg1.address());
    let mut two = route("two", &["db2.example.test"], &[], &pg2);
    (two.cert, two.key) = (Some(db2.chain.clone()), Some(db2.key.clone()));
    let mut t = route("tenants", &["*.tenants.example.test"], &["shard2_*"], &pg2);
    t.cert_dir = Some(tenants_dir.clone());
    let mut one = route("one", &["db1.example.test"], &[], &pg1);
    (one.cert, one.key) = (Some(db1.chain.clone()), Some(db1.key.clone()));
    c.routes = vec![one, two, t];
    // A route serving a certificate that does not cover its names is a
    // load error, not verify-full failures later.
    let mut wrong = c.clone();
    wrong.routes[1].cert = Some(db1.chain.clone());
    wrong.routes[1].key = Some(db1.key.clone());
    let err = match pg_tls_proxy::app::start(wrong, &prometheus::Registry::new()).await {
        Ok(_) => panic!("a certificate without the route's name must refuse the start"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "route two: the certificate (CN=db1.example.test) is not valid for db2.example.test"
        ),
        "{err}"
    );
    let proxy = TestProxy::start(c.clone()).await;
    let root = &pki.root_cert;
    let port_of =
        |conn: String| async move { psql(&conn, None, "SELECT current_setting('port')").await };

    // Server names pick the route; each verified against its own certificate.
    assert_eq!(
        port_of(conn(&proxy, "db1.example.test", root, "")).await,
        Ok(port1.clone())
    );
    assert_eq!(
        port_of(conn(&proxy, "db2.example.test", root, "")).await,
        Ok(port2.clone())
    );
    assert_eq!(
        port_of(conn(&proxy, "a.tenants.example.test", root, "")).await,
        Ok(port2.clone())
    );
    // No server name (an address): the default route and its certificate.
    let by_ip = |extra: &str| {
        format!(
            "host=127.0.0.1 port={} user=bob dbname=postgres sslmode=verify-full sslrootcert={} {extra}",
            proxy.port(),
            root.display()
        )
    };
    assert_eq!(port_of(by_ip("")).await, Ok(port1.clone()));
    // An unknown name goes to the default route (routing.default = true).
    let unknown = psql(
        &conn(&proxy, "unknown.example.test", root, "sslmode=verify-ca"),
        None,
        "SELECT current_setting('port')",
    )
    .await;
    assert_eq!(unknown, Ok(port1.clone()));
    // The route named in options; the backend never sees the option.
    let named = psql(
        &by_ip("options='-c pgtls.route=two -c work_mem=4242kB'"),
        None,
        "SELECT current_setting('port') || ' ' || current_setting('work_mem') || ' ' || coalesce(current_setting('pgtls.route', true), '-')",
    )
    .await;
    assert_eq!(named, Ok(format!("{port2} 4242kB -")));
    // A database pattern, for clients without a server name.
    let shard = psql(
        &by_ip("").replace("dbname=postgres", "dbname=shard2_eu"),
        None,
        "SELECT current_setting('port') || ' ' || current_database()",
    )
    .await;
    assert_eq!(shard, Ok(format!("{port2} shard2_eu")));
    // A route in options that contradicts the server name is refused.
    let err = psql(
        &conn(
            &proxy,
            "db2.example.test",
            root,
            "options='-c pgtls.route=tenants'",
        ),
        None,
        "SELECT 1",
    )
    .await
    .expect_err("mismatch");
    assert!(
        err.contains("differs from the route of the server name"),
        "{err}"
    );
    let err = psql(&by_ip("options='-c pgtls.route=nope'"), None, "SELECT 1")
        .await
        .expect_err("unknown route");
    assert!(err.contains("route \"nope\" does not exist"), "{err}");

    // Direct TLS (libpq 17's sslnegotiation=direct) routes the same way.
    let tcp = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("db2.example.test").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(tls_client(root, &[b"postgresql"]))
        .connect(name, tcp)
        .await
        .expect("direct TLS with db2's certificate");
    tls.write_all(&startup_message(&[
        ("user", "bob"),
        ("database", "postgres"),
    ]))
    .await
    .expect("startup");
    read_until_ready(&mut tls).await.expect("ready");
    tls.write_all(&query_message("SELECT current_setting('port')"))
        .await
        .expect("query");
    let rows = read_until_ready(&mut tls).await.expect("rows");
    let row = &rows.iter().find(|(t, _)| *t == b'D').expect("row").1;
    assert_eq!(String::from_utf8_lossy(&row[6..]), port2);

    assert!(
        proxy.metric(r#"pgtls_route_sessions_total{route="two",selected_by="server_name"}"#) >= 2.0
    );
    for series in [
        r#"pgtls_route_sessions_total{route="tenants",selected_by="server_name"}"#,
        r#"pgtls_route_sessions_total{route="two",selected_by="options"}"#,
        r#"pgtls_route_sessions_total{route="tenants",selected_by="database"}"#,
    ] {
        assert_eq!(proxy.metric_when(series, 1.0).await, 1.0, "{series}");
    }
    assert!(
        proxy.metric(r#"pgtls_route_sessions_total{route="default",selected_by="default"}"#) >= 2.0
    );
    let expiry = r#"pgtls_certificate_not_after_timestamp_seconds{role="server",route="tenants",subject="CN=tenants"}"#;
    assert!(proxy.metric(expiry) > 0.0, "per-route expiry");

    // Without a default route: an unknown name is refused in the handshake
    // (unrecognized_name), a client that names no route after it with 08004.
    let mut strict = c.clone();
    strict.routing.default = false;
    let strict = TestProxy::start(strict).await;
    let err = psql(
        &conn(&strict, "unknown.example.test", root, "sslmode=verify-ca"),
        None,
        "SELECT 1",
    )
    .await
    .expect_err("unknown name");
    assert!(err.contains("unrecognized name"), "{err}");
    assert_eq!(
        strict
            .metric_when(
                r#"pgtls_tls_handshake_failures_total{reason="unrecognized_name"}"#,
                1.0
            )
            .await,
        1.0
    );
    let err = psql(
        &format!(
            "host=127.0.0.1 port={} user=bob dbname=postgres sslmode=verify-full sslrootcert={}",
            strict.port(),
            root.display()
        ),
        None,
        "SELECT 1",
    )
    .await
    .expect_err("no route");
    assert!(err.contains("no route for this connection"), "{err}");
    assert_eq!(
        port_of(conn(&strict, "db2.example.test", root, "")).await,
        Ok(port2.clone()),
        "named routes still work"
    );
}
