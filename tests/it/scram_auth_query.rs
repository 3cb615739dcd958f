//! `[scram.auth_query]`: verifiers looked up in PostgreSQL through the
//! SECURITY DEFINER function README recommends, on a dedicated verify-full
//! link as a low-privilege role; NOLOGIN and expired roles get nothing; hits
//! and misses are cached, and a verifier the server no longer agrees with
//! is dropped from the cache.

use std::time::Duration;

use crate::common::client::{psql, verify_full};
use crate::common::pg::PgRole;
use crate::common::pki::Pki;
use crate::common::proxy::{backend_tls, config, TestProxy};
use crate::common::{tls_cluster, write_file};
use pg_tls_proxy::config::{AuthQuery, SecretSource, SslMode};

/// The function README recommends, verbatim.
const LOOKUP: &str = r#"
CREATE SCHEMA pgtls;
CREATE FUNCTION pgtls.lookup(p_user text, OUT username text, OUT verifier text)
RETURNS record LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp AS $$
  SELECT a.rolname::text,
         CASE WHEN a.rolcanlogin
                   AND (a.rolvaliduntil IS NULL OR a.rolvaliduntil > pg_catalog.now())
              THEN a.rolpassword END
  FROM pg_catalog.pg_authid a WHERE a.rolname = p_user
$$;
REVOKE ALL ON FUNCTION pgtls.lookup(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgtls TO pgtls_auth;
GRANT EXECUTE ON FUNCTION pgtls.lookup(text) TO pgtls_auth;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_with_security_definer_function() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = tls_cluster(
        &pki,
        &["hostssl all all 127.0.0.1/32 scram-sha-256"],
        vec![
            PgRole::new("alice", "secret"),
            PgRole::new("pgtls_auth", "authpw"),
            PgRole::new("old", "oldpw"),
        ],
        false,
    );
    pg.psql(LOOKUP);
    pg.psql("ALTER ROLE old VALID UNTIL '2001-01-01'");
    pg.psql("CREATE ROLE nolog NOLOGIN PASSWORD 'nopw'");
    let secret = write_file(&dir.path().join("authpw"), "authpw\n", 0o600, false);
    let mut c = config(&pki, &pg.address());
    backend_tls(&mut c, SslMode::VerifyFull, Some(pki.root_cert.clone()));
    c.scram.terminate = true;
    c.scram.auth_query = Some(AuthQuery {
        user: "pgtls_auth".into(),
        password: Some(SecretSource::File(secret)),
        query: "SELECT username, verifier FROM pgtls.lookup($1)".into(),
        cache_ttl: Duration::from_secs(300),
        // Long enough that the second phantom login below (a failed login,
        // CREATE ROLE, another psql) lands within it on a busy machine.
        miss_ttl: Duration::from_secs(6),
        ..AuthQuery::default()
    });
    let proxy = TestProxy::start(c).await;
    let login = |user: &'static str, pw: &'static str| {
        let conn = verify_full(proxy.port(), user, &pki.root_cert);
        async move { psql(&conn, Some(pw), "SELECT current_user").await }
    };

    assert_eq!(login("alice", "secret").await.as_deref(), Ok("alice"));
    assert_eq!(login("alice", "secret").await.as_deref(), Ok("alice"));
    assert_eq!(
        proxy
            .metric_when(r#"pgtls_auth_query_total{result="miss"}"#, 1.0)
            .await,
        1.0
    );
    assert_eq!(proxy.metric(r#"pgtls_auth_query_total{result="hit"}"#), 1.0);
    // The lookup ran as its own role, on its own TLS link.
    let link = pg.psql(
        "SELECT usename || ' ' || s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE application_name = 'pg-tls-proxy auth_query'",
    );
    assert_eq!(link.trim(), "pgtls_auth true");

    // Expired, NOLOGIN and unknown roles: the same refusal as a wrong password.
    for (user, pw) in [
        ("old", "oldpw"),
        ("nolog", "nopw"),
        ("ghost", "x"),
        ("alice", "wrong"),
    ] {
        let err = login(user, pw).await.expect_err(user);
        assert!(
            err.contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{err}"
        );
    }

    // The password changes on the server: the cached verifier is refused
    // by the backend before a proof, dropped, and the next login finds
    // the new one.
    pg.psql("ALTER ROLE alice PASSWORD 'changed'");
    login("alice", "secret")
        .await
        .expect_err("stale cached verifier");
    assert_eq!(
        proxy
            .metric_when(
                r#"pgtls_client_logins_total{method="scram-sha-256-plus",result="verifier_mismatch"}"#,
                1.0
            )
            .await,
        1.0
    );
    assert_eq!(login("alice", "changed").await.as_deref(), Ok("alice"));

    // "No such user" is remembered for miss_ttl, then looked up again.
    login("phantom", "boo").await.expect_err("no such role yet");
    pg.psql("CREATE ROLE phantom LOGIN PASSWORD 'boo'");
    login("phantom", "boo")
        .await
        .expect_err("the miss is still cached");
    tokio::time::sleep(Duration::from_millis(6200)).await;
    assert_eq!(login("phantom", "boo").await.as_deref(), Ok("phantom"));
    assert_eq!(
        proxy.metric(r#"pgtls_auth_query_total{result="error"}"#),
        0.0
    );
}
