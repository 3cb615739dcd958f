//! SCRAM terminated at the proxy (`[scram] terminate`): the client proves
//! its password to the proxy (verifier from an auth_file), the proxy logs
//! in to PostgreSQL with the key that proof revealed. Every
//! channel_binding a client can choose works through a verify-full and a
//! plaintext backend link; wrong passwords and unknown users look the
//! same; a changed password on the server is refused before any proof
//! reaches it; downgrades and malformed messages get PostgreSQL's errors;
//! the auth_file reloads while sessions run.

use std::path::Path;

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::client::{
    error_fields, psql, read_message, startup_message, tls_client, tls_upgrade, tokio_pg,
    verify_full, SSL_REQUEST,
};
use crate::common::pg::{PgCluster, PgRole};
use crate::common::pki::Pki;
use crate::common::proxy::{config, config_file, TestProxy};
use crate::common::{tls_cluster, write_file};
use pg_tls_proxy::config::{Config, SecretSource};

fn userlist(pg: &PgCluster, roles: &[&str]) -> String {
    roles
        .iter()
        .map(|r| {
            let v = pg.psql(&format!(
                "SELECT rolpassword FROM pg_authid WHERE rolname = '{r}'"
            ));
            format!("\"{r}\" \"{}\"\n", v.trim())
        })
        .collect()
}

/// An auth_file with `roles`' verifiers as the cluster stores them, and a
/// mock secret file.
fn scram_files(
    dir: &Path,
    pg: &PgCluster,
    roles: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let auth_file = write_file(
        &dir.join("userlist.txt"),
        &userlist(pg, roles),
        0o600,
        false,
    );
    let secret = write_file(&dir.join("mock"), "a mock secret\n", 0o600, false);
    (auth_file, secret)
}

fn terminating(c: &mut Config, auth_file: &Path, secret: &Path) {
    c.scram.terminate = true;
    c.scram.auth_file = Some(auth_file.to_path_buf());
    c.scram.mock_secret = Some(SecretSource::File(secret.to_path_buf()));
}

