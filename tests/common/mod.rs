//! Shared integration-test harness for pg-tls-proxy.
//!
//! - [`pki`]: a throwaway root/intermediate CA with server and client leaves and CRLs.
//! - [`pg`]: throwaway PostgreSQL clusters (initdb + pg_ctl), optionally with TLS.
//! - [`proxy`]: the proxy run in-process on port 0, as `main` runs it.
//! - [`client`]: real clients (psql, tokio-postgres) and raw-socket probes.
//!
//! Everything here is blocking std code that panics with context on failure;
//! from async tests call it through `tokio::task::spawn_blocking` if the
//! runtime must not be blocked.

// Each test binary compiles this module separately and uses only a subset.
#![allow(dead_code)]

pub mod client;
pub mod pg;
pub mod pki;
pub mod proxy;

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process may grab it in
/// between; callers that bind it later should retry on "address in use"
/// (as [`pg::PgCluster::start`] does).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of probe listener")
        .port()
}

/// Writes `contents` to `path` (create or truncate or append) and sets exactly
/// `mode`, independent of the umask. Returns `path` for convenience.
pub fn write_file(path: &Path, contents: &str, mode: u32, append: bool) -> PathBuf {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path:?} for writing: {e}"));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    set_mode(path, mode);
    path.to_path_buf()
}

/// chmod that panics with context.
pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {path:?}: {e}"));
}

/// Removes inherited `PG*` variables (PGHOST, PGPORT, PGSSLMODE, ...) so a
/// libpq tool connects exactly where and how its arguments say.
pub fn clear_pg_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Runs `cmd` to completion: `Ok(stdout)` on success, otherwise an error text
/// naming the command line, exit status, stdout and stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    let desc = format!(
        "`{} {}`",
        cmd.get_program().to_string_lossy(),
        args.join(" ")
    );
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {desc}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{desc} failed ({})\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    ))
}

/// Directory of the PostgreSQL binaries: `$PG_BINDIR`, else the highest
/// `/usr/lib/postgresql/<major>/bin`, else `pg_config --bindir`.
pub fn pg_bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PG_BINDIR") {
            return PathBuf::from(dir);
        }
        let majors = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten();
        let newest = majors
            .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
            .filter(|(_, dir)| dir.join("bin/initdb").exists())
            .max_by_key(|(major, _)| *major);
        if let Some((_, dir)) = newest {
            return dir.join("bin");
        }
        let out = run(Command::new("pg_config").arg("--bindir"))
            .unwrap_or_else(|e| panic!("no /usr/lib/postgresql/*/bin/initdb, and {e}"));
        PathBuf::from(out.trim())
    })
}

/// Full path of a PostgreSQL binary such as "psql" or "initdb".
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bindir().join(name)
}

/// Parent of the cluster temp dirs: `$PG_TEST_TMPDIR`, else `/dev/shm` if it
/// is a tmpfs with at least 1 GiB free (initdb takes ~0.45 s there instead
/// of ~1.3 s on disk; Docker's default 64 MB one is too small), else the
/// system temp dir.
pub fn scratch_base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PG_TEST_TMPDIR") {
            return PathBuf::from(dir);
        }
        let df = run(Command::new("df").args(["-k", "--output=avail", "/dev/shm"]));
        let free_kib = df
            .ok()
            .and_then(|out| out.lines().nth(1)?.trim().parse::<u64>().ok());
        match free_kib {
            Some(kib) if kib >= 1 << 20 => PathBuf::from("/dev/shm"),
            _ => std::env::temp_dir(),
        }
    })
}

/// A cluster with `ssl = on`, serving a certificate from `pki` for
/// localhost and 127.0.0.1; with `client_ca`, it also trusts client
/// certificates from `pki` (for pg_hba `cert` and `clientcert=`).
pub fn tls_cluster(
    pki: &pki::Pki,
    hba: &[&str],
    roles: Vec<pg::PgRole>,
    client_ca: bool,
) -> pg::PgCluster {
    let cert = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    pg::PgCluster::start(pg::PgOptions {
        ssl: Some(pg::PgSsl {
            cert: cert.chain,
            key: cert.key,
            ca: client_ca.then(|| pki.root_cert.clone()),
        }),
        hba: hba.iter().map(|l| l.to_string()).collect(),
        roles,
        ..Default::default()
    })
}
