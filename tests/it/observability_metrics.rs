//! /metrics after real sessions: successes and each kind of refusal move
//! exactly the counters they should; histograms count; certificate expiry
//! gauges equal the certificates' not-after; promtool finds nothing wrong.

use std::process::{Command, Stdio};

use crate::common::client::{http, psql, tls_client, tls_upgrade, verify_full, with_cert};
use crate::common::free_port;
use crate::common::pg::PgCluster;
use crate::common::pki::{ClientCertOpts, Pki};
use crate::common::proxy::{config, mtls, TestProxy};
use pg_tls_proxy::config::ClientAuthMode;
use tokio::net::TcpStream;

const RULES: &str = r#"
[[rules]]
identity = "cn"
exact = "alice"
roles = ["alice"]
"#;

fn not_after(cert: &std::path::Path) -> i64 {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
        .arg(cert)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let date = text.trim().trim_start_matches("notAfter=").to_string();
    let out = Command::new("date")
        .args(["-u", "-d", &date, "+%s"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("epoch seconds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_real_sessions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let pg = PgCluster::with_trust_roles(&["alice"]);
    let mut c = config(&pki, &pg.address());
    mtls(&mut c, &pki, ClientAuthMode::Required, RULES);
    let proxy = TestProxy::start(c).await;
    let base = verify_full(proxy.port(), "alice", &pki.root_cert);

    // One success.
    let alice = pki.issue_client("alice");
    assert_eq!(
        psql(&with_cert(&base, &alice), None, "SELECT 1")
            .await
            .expect("success"),
        "1"
    );
    // Plaintext refused.
    let plain = format!(
        "host=127.0.0.1 port={} user=alice dbname=postgres sslmode=disable",
        proxy.port()
    );
    psql(&plain, None, "SELECT 1").await.expect_err("plaintext");
    // Wrong CA.
    let other = Pki::generate_named(&dir.path().join("other"), "other");
    psql(
        &with_cert(&base, &other.issue_client("alice")),
        None,
        "SELECT 1",
    )
    .await
    .expect_err("wrong CA");
    // Expired.
    let now = std::time::SystemTime::now();
    let expired = pki.issue_client_with(ClientCertOpts {
        cn: "alice".into(),
        not_before: Some(now - std::time::Duration::from_secs(864_000)),
        not_after: Some(now - std::time::Duration::from_secs(86_400)),
        ..Default::default()
    });
    psql(&with_cert(&base, &expired), None, "SELECT 1")
        .await
        .expect_err("expired");
    // Direct TLS without ALPN.
    let tcp = TcpStream::connect(proxy.addr).await.expect("connect");
    tls_upgrade(tcp, tls_client(&pki.root_cert, &[]))
        .await
        .expect_err("no ALPN");
    // Denied role.
    let bob = verify_full(proxy.port(), "bob", &pki.root_cert);
    psql(&with_cert(&bob, &alice), None, "SELECT 1")
        .await
        .expect_err("denied");

    // Backend down, on a second proxy.
    let dead_port = free_port();
    let mut c = config(&pki, &format!("127.0.0.1:{dead_port}"));
    c.admin.unready_after_backend_failures = 1;
    let down = TestProxy::start(c).await;
    assert_eq!(
        http("GET", &format!("{}/ready", down.admin_url())).await.0,
        200
    );
    psql(
        &verify_full(down.port(), "alice", &pki.root_cert),
        None,
        "SELECT 1",
    )
    .await
    .expect_err("backend down");
    let (status, body) = http("GET", &format!("{}/ready", down.admin_url())).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("backend unreachable"), "{body}");
    let (_, down_metrics) = http("GET", &format!("{}/metrics", down.admin_url())).await;
    assert!(down_metrics
        .contains("pgtls_backend_connects_total{result=\"connect\",sslmode=\"disable\"} 1"));

    // Each session settles its counters on its own thread, a moment after
    // its client saw the end.
    proxy
        .metric_when(r#"pgtls_connections_closed_total{reason="error"}"#, 5.0)
        .await;
    proxy
        .metric_when(
            r#"pgtls_connections_closed_total{reason="client_eof"}"#,
            1.0,
        )
        .await;
    proxy.metric_when("pgtls_connections_active", 0.0).await;
    let (status, body) = http("GET", &format!("{}/metrics", proxy.admin_url())).await;
    assert_eq!(status, 200);
    let has = |line: &str| {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in\n{body}"
        )
    };
    has("pgtls_connections_accepted_total 6");
    has("pgtls_connections_active 0");
    has(r#"pgtls_negotiations_total{path="sslrequest"} 4"#);
    has(r#"pgtls_negotiations_total{path="direct_tls"} 1"#);
    has(r#"pgtls_negotiations_total{path="plaintext_rejected"} 1"#);
    has(r#"pgtls_tls_handshake_failures_total{reason="unknown_ca"} 1"#);
    has(r#"pgtls_tls_handshake_failures_total{reason="expired"} 1"#);
    has(r#"pgtls_tls_handshake_failures_total{reason="alpn_mismatch"} 1"#);
    has(r#"pgtls_tls_handshake_failures_total{reason="no_client_cert"} 0"#);
    has(r#"pgtls_role_decisions_total{decision="allowed",identity_kind="cn",reason="allowed"} 1"#);
    has(
        r#"pgtls_role_decisions_total{decision="denied",identity_kind="cn",reason="role_not_allowed"} 1"#,
    );
    has(r#"pgtls_backend_connects_total{result="ok",sslmode="disable"} 1"#);
    has(r#"pgtls_tls_handshake_duration_seconds_count{path="sslrequest",version="TLSv1.3"} 2"#);
    has("pgtls_session_duration_seconds_count 1");
    has(r#"pgtls_tls_handshakes_total{resumed="false"} 2"#);
    has(r#"pgtls_connections_closed_total{reason="error"} 5"#);
    has(r#"pgtls_connections_closed_total{reason="client_eof"} 1"#);
    has("pgtls_ready 1");
    assert!(
        body.contains("pgtls_build_info{rustls_version=\"0.23."),
        "{body}"
    );

    // Certificate expiry gauges equal the certificates' not-after.
    let leaf = not_after(&pki.server_leaf);
    let line = body
        .lines()
        .find(|l| l.starts_with(r#"pgtls_certificate_not_after_timestamp_seconds{role="server",route="default",subject="CN=localhost"#))
        .expect("server certificate gauge");
    let value: f64 = line
        .rsplit_once(' ')
        .expect("value")
        .1
        .parse()
        .expect("number");
    assert_eq!(value as i64, leaf, "{line}");
    let root = not_after(&pki.root_cert);
    assert!(
        body.lines().any(|l| l
            .starts_with(r#"pgtls_certificate_not_after_timestamp_seconds{role="client_ca""#)
            && l.ends_with(&format!(" {root}"))),
        "client CA gauge = {root}\n{body}"
    );

    // promtool agrees the exposition is clean.
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(body.as_bytes())
                .expect("write");
            let out = child.wait_with_output().expect("promtool");
            let said = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && said.trim().is_empty(),
                "promtool: {said}"
            );
        }
        Err(e) if std::env::var_os("CI").is_some() => panic!("promtool is required in CI: {e}"),
        Err(e) => eprintln!(
            "promtool not installed ({e}); `apt-get install prometheus` to run this check"
        ),
    }

    // Every metric the shipped alerts and dashboard use exists.
    for file in ["examples/alerts.yml", "examples/grafana-dashboard.json"] {
        let text =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
                .expect("example");
        for name in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(family) = name.strip_prefix("pgtls_") {
                let family = family.trim_end_matches("_bucket");
                assert!(
                    body.contains(&format!("# HELP pgtls_{family} ")),
                    "{file} uses unknown metric {name}"
                );
            }
        }
    }

    // /live, /ready, unknown paths.
    assert_eq!(
        http("GET", &format!("{}/live", proxy.admin_url())).await.0,
        200
    );
    assert_eq!(
        http("GET", &format!("{}/ready", proxy.admin_url())).await.0,
        200
    );
    assert_eq!(
        http("GET", &format!("{}/nope", proxy.admin_url())).await.0,
        404
    );
    assert_eq!(
        http("POST", &format!("{}/metrics", proxy.admin_url()))
            .await
            .0,
        405
    );
}