const WHO: &str =
    "SELECT current_user || ' ' || (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_terminated_on_both_legs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &[
            "hostssl all all 127.0.0.1/32 scram-sha-256",
            "hostnossl all all 127.0.0.1/32 scram-sha-256",
        ],
        vec![PgRole::new("alice", "secret"), PgRole::new("bob", "bobpw")],
        false,
    );
    let (auth_file, secret) = scram_files(dir.path(), &pg, &["alice"]);

    let mut c = config(&pki, &pg.address());
    terminating(&mut c, &auth_file, &secret);
    let plain = TestProxy::start(c).await;
    // From a file, as `main` runs it, so that reload() rereads it.
    let extra = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\n[scram]\nterminate = true\nauth_file = \"{}\"\nmock_secret = {{ password_file = \"{}\" }}\n",
        pki.root_cert.display(),
        auth_file.display(),
        secret.display()
    );
    let file = config_file(
        dir.path(),
        &pki.server_chain,
        &pki.server_key,
        &pg.address(),
        &extra,
    );
    let tls = TestProxy::start_from_file(&file).await;

    // Every channel_binding, through both kinds of backend link.
    for (proxy, link_ssl) in [(&plain, "false"), (&tls, "true")] {
        for binding in ["disable", "prefer", "require"] {
            let conn = format!(
                "{} channel_binding={binding}",
                verify_full(proxy.port(), "alice", &pki.root_cert)
            );
            let who = psql(&conn, Some("secret"), WHO).await;
            assert_eq!(
                who.as_deref(),
                Ok(&*format!("alice {link_ssl}")),
                "{binding} via {link_ssl}"
            );
        }
    }
    assert_eq!(
        tls.metric(r#"pgtls_client_logins_total{method="scram-sha-256-plus",result="ok"}"#),
        2.0,
        "prefer and require bound to the proxy's certificate"
    );
    assert_eq!(
        tls.metric(r#"pgtls_backend_logins_total{method="scram-sha-256-plus",result="ok"}"#),
        3.0,
        "and the proxy bound its own login to the backend's"
    );
    assert_eq!(
        plain
            .metric_when(
                r#"pgtls_backend_logins_total{method="scram-sha-256",result="ok"}"#,
                3.0
            )
            .await,
        3.0
    );

    // A wrong password and an unknown user: the same bytes, but the name.
    let wrong = raw_scram(&tls, &pki.root_cert, "alice", "nope").await;
    let unknown = raw_scram(&tls, &pki.root_cert, "carol", "nope").await;
    assert_eq!(wrong.0, unknown.0, "AuthenticationSASL");
    assert_eq!(wrong.1, unknown.1, "server-first shape");
    assert_eq!(wrong.2.replace("alice", "carol"), unknown.2, "the error");
    assert!(wrong.2.contains("C28P01"), "{}", wrong.2);
    assert!(
        wrong
            .2
            .contains("Mpassword authentication failed for user \"alice\""),
        "{}",
        wrong.2
    );
    // bob has a password on the server but no verifier at the proxy.
    let err = psql(
        &verify_full(tls.port(), "bob", &pki.root_cert),
        Some("bobpw"),
        "SELECT 1",
    )
    .await
    .expect_err("no verifier");
    assert!(
        err.contains("password authentication failed for user \"bob\""),
        "{err}"
    );
    for (method, result) in [
        ("scram-sha-256", "invalid_password"),
        ("scram-sha-256", "unknown_user"),
        ("scram-sha-256-plus", "unknown_user"),
    ] {
        let series = format!(r#"pgtls_client_logins_total{{method="{method}",result="{result}"}}"#);
        assert_eq!(tls.metric(&series), 1.0, "{series}");
    }

    // The server's password changed: the proxy stops before a proof.
    let held = tokio_pg(
        &format!(
            "host=localhost port={} user=alice dbname=postgres sslmode=require password=secret",
            tls.port()
        ),
        &pki.root_cert,
    )
    .await
    .expect("a session held across the change");
    pg.psql("ALTER ROLE alice PASSWORD 'secret'");
    let err = psql(
        &verify_full(tls.port(), "alice", &pki.root_cert),
        Some("secret"),
        "SELECT 1",
    )
    .await
    .expect_err("stale verifier");
    assert!(
        err.contains("password authentication failed for user \"alice\""),
        "{err}"
    );
    assert_eq!(
        tls.metric(
            r#"pgtls_client_logins_total{method="scram-sha-256-plus",result="verifier_mismatch"}"#
        ),
        1.0
    );
    assert!(
        !pg.log()
            .contains("password authentication failed for user \"alice\""),
        "the backend never saw a proof"
    );

    // The auth_file reloads: alice's new verifier in, bob added.
    write_file(&auth_file, &userlist(&pg, &["alice", "bob"]), 0o600, false);
    tls.handle().reload().await.expect("reload");
    for (user, pw) in [("alice", "secret"), ("bob", "bobpw")] {
        let who = psql(
            &verify_full(tls.port(), user, &pki.root_cert),
            Some(pw),
            WHO,
        )
        .await;
        assert_eq!(who.as_deref(), Ok(&*format!("{user} true")));
    }
    write_file(&auth_file, &userlist(&pg, &["bob"]), 0o600, false);
    tls.handle().reload().await.expect("reload");
    psql(
        &verify_full(tls.port(), "alice", &pki.root_cert),
        Some("secret"),
        "SELECT 1",
    )
    .await
    .expect_err("alice removed");
    let row = held
        .query_one("SELECT 42", &[])
        .await
        .expect("the held session runs on");
    assert_eq!(row.get::<_, i32>(0), 42);
}

/// Downgrades and malformed SCRAM messages get PostgreSQL's errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_protocol_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &["host all all 127.0.0.1/32 scram-sha-256"],
        vec![PgRole::new("alice", "secret")],
        false,
    );
    let (auth_file, secret) = scram_files(dir.path(), &pg, &["alice"]);
    let mut c = config(&pki, &pg.address());
    terminating(&mut c, &auth_file, &secret);
    let proxy = TestProxy::start(c).await;
    for (mechanism, first, code, text) in [
        (
            "SCRAM-SHA-256",
            &b"y,,n=,r=abcdef"[..],
            "28000",
            "SCRAM channel binding negotiation error",
        ),
        (
            "SCRAM-SHA-256",
            b"p=tls-server-end-point,,n=,r=abc",
            "08P01",
            "malformed SCRAM message",
        ),
        (
            "SCRAM-SHA-256",
            b"garbage",
            "08P01",
            "malformed SCRAM message",
        ),
        (
            "PLAIN",
            b"n,,n=,r=abc",
            "08P01",
            "invalid SASL authentication mechanism",
        ),
        (
            "SCRAM-SHA-256",
            b"n,a=x,n=,r=abc",
            "0A000",
            "authorization identity",
        ),
    ] {
        let mut tls = session(&proxy, &pki.root_cert, "alice").await;
        let (tag, _) = read_message(&mut tls).await.expect("AuthenticationSASL");
        assert_eq!(tag, b'R');
        tls.write_all(&sasl_initial(mechanism, first))
            .await
            .expect("write");
        let (tag, body) = read_message(&mut tls).await.expect("error");
        assert_eq!(
            tag,
            b'E',
            "{mechanism} {:?}",
            String::from_utf8_lossy(first)
        );
        let f = error_fields(&body);
        assert_eq!(
            (f[&'S'].as_str(), f[&'C'].as_str()),
            ("FATAL", code),
            "{f:?}"
        );
        assert!(f[&'M'].contains(text), "{f:?}");
    }
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_client_logins_total{method="scram-sha-256",result="downgrade"}"#,
                1.0
            )
            .await,
        1.0
    );
}

async fn session(
    proxy: &TestProxy,
    root: &Path,
    user: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&SSL_REQUEST).await.expect("ssl");
    let mut s = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut s)
        .await
        .expect("S");
    let mut tls = tls_upgrade(tcp, tls_client(root, &[])).await.expect("TLS");
    tls.write_all(&startup_message(&[
        ("user", user),
        ("database", "postgres"),
    ]))
    .await
    .expect("startup");
    tls
}

fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    let mut m = vec![b'p'];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend(body);
    m
}

/// A SCRAM login by hand (no channel binding): AuthenticationSASL, the
/// server-first-message with its nonce and salt blanked, and the error.
async fn raw_scram(
    proxy: &TestProxy,
    root: &Path,
    user: &str,
    password: &str,
) -> (Vec<u8>, String, String) {
    let mut tls = session(proxy, root, user).await;
    let (_, sasl) = read_message(&mut tls).await.expect("AuthenticationSASL");
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    tls.write_all(&sasl_initial("SCRAM-SHA-256", scram.message()))
        .await
        .expect("first");
    let (tag, body) = read_message(&mut tls).await.expect("continue");
    assert_eq!(tag, b'R');
    let server_first = String::from_utf8_lossy(&body[4..]).to_string();
    scram.update(server_first.as_bytes()).expect("server-first");
    let mut m = vec![b'p'];
    m.extend_from_slice(&((scram.message().len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(scram.message());
    tls.write_all(&m).await.expect("final");
    let (tag, err) = read_message(&mut tls).await.expect("error");
    assert_eq!(tag, b'E');
    let shape: String = server_first
        .split(',')
        .map(|a| format!("{}={}", &a[..1], a.len()))
        .collect::<Vec<_>>()
        .join(",");
    (sasl, shape, String::from_utf8_lossy(&err).to_string())
}

/// Password clients and certificate clients on one listener
/// (`client_auth.mode = "optional"`): the first run SCRAM with the proxy,
/// the second keep their rule's way in (here: relayed to a backend that
/// trusts the role).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_certificate_clients_on_one_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &[
            "host all certuser 127.0.0.1/32 trust",
            "host all all 127.0.0.1/32 scram-sha-256",
        ],
        vec![PgRole::new("alice", "secret"), PgRole::trust("certuser")],
        false,
    );
    let (auth_file, secret) = scram_files(dir.path(), &pg, &["alice"]);
    let mut c = config(&pki, &pg.address());
    terminating(&mut c, &auth_file, &secret);
    crate::common::proxy::mtls(
        &mut c,
        &pki,
        pg_tls_proxy::config::ClientAuthMode::Optional,
        "[[rules]]\nidentity = \"cn\"\nexact = \"certuser\"\nroles = [\"certuser\"]\n",
    );
    let proxy = TestProxy::start(c).await;
    let who = psql(
        &verify_full(proxy.port(), "alice", &pki.root_cert),
        Some("secret"),
        "SELECT current_user",
    )
    .await;
    assert_eq!(who.as_deref(), Ok("alice"));
    let conn = crate::common::client::with_cert(
        &verify_full(proxy.port(), "certuser", &pki.root_cert),
        &pki.issue_client("certuser"),
    );
    assert_eq!(
        psql(&conn, None, "SELECT current_user").await.as_deref(),
        Ok("certuser")
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_client_logins_total{method="scram-sha-256-plus",result="ok"}"#,
                1.0
            )
            .await,
        1.0
    );
    assert_eq!(
        proxy.metric(
            r#"pgtls_role_decisions_total{decision="allowed",identity_kind="cn",reason="allowed"}"#
        ),
        1.0
    );
}

/// SCRAM-PLUS binds to the certificate the connection was served: a
/// route's own (chosen by its server name) or the default one, each hash
/// computed once with its route, never looked up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_plus_binds_to_the_routes_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(crate::common::pg::PgOptions {
        hba: vec!["host all all 127.0.0.1/32 scram-sha-256".into()],
        roles: vec![PgRole::new("alice", "secret")],
        ..Default::default()
    });
    let (auth_file, secret) = scram_files(dir.path(), &pg, &["alice"]);
    let mut c = config(&pki, &pg.address());
    terminating(&mut c, &auth_file, &secret);
    let cert = pki.issue_server("db2.example.test", &["db2.example.test"]);
    c.routes = vec![pg_tls_proxy::config::RouteConfig {
        name: "two".into(),
        server_names: vec!["db2.example.test".into()],
        databases: vec![],
        cert: Some(cert.chain.clone()),
        key: Some(cert.key.clone()),
        cert_dir: None,
        backend: pg_tls_proxy::config::Backend {
            address: pg.address(),
            ..Default::default()
        },
        client_auth: None,
        rules: None,
    }];
    let proxy = TestProxy::start(c).await;
    for host in ["host=db2.example.test hostaddr=127.0.0.1", "host=127.0.0.1"] {
        let conn = format!(
            "{host} port={} user=alice dbname=postgres sslmode=verify-full sslrootcert={} channel_binding=require",
            proxy.port(),
            pki.root_cert.display()
        );
        assert_eq!(
            psql(&conn, Some("secret"), "SELECT current_user")
                .await
                .as_deref(),
            Ok("alice"),
            "{host}"
        );
    }
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_client_logins_total{method="scram-sha-256-plus",result="ok"}"#,
                2.0
            )
            .await,
        2.0
    );
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_route_sessions_total{route="two",selected_by="server_name"}"#,
                1.0
            )
            .await,
        1.0
    );
}
