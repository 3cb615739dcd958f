//! Throwaway PostgreSQL clusters for integration tests.
//!
//! Each [`PgCluster`] is a fresh `initdb` in its own temp dir, listening on
//! 127.0.0.1 at a free port and on a private unix socket. It is stopped (mode
//! immediate) and deleted on drop, also when the test panics, and several
//! can run in parallel.
//!
//! PostgreSQL refuses to run as root, yet tests (and CI) run as root. Then the
//! server-side commands run as the `postgres` system user through `runuser`,
//! and everything the server touches is chowned to it. Client-side `psql`
//! runs as the current user over the unix socket.

use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{clear_pg_env, free_port, pg_bin, run, scratch_base, set_mode, write_file};

/// Server TLS files. They are copied into the data directory (owned by the
/// server user, key mode 0600), so they may live anywhere.
#[derive(Debug, Clone)]
pub struct PgSsl {
    /// Certificate (chain) PEM for `ssl_cert_file`.
    pub cert: PathBuf,
    /// Private key PEM for `ssl_key_file`.
    pub key: PathBuf,
    /// CA bundle for `ssl_ca_file`; needed by hba `cert` / `clientcert=`.
    pub ca: Option<PathBuf>,
}

/// A login role created after startup.
#[derive(Debug, Clone)]
pub struct PgRole {
    pub name: String,
    /// Stored as SCRAM-SHA-256 (`password_encryption` is set accordingly).
    pub password: Option<String>,
    pub superuser: bool,
}

impl PgRole {
    /// A non-superuser login role without a password (trust auth).
    pub fn trust(name: &str) -> PgRole {
        PgRole {
            name: name.to_string(),
            password: None,
            superuser: false,
        }
    }

    /// A non-superuser login role with a password.
    pub fn new(name: &str, password: &str) -> PgRole {
        PgRole {
            name: name.to_string(),
            password: Some(password.to_string()),
            superuser: false,
        }
    }
}

/// What to start. The default is a non-TLS cluster with trust auth.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `ssl = on` with these files when set.
    pub ssl: Option<PgSsl>,
    /// pg_hba.conf lines, after an always-present `local all all trust` (the
    /// harness administers over the unix socket). Empty means
    /// `host all all 127.0.0.1/32 trust`.
    pub hba: Vec<String>,
    /// Applies to superusers too (`superuser_reserved_connections = 0`).
    pub max_connections: u32,
    pub roles: Vec<PgRole>,
    /// postgresql.conf lines appended after the harness's own settings.
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            ssl: None,
            hba: Vec::new(),
            max_connections: 100,
            roles: Vec::new(),
            extra_conf: Vec::new(),
        }
    }
}

/// A running throwaway cluster; stopped and deleted on drop.
pub struct PgCluster {
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    port: u16,
    startup: Duration,
    /// Last field, so the directory is removed after `drop` stopped the server.
    dir: TempDir,
}

impl PgCluster {
    /// initdb, configure, `pg_ctl start`, create roles; panics with the
    /// server log on failure. If the probed port gets taken before the
    /// server binds it, retries with another one (3 attempts in all).
    /// A plaintext cluster, trust auth on 127.0.0.1, with these login roles.
    pub fn with_trust_roles(names: &[&str]) -> PgCluster {
        PgCluster::start(PgOptions {
            roles: names.iter().map(|n| PgRole::trust(n)).collect(),
            ..Default::default()
        })
    }

