//! Configuration errors name the key and the file, and the binary exits 64
//! before binding any port; PGTLS_ environment variables override the file.

use std::process::Command;

use crate::common::pki::{ClientCertOpts, Pki};
use crate::common::{free_port, write_file};

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pg-tls-proxy"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_exit_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let port = free_port();
    let good = format!(
        "[listen]\naddress = \"127.0.0.1:{port}\"\n[admin]\naddress = \"127.0.0.1:0\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.server_chain.display(),
        pki.server_key.display()
    );
    let path = |name: &str| dir.path().join(name);

    // Valid: check prints a summary; the environment overrides the file.
    let file = write_file(&path("good.toml"), &good, 0o644, false);
    let f = file.to_str().expect("utf-8 path");
    let (code, out, err) = run(
        &["check", "--config", f],
        &[("PGTLS_BACKEND__ADDRESS", "10.1.2.3:5433")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.1.2.3:5433"), "{out}");
    assert!(out.contains("tls.cert expires in"), "{out}");

    // Unknown key: named, with the file.
    let file = write_file(
        &path("typo.toml"),
        &format!("{good}[backend]\nadress = \"x\"\n"),
        0o644,
        false,
    );
    let (code, _, err) = run(&["--config", file.to_str().expect("path")], &[]);
    assert_eq!(code, 64);
    assert!(
        err.contains("adress") && err.contains("backend") && err.contains("typo.toml"),
        "{err}"
    );

    // A key that does not match the certificate.
    let other = pki.issue_client("someone");
    let bad = good.replace(
        &pki.server_key.display().to_string(),
        &other.key.display().to_string(),
    );
    let file = write_file(&path("mismatch.toml"), &bad, 0o644, false);
    let (code, _, err) = run(&["--config", file.to_str().expect("path")], &[]);
    assert_eq!(code, 64);
    assert!(
        err.contains("tls.key") && err.contains("does not match"),
        "{err}"
    );
    assert!(!err.contains("listening"));

    // An expired certificate.
    let expired = pki.issue_client_with(ClientCertOpts {
        cn: "localhost".into(),
        not_before: Some(std::time::SystemTime::now() - std::time::Duration::from_secs(864_000)),
        not_after: Some(std::time::SystemTime::now() - std::time::Duration::from_secs(86_400)),
        ..Default::default()
    });
    let bad = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        expired.chain.display(),
        expired.key.display()
    );
    let file = write_file(&path("expired.toml"), &bad, 0o644, false);
    let (code, _, err) = run(&["check", "--config", file.to_str().expect("path")], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("tls.cert") && err.contains("expired"), "{err}");

    // A missing file is an error, not silently the defaults.
    let (code, _, err) = run(
        &["check", "--config", "/nonexistent/pg-tls-proxy.toml"],
        &[],
    );
    assert_eq!(code, 64);
    assert!(err.contains("/nonexistent/pg-tls-proxy.toml"), "{err}");

    // `check` with the good file and one variable set: exit 64, stderr.
    let with_env = |var: &str, value: &str| {
        let (code, _, err) = run(&["check", "--config", f], &[(var, value)]);
        assert_eq!(code, 64, "{var}={value}: {err}");
        err
    };
    // A bad environment value names the variable as it was set.
    let err = with_env("PGTLS_LIMITS__HANDSHAKE_TIMEOUT", "soon");
    assert!(err.contains("PGTLS_LIMITS__HANDSHAKE_TIMEOUT"), "{err}");
    // An unknown table is named by the variable set under it.
    let err = with_env("PGTLS_BOGUS__KEY", "1");
    assert!(err.contains("PGTLS_BOGUS__KEY"), "{err}");

    // A value out of range from the environment blames the variable, not
    // the file; from the file, the file.
    let err = with_env("PGTLS_LISTEN__WORKERS", "999");
    assert!(
        err.contains("listen.workers")
            && err.contains("from environment variable PGTLS_LISTEN__WORKERS")
            && !err.contains("good.toml"),
        "{err}"
    );
    // A key that another one requires, set nowhere: where it may be set.
    let err = with_env("PGTLS_BACKEND__SSLMODE", "verify-full");
    assert!(
        err.contains("backend.sslrootcert")
            && err.contains("not set: set it in")
            && err.contains("or as PGTLS_BACKEND__SSLROOTCERT"),
        "{err}"
    );
    let file = write_file(
        &path("workers.toml"),
        &good.replace("[listen]\n", "[listen]\nworkers = 999\n"),
        0o644,
        false,
    );
    let (code, _, err) = run(&["check", "--config", file.to_str().expect("path")], &[]);
    assert_eq!(code, 64);
    assert!(
        err.contains("listen.workers") && err.contains("workers.toml"),
        "{err}"
    );
}

/// A descriptor limit too low for even one session stops the start (69),
/// instead of a proxy that accepts nothing.
#[test]
fn no_room_for_a_session_exits_69() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(dir.path());
    let config = write_file(
        &dir.path().join("proxy.toml"),
        &format!(
            "[listen]\naddress = \"127.0.0.1:{}\"\n[admin]\nenabled = false\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            free_port(),
            pki.server_chain.display(),
            pki.server_key.display()
        ),
        0o644,
        false,
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec '{}' check --config '{}'",
            env!("CARGO_BIN_EXE_pg-tls-proxy"),
            config.display()
        ))
        .output()
        .expect("run binary");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("RLIMIT_NOFILE is 64") && err.contains("no room for a single session"),
        "{err}"
    );
}
