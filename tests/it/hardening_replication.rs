//! The `replication` startup parameter is read exactly as PostgreSQL reads
//! it: every spelling `parse_bool` accepts (`t`, `y`, `TRU`, `ye`, `on`,
//! `1`, ...) starts a physical walsender, which pg_hba and our rules check
//! as database "replication"; `database` starts a logical walsender on its
//! database. A rule allows neither unless it says `replication = ...`.
//! Before this was fixed, `replication=t` passed a rule limited to
//! `databases = ["bench"]` and opened a walsender.

use crate::common;
use crate::common::client::{
    error_fields, psql, read_until_ready, startup_message, verify_full, with_cert,
};
use crate::common::pg::{PgCluster, PgOptions, PgRole};
use crate::common::pki::{CertFiles, Pki};
use crate::common::proxy::{config, mtls, TestProxy};
use pg_tls_proxy::config::ClientAuthMode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const RULES: &str = r#"
[[rules]]
identity = "cn"
exact = "bench-app"
roles = ["repl"]
databases = ["bench"]

[[rules]]
identity = "cn"
exact = "standby"
roles = ["repl"]
databases = ["replication"]
replication = "physical"

[[rules]]
identity = "cn"
exact = "decoder"
roles = ["repl"]
databases = ["bench"]
replication = "logical"
"#;

/// A raw mTLS session: the startup's answer up to ReadyForQuery or the
/// error, as (tag, body) messages.
async fn startup_with(
    proxy: &TestProxy,
    pki: &Pki,
    cert: &CertFiles,
    params: &[(&str, &str)],
) -> Vec<(u8, Vec<u8>)> {
    let mut tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tcp.write_all(&common::client::SSL_REQUEST)
        .await
        .expect("ssl");
    let mut s = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut s)
        .await
        .expect("S");
    let config = common::client::mtls_client(&pki.root_cert, cert);
    let mut tls = common::client::tls_upgrade(tcp, config).await.expect("TLS");
    tls.write_all(&startup_message(params))
        .await
        .expect("startup");
    read_until_ready(&mut tls).await.expect("answer")
}

fn fatal(msgs: &[(u8, Vec<u8>)]) -> (String, String) {
    assert_eq!(msgs.len(), 1, "only an error: {msgs:?}");
    assert_eq!(msgs[0].0, b'E');
    let f = error_fields(&msgs[0].1);
    assert_eq!(f[&'S'], "FATAL");
    (f[&'C'].clone(), f[&'M'].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_spellings_cannot_bypass_database_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::start(PgOptions {
        hba: vec![
            "host replication repl 127.0.0.1/32 trust".into(),
            "host all all 127.0.0.1/32 trust".into(),
        ],
        roles: vec![PgRole {
            superuser: true,
            ..PgRole::trust("repl")
        }],
        ..Default::default()
    });
    pg.psql("CREATE DATABASE bench");
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    let proxy = TestProxy::start(c).await;
    let bench_app = pki.issue_client("bench-app");

    // An ordinary session on the allowed database works.
    let ok = startup_with(
        &proxy,
        &pki,
        &bench_app,
        &[("user", "repl"), ("database", "bench")],
    )
    .await;
    assert_eq!(ok.last().map(|m| m.0), Some(b'Z'), "{ok:?}");

    // Every parse_bool spelling of true is a physical walsender: checked as
    // database "replication", which this rule does not list.
    for v in ["t", "tr", "TRU", "true", "y", "ye", "YES", "on", "On", "1"] {
        let msgs = startup_with(
            &proxy,
            &pki,
            &bench_app,
            &[("user", "repl"), ("database", "bench"), ("replication", v)],
        )
        .await;
        let (code, message) = fatal(&msgs);
        assert_eq!(code, "28000", "replication={v}");
        assert_eq!(
            message,
            r#"certificate "bench-app" is not allowed to connect to database "replication" as role "repl""#,
            "replication={v}"
        );
    }
    // Logical walsender on the allowed database: the rule does not name
    // replication.
    let msgs = startup_with(
        &proxy,
        &pki,
        &bench_app,
        &[
            ("user", "repl"),
            ("database", "bench"),
            ("replication", "database"),
        ],
    )
    .await;
    assert_eq!(
        fatal(&msgs),
        (
            "28000".to_string(),
            r#"certificate "bench-app" is not allowed to start a replication connection as role "repl""#
                .to_string()
        )
    );
    // Spellings of false are ordinary sessions.
    for v in ["f", "of", "OFF", "no", "0"] {
        let msgs = startup_with(
            &proxy,
            &pki,
            &bench_app,
            &[("user", "repl"), ("database", "bench"), ("replication", v)],
        )
        .await;
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "replication={v}");
    }
    // What PostgreSQL refuses, the proxy refuses with PostgreSQL's words.
    let msgs = startup_with(
        &proxy,
        &pki,
        &bench_app,
        &[
            ("user", "repl"),
            ("database", "bench"),
            ("replication", "o"),
        ],
    )
    .await;
    assert_eq!(
        fatal(&msgs),
        (
            "22023".to_string(),
            r#"invalid value for parameter "replication": "o""#.to_string()
        )
    );
    assert!(
        !pg.log().contains("replication connection authorized"),
        "no walsender was started so far"
    );

    // Rules that name replication allow it, on real walsenders.
    let conn = |cert: &CertFiles, extra: &str| {
        with_cert(
            &format!(
                "{} {extra}",
                verify_full(proxy.port(), "repl", &pki.root_cert)
            ),
            cert,
        )
    };
    let standby = pki.issue_client("standby");
    let out = psql(&conn(&standby, "replication=true"), None, "IDENTIFY_SYSTEM")
        .await
        .expect("physical walsender through a rule that allows it");
    assert!(out.contains('|'), "IDENTIFY_SYSTEM row: {out}");
    let decoder = pki.issue_client("decoder");
    let out = psql(
        &conn(&decoder, "replication=database").replace("dbname=postgres", "dbname=bench"),
        None,
        "IDENTIFY_SYSTEM",
    )
    .await
    .expect("logical walsender through a rule that allows it");
    assert!(
        out.ends_with("|bench"),
        "IDENTIFY_SYSTEM names the database: {out}"
    );
    // ...and only the kind they name.
    let err = psql(&conn(&decoder, "replication=yes"), None, "IDENTIFY_SYSTEM")
        .await
        .expect_err("physical with the logical rule");
    assert!(
        err.contains("is not allowed to connect to database \"replication\""),
        "{err}"
    );
}