    pub fn start(opts: PgOptions) -> PgCluster {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("pgtls-")
            .tempdir_in(scratch_base())
            .unwrap_or_else(|e| panic!("create temp dir in {:?}: {e}", scratch_base()));
        set_mode(dir.path(), 0o755); // the server user must traverse it
        let (data, sock) = (dir.path().join("data"), dir.path().join("sock"));
        for (path, mode) in [(&data, 0o700), (&sock, 0o755)] {
            fs::create_dir(path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
            set_mode(path, mode);
            give_to_server(path);
        }
        let log = write_file(&dir.path().join("pg.log"), "", 0o644, false);
        give_to_server(&log);

        let mut initdb = server_cmd("initdb", dir.path());
        initdb.arg("-D").arg(&data);
        initdb.args("-U postgres -A trust --no-sync -E UTF8 --locale=C".split(' '));
        if let Err(e) = run(&mut initdb) {
            panic!("initdb failed: {e}");
        }

        let mut cluster = PgCluster {
            data,
            sock,
            log,
            port: 0,
            startup: Duration::ZERO,
            dir,
        };
        cluster.write_config(&opts);
        for attempt in 1..=3 {
            cluster.port = free_port();
            let port_line = format!("port = {}\n", cluster.port);
            write_file(
                &cluster.data.join("postgresql.conf"),
                &port_line,
                0o600,
                true,
            );
            let log_len = cluster.log().len();
            let mut pg_ctl = server_cmd("pg_ctl", cluster.dir.path());
            pg_ctl.args(["-w", "-t", "30", "-D"]).arg(&cluster.data);
            pg_ctl.arg("-l").arg(&cluster.log).arg("start");
            let Err(e) = run(&mut pg_ctl) else { break };
            let log = cluster.log();
            let new_log = log.get(log_len..).unwrap_or_default();
            if attempt == 3 || !new_log.contains("could not bind") {
                panic!("pg_ctl start failed: {e}\n--- server log ---\n{log}");
            }
            eprintln!("pg harness: port {} was taken, retrying", cluster.port);
        }

        for role in &opts.roles {
            let mut sql = format!("CREATE ROLE {} LOGIN", quote_ident(&role.name));
            if let Some(password) = &role.password {
                sql += &format!(" PASSWORD {}", quote_literal(password));
            }
            if role.superuser {
                sql += " SUPERUSER";
            }
            cluster.psql(&sql);
        }
        cluster.startup = started.elapsed();
        cluster
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// "127.0.0.1:PORT", e.g. for a proxy's upstream setting.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Directory of the server's unix socket (libpq `host=`).
    pub fn socket_dir(&self) -> PathBuf {
        self.sock.clone()
    }

    /// The data directory (owned by the server user).
    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }

    /// Wall time `start` took, initdb and role creation included.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Runs `sql` as superuser `postgres` over the unix socket; returns the
    /// `-At` (unaligned, tuples only) output without the final newline.
    /// Panics with psql's stderr on error.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|e| panic!("psql {sql:?} failed: {e}"))
    }

