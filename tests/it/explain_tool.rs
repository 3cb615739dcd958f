//! `pg-tls-proxy explain` answers "why was I refused?" for a certificate:
//! identities, chain verification, each rule in order, and the decision.

use std::process::Command;

use crate::common::pki::{ClientCertOpts, Pki};
use crate::common::write_file;

fn explain(config: &std::path::Path, cert: &std::path::Path, user: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
        .args(["explain", "--config"])
        .arg(config)
        .arg("--cert")
        .arg(cert)
        .args(["--user", user, "--database", "app"])
        .output()
        .expect("run explain");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn explain_allowed_and_denied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let shop = pki.issue_server("shop", &["shop.example.test"]);
    let open = pki.issue_server("open", &["open.example.test"]);
    let toml = format!(
        r#"
[tls]
cert = "{chain}"
key = "{key}"
[client_auth]
ca = "{root}"
[[rules]]
identity = "cn"
exact = "alice"
roles = ["alice"]
[[rules]]
identity = "uri"
pattern = 'spiffe://prod/ns/([a-z]+)/sa/([a-z]+)'
roles = ['\2', "readonly"]
databases = ["app"]
[[routes]]
name = "shop"
server_names = ["shop.example.test"]
cert = "{shop_chain}"
key = "{shop_key}"
[routes.backend]
address = "127.0.0.1:1"
[[routes.rules]]
identity = "uri"
exact = "spiffe://prod/ns/shop/sa/web"
roles = ["admin"]
[[routes]]
name = "open"
server_names = ["open.example.test"]
cert = "{open_chain}"
key = "{open_key}"
[routes.backend]
address = "127.0.0.1:1"
[routes.client_auth]
mode = "none"
"#,
        chain = pki.server_chain.display(),
        key = pki.server_key.display(),
        root = pki.root_cert.display(),
        shop_chain = shop.chain.display(),
        shop_key = shop.key.display(),
        open_chain = open.chain.display(),
        open_key = open.key.display()
    );
    let config = write_file(&dir.path().join("proxy.toml"), &toml, 0o644, false);
    let cert = pki.issue_client_with(ClientCertOpts {
        cn: "workload".into(),
        uris: vec!["spiffe://prod/ns/shop/sa/web".into()],
        ..Default::default()
    });

    let (code, text) = explain(&config, &cert.chain, "web");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("uri   spiffe://prod/ns/shop/sa/web"),
        "{text}"
    );
    assert!(
        text.contains("chain: verified against client_auth.ca"),
        "{text}"
    );
    assert!(text.contains("[0] cn exact \"alice\": no match"), "{text}");
    assert!(
        text.contains("match \"spiffe://prod/ns/shop/sa/web\", roles [web, readonly] -> ALLOWS"),
        "{text}"
    );
    assert!(text.contains("decision: ALLOW by rule 1"), "{text}");

    let (code, text) = explain(&config, &cert.chain, "admin");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("role not in this rule"), "{text}");
    assert!(
        text.contains(r#"decision: DENY (role_not_allowed): certificate "spiffe://prod/ns/shop/sa/web" is not allowed to connect as role "admin""#),
        "{text}"
    );

    // A certificate from another CA: the chain is rejected before any rule.
    let other = Pki::generate_named(&dir.path().join("other"), "other");
    let (code, text) = explain(&config, &other.issue_client("alice").chain, "alice");
    assert!(text.contains("chain: REJECTED"), "{text}");
    assert!(
        text.contains("decision: DENY: the certificate does not verify"),
        "{text}"
    );
    assert_eq!(code, 1, "{text}");

    // A route's own rules: what the same certificate may do through it.
    let routed = |route: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
            .args(["explain", "--config"])
            .arg(&config)
            .arg("--cert")
            .arg(&cert.chain)
            .args(["--user", "admin", "--database", "app", "--route", route])
            .output()
            .expect("run explain");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = routed("shop");
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("route shop"), "{text}");
    assert!(text.contains("decision: ALLOW by rule 0"), "{text}");
    let (code, text) = routed("nope");
    assert_eq!(code, 64, "{text}");
    assert!(
        text.contains("no route \"nope\" (routes: default, shop, open)"),
        "{text}"
    );
    // A route that asks for no certificate applies no rule.
    let (code, text) = routed("open");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("client_auth.mode is none, so no rule applies"),
        "{text}"
    );
}
