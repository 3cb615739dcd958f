//! Routes with their own backend link and client certificates, and routes
//! added by a reload: one route reaches a PostgreSQL that wants TLS
//! verify-full and the proxy's client certificate, another a plaintext
//! one; a route with its own `client_auth` wants a client certificate and
//! cannot be reached without its server name; reloads that add and remove
//! routes while pgbench (a new TLS connection per transaction) runs
//! through another lose no transaction.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::client::{psql, with_cert};
use crate::common::pg::{PgCluster, PgOptions, PgRole, PgSsl};
use crate::common::pki::Pki;
use crate::common::proxy::{config_file, TestProxy};
use crate::common::{clear_pg_env, pg_bin, write_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_backend_tls_client_auth_and_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(&dir.path().join("pki"));
    let backend_cert = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    let secure = PgCluster::start(PgOptions {
        ssl: Some(PgSsl {
            cert: backend_cert.chain.clone(),
            key: backend_cert.key.clone(),
            ca: Some(pki.root_cert.clone()),
        }),
        // Only TLS links that present a certificate for their role.
        hba: vec!["hostssl all bob 127.0.0.1/32 trust clientcert=verify-full".into()],
        roles: vec![PgRole::trust("bob")],
        ..Default::default()
    });
    let plain = PgCluster::with_trust_roles(&["bob"]);
    let proxy_cert = pki.issue_client("bob");
    let client_cert = pki.issue_client("bob");
    let names = [
        ("secure", "secure.example.test"),
        ("plain", "plain.example.test"),
        ("mtls", "mtls.example.test"),
        ("added", "added.example.test"),
    ];
    let mut certs = std::collections::HashMap::new();
    for (route, name) in names {
        certs.insert(route, pki.issue_server(name, &[name]));
    }
    let route_toml = |route: &str, backend: &str| {
        let c = &certs[route];
        format!(
            "[[routes]]\nname = \"{route}\"\nserver_names = [\"{route}.example.test\"]\ncert = \"{}\"\nkey = \"{}\"\n[routes.backend]\naddress = \"{backend}\"\n",
            c.chain.display(),
            c.key.display()
        )
    };
    let secure_route = format!(
        "{}sslmode = \"verify-full\"\nsslrootcert = \"{}\"\nserver_name = \"localhost\"\nsslcert = \"{}\"\nsslkey = \"{}\"\nsslcert_scope = \"all\"\n",
        route_toml("secure", &secure.address()),
        pki.root_cert.display(),
        proxy_cert.chain.display(),
        proxy_cert.key.display()
    );
    let mtls_route = format!(
        "{}[routes.client_auth]\nmode = \"required\"\nca = \"{}\"\n[[routes.rules]]\nidentity = \"cn\"\nexact = \"bob\"\nroles = [\"bob\"]\n",
        route_toml("mtls", &plain.address()),
        pki.root_cert.display()
    );
    let routes = format!(
        "{secure_route}{}{mtls_route}",
        route_toml("plain", &plain.address())
    );
    let file = config_file(
        dir.path(),
        &pki.server_chain,
        &pki.server_key,
        &plain.address(),
        &routes,
    );
    let proxy = TestProxy::start_from_file(&file).await;
    let root = pki.root_cert.display().to_string();
    let via = |host: &str| {
        format!(
            "host={host} hostaddr=127.0.0.1 port={} user=bob dbname=postgres sslmode=verify-full sslrootcert={root}",
            proxy.port()
        )
    };
    let link = "SELECT current_setting('port') || ' ' || ssl::text || ' ' || coalesce(client_dn, '-') FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // Per-route backend TLS: verify-full with the proxy's certificate, and plaintext.
    assert_eq!(
        psql(&via("secure.example.test"), None, link).await,
        Ok(format!("{} true /CN=bob", secure.port()))
    );
    assert_eq!(
        psql(&via("plain.example.test"), None, link).await,
        Ok(format!("{} false -", plain.port()))
    );

    // A route with its own client_auth: a certificate is required, and the
    // route cannot be named from a connection without its server name.
    let err = psql(&via("mtls.example.test"), None, "SELECT 1")
        .await
        .expect_err("no certificate");
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(
        psql(
            &with_cert(&via("mtls.example.test"), &client_cert),
            None,
            "SELECT current_user"
        )
        .await,
        Ok("bob".into())
    );
    let by_ip = format!(
        "host=127.0.0.1 port={} user=bob dbname=postgres sslmode=verify-full sslrootcert={root} options='-c pgtls.route=mtls'",
        proxy.port()
    );
    let err = psql(&by_ip, None, "SELECT 1")
        .await
        .expect_err("needs its server name");
    assert!(
        err.contains("can only be reached by its server name"),
        "{err}"
    );

    // A reload adds a route while pgbench runs through another.
    let script = write_file(&dir.path().join("select1.sql"), "SELECT 1;\n", 0o644, false);
    let mut bench = Command::new(pg_bin("pgbench"));
    clear_pg_env(&mut bench)
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &pki.root_cert)
        .env("PGHOSTADDR", "127.0.0.1")
        .args([
            "-h",
            "plain.example.test",
            "-p",
            &proxy.port().to_string(),
            "-U",
            "bob",
        ])
        .args(["-n", "-C", "-T", "6", "-c", "2", "-j", "2", "-f"])
        .arg(&script)
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let bench = bench.spawn().expect("pgbench");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Before the reload the name is unknown: the default route, whose
    // certificate does not carry it.
    let before = psql(
        &via("added.example.test").replace("verify-full", "verify-ca"),
        None,
        "SELECT current_setting('port')",
    )
    .await;
    assert_eq!(before, Ok(plain.port().to_string()));
    let more = format!("{routes}{}", route_toml("added", &secure.address())).replace(
        "[[routes]]\nname = \"added\"",
        "[[routes]]\nname = \"added\"",
    );
    let added = format!(
        "{more}sslmode = \"verify-full\"\nsslrootcert = \"{}\"\nserver_name = \"localhost\"\nsslcert = \"{}\"\nsslkey = \"{}\"\nsslcert_scope = \"all\"\n",
        pki.root_cert.display(),
        proxy_cert.chain.display(),
        proxy_cert.key.display()
    );
    config_file(
        dir.path(),
        &pki.server_chain,
        &pki.server_key,
        &plain.address(),
        &added,
    );
    proxy.handle().reload().await.expect("reload adds a route");
    assert_eq!(
        psql(&via("added.example.test"), None, link).await,
        Ok(format!("{} true /CN=bob", secure.port())),
        "the new route serves at once"
    );
    // Removing a route: its name falls back to the default route (another
    // certificate, no client certificate asked for).
    let without_mtls = added.replace(&mtls_route, "");
    config_file(
        dir.path(),
        &pki.server_chain,
        &pki.server_key,
        &plain.address(),
        &without_mtls,
    );
    proxy
        .handle()
        .reload()
        .await
        .expect("reload removes a route");
    assert_eq!(
        psql(
            &via("mtls.example.test").replace("verify-full", "verify-ca"),
            None,
            "SELECT current_setting('port')"
        )
        .await,
        Ok(plain.port().to_string()),
        "no route by that name any more"
    );
    let out = tokio::task::spawn_blocking(move || bench.wait_with_output())
        .await
        .expect("join")
        .expect("pgbench");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("0");
    assert_eq!(failed, "0", "{text}");
    assert!(
        text.contains("number of transactions actually processed"),
        "{text}"
    );
}