    /// Like [`psql`](Self::psql), but returns the failure text instead.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(pg_bin("psql"));
        clear_pg_env(&mut cmd).arg("-h").arg(&self.sock);
        cmd.args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ]);
        cmd.args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        run(&mut cmd).map(|out| out.trim_end_matches('\n').to_string())
    }

    /// Waits (up to 10 s) until a backend runs `query` (pg_stat_activity's
    /// `state = 'active'` and that exact text), read over the unix socket.
    /// A test that cancels or drains a running query waits for it here: a
    /// fixed sleep races the query on a busy machine, and a cancel that
    /// arrives before the query does hits an idle backend and proves nothing.
    /// Panics when the query never shows up.
    pub async fn wait_active(&self, query: &str) {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{}'",
            query.replace('\'', "''")
        );
        let (sock, port) = (self.sock.clone(), self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (sock, sql) = (sock.clone(), sql.clone());
            // psql is a child process: off the runtime's threads, so the
            // test's own futures (the query being waited for) keep running.
            let seen = tokio::task::spawn_blocking(move || {
                let mut cmd = Command::new(pg_bin("psql"));
                clear_pg_env(&mut cmd).arg("-h").arg(&sock);
                cmd.args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"]);
                cmd.args(["-X", "-At", "-c", &sql]);
                run(&mut cmd).map(|out| out.trim() != "0")
            })
            .await
            .expect("psql task");
            if seen == Ok(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{query:?} did not show as active in pg_stat_activity within 10 s ({seen:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server log so far; connections and disconnections are logged.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<cannot read {:?}: {e}>", self.log))
    }

    /// Fast shutdown, waiting for it; panics on failure. Idempotent.
    pub fn stop(&mut self) {
        if let Err(e) = self.pg_ctl_stop("fast") {
            panic!(
                "pg_ctl stop failed: {e}\n--- server log ---\n{}",
                self.log()
            );
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        if !self.data.join("postmaster.pid").exists() {
            return Ok(());
        }
        let mut cmd = server_cmd("pg_ctl", self.dir.path());
        cmd.args(["-w", "-t", "30", "-m", mode, "-D"])
            .arg(&self.data)
            .arg("stop");
        run(&mut cmd).map(drop)
    }

    fn write_config(&self, opts: &PgOptions) {
        let q = |p: &Path| quote_literal(&p.to_string_lossy());
        // Durability and background work are pointless for a test cluster.
        let mut conf = format!(
            "
# --- pg-tls-proxy test harness ---
listen_addresses = '127.0.0.1'
unix_socket_directories = {sock}
password_encryption = 'scram-sha-256'
max_connections = {max}
superuser_reserved_connections = 0
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
autovacuum = off
log_connections = on
log_disconnections = on
",
            sock = q(&self.sock),
            max = opts.max_connections,
        );
        if let Some(ssl) = &opts.ssl {
            let cert = q(&self.copy_in(&ssl.cert, "server.crt", 0o644));
            let key = q(&self.copy_in(&ssl.key, "server.key", 0o600));
            conf += &format!("ssl = on\nssl_cert_file = {cert}\nssl_key_file = {key}\n");
            if let Some(ca) = &ssl.ca {
                let ca = q(&self.copy_in(ca, "ca.crt", 0o644));
                conf += &format!("ssl_ca_file = {ca}\n");
            }
        }
        for line in &opts.extra_conf {
            conf += &format!("{line}\n");
        }
        write_file(&self.data.join("postgresql.conf"), &conf, 0o600, true);

        let mut hba = vec!["local all all trust".to_string()];
        if opts.hba.is_empty() {
            hba.push("host all all 127.0.0.1/32 trust".into());
        }
        hba.extend(opts.hba.iter().cloned());
        let hba = format!("{}\n", hba.join("\n"));
        write_file(&self.data.join("pg_hba.conf"), &hba, 0o600, false);
    }

    /// Copies `src` into the data dir as `name`, owned by the server user.
    fn copy_in(&self, src: &Path, name: &str, mode: u32) -> PathBuf {
        let dst = self.data.join(name);
        fs::copy(src, &dst).unwrap_or_else(|e| panic!("copy {src:?} to {dst:?}: {e}"));
        set_mode(&dst, mode);
        give_to_server(&dst);
        dst
    }
}

impl Drop for PgCluster {
    /// Immediate shutdown: a test needs no checkpoint, only a dead server
    /// before its directory goes away. Failure is only reported, since we
    /// may already be unwinding from a panic.
    fn drop(&mut self) {
        if let Err(e) = self.pg_ctl_stop("immediate") {
            eprintln!("pg harness: stopping cluster on port {}: {e}", self.port);
        }
    }
}

/// `(uid, gid)` of `postgres` when we are root and the server must run as
/// that user; `None` when the tests already run as an ordinary user.
fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    let id = |args: &[&str]| -> u32 {
        let out = run(Command::new("id").args(args)).unwrap_or_else(|e| panic!("{e}"));
        let out = out.trim();
        out.parse()
            .unwrap_or_else(|_| panic!("`id {}` printed {out:?}", args.join(" ")))
    };
    *USER.get_or_init(|| {
        (id(&["-u"]) == 0).then(|| (id(&["-u", "postgres"]), id(&["-g", "postgres"])))
    })
}

/// A command for a server-side binary, run as `postgres` when we are root,
/// and in `cwd` because that user may not be able to enter our directory.
fn server_cmd(bin: &str, cwd: &Path) -> Command {
    let mut cmd = match server_user() {
        Some(_) => {
            let mut runuser = Command::new("runuser");
            runuser.args(["-u", "postgres", "--"]).arg(pg_bin(bin));
            runuser
        }
        None => Command::new(pg_bin(bin)),
    };
    clear_pg_env(&mut cmd).current_dir(cwd);
    cmd
}

fn give_to_server(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {path:?} to postgres: {e}"));
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal for SQL and postgresql.conf (both double single quotes).
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
