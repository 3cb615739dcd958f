//! The `pg-tls-proxy` binary: parse the command line, load and validate the
//! configuration (exit 64 before binding anything on error), run the app.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pg_tls_proxy::app::{self, Prepared};
use pg_tls_proxy::config::{Config, LogFormat};
use pg_tls_proxy::protocol::Replication;
use pg_tls_proxy::tls::pem::unix_now;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "pg-tls-proxy",
    version,
    about = "TLS-terminating proxy for PostgreSQL"
)]
struct Cli {
    /// TOML configuration file (also PGTLS_CONFIG).
    #[arg(long, short, env = "PGTLS_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and every file it names, print a summary.
    Check,
    /// Explain what the proxy would decide for a client certificate.
    Explain {
        /// The client certificate (PEM; leaf first, then any intermediates).
        #[arg(long)]
        cert: PathBuf,
        /// The role the client would ask for.
        #[arg(long)]
        user: Option<String>,
        /// The database (default: the user name, as PostgreSQL).
        #[arg(long)]
        database: Option<String>,
        /// The startup's `replication` value, as a client would send it
        /// (`true`, `database`, ...).
        #[arg(long)]
        replication: Option<String>,
    },
    /// Write a throwaway CA, server and client certificates (development only).
    DevCerts {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Server names (DNS or IP); default localhost and 127.0.0.1.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Client certificate common names.
        #[arg(long = "client")]
        clients: Vec<String>,
    },
}

const EX_USAGE: u8 = 64;

/// `println!` that does not panic when stdout is closed (`check | head`,
/// a full disk): reports are best effort, exit codes carry the verdict.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::DevCerts {
            out,
            hosts,
            clients,
        }) => dev_certs(out, hosts, clients),
        Some(Command::Check) => check(cli.config),
        Some(Command::Explain {
            cert,
            user,
            database,
            replication,
        }) => explain(cli.config, cert, user, database, replication),
        None => run(cli.config),
    }
}

fn load(config: Option<PathBuf>, registry: &prometheus::Registry) -> Result<Prepared, ExitCode> {
    let config = Config::load(config.as_deref()).map_err(|e| {
        eprintln!("pg-tls-proxy: configuration error: {e}");
        ExitCode::from(EX_USAGE)
    })?;
    app::prepare(config, registry).map_err(|e| {
        eprintln!("pg-tls-proxy: configuration error: {e}");
        ExitCode::from(e.exit_code() as u8)
    })
}

fn check(config: Option<PathBuf>) -> ExitCode {
    let prepared = match load(config, &prometheus::Registry::new()) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let c = &prepared.config;
    let rt = prepared.runtime();
    out!("configuration OK");
    out!("listen.address      {}", c.listen.address);
    match rt.server_chain.first() {
        Some(leaf) => {
            out!("tls.cert subject    {}", leaf.subject);
            out!("tls.cert issuer     {}", leaf.issuer);
            out!("tls.cert SANs       {}", leaf.sans.join(", "));
            out!(
                "tls.cert chain      {} certificate(s)",
                rt.server_chain.len()
            );
            out!("tls.cert expires in {} days", leaf.days_left(unix_now()));
        }
        None => out!("tls                 not configured (plaintext only)"),
    }
    out!(
        "tls.min_version     {}",
        match c.tls.min_version {
            pg_tls_proxy::config::TlsVersion::V1_2 => "1.2",
            pg_tls_proxy::config::TlsVersion::V1_3 => "1.3",
        }
    );
    out!("tls.allow_plaintext {}", c.tls.allow_plaintext);
    let mode = match c.client_auth.effective_mode() {
        pg_tls_proxy::config::ClientAuthMode::None => "none",
        pg_tls_proxy::config::ClientAuthMode::Optional => "optional",
        pg_tls_proxy::config::ClientAuthMode::Required => "required",
    };
    out!("client_auth.mode    {mode}");
    let now = unix_now();
    for ca in &rt.client_cas {
        out!(
            "client_auth.ca      {} (expires in {} days)",
            ca.subject,
            ca.days_left(now)
        );
    }
    for crl in &rt.client_crls {
        let state = if crl.is_stale(now) {
            "STALE: past next_update"
        } else {
            "current"
        };
        out!("client_auth.crl     {} ({state})", crl.path.display());
    }
    out!("rules               {}", c.rules.len());
    out!(
        "admin.address       {}",
        if c.admin.enabled {
            c.admin.address.as_str()
        } else {
            "disabled"
        }
    );
    out!(
        "limits              handshake_timeout={:?} auth_timeout={:?} max_connections={} max_handshakes_in_flight={} idle_timeout={}",
        c.limits.handshake_timeout,
        c.limits.auth_timeout,
        c.limits.max_connections,
        c.limits.max_handshakes_in_flight,
        c.limits.idle_timeout.map_or("off".to_string(), |d| format!("{d:?}"))
    );
    out!(
        "listen.backlog      {} (effective {}: the kernel caps it at net.core.somaxconn)",
        c.listen.backlog,
        pg_tls_proxy::listener::effective_backlog(c.listen.backlog)
    );
    let fds = &prepared.fd_limit;
    out!(
        "file descriptors    RLIMIT_NOFILE {} (hard {}{}); room for {} sessions (2 descriptors each, {} reserved)",
        fds.soft,
        fds.hard,
        fds.raised_from
            .map_or(String::new(), |from| format!(", raised from {from}")),
        fds.sessions(),
        pg_tls_proxy::fdlimit::RESERVED
    );
    if let Some(why) = fds.shortfall(c.limits.max_connections) {
        out!("WARNING             {why}");
    }
    out!(
        "shutdown            grace_period={:?}",
        c.shutdown.grace_period
    );
    out!("backend.address     {}", c.backend.address);
    out!("backend.sslmode     {}", c.backend.sslmode.as_str());
    out!(
        "backend client cert {}",
        if c.backend.sslcert.is_some() {
            "yes (mTLS)"
        } else {
            "no"
        }
    );
    ExitCode::SUCCESS
}

fn explain(
    config: Option<PathBuf>,
    cert: PathBuf,
    user: Option<String>,
    database: Option<String>,
    replication: Option<String>,
) -> ExitCode {
    let replication = match replication.as_deref().map(Replication::parse) {
        None => Replication::None,
        Some(Some(r)) => r,
        Some(None) => {
            eprintln!(
                "pg-tls-proxy explain: --replication: PostgreSQL accepts a boolean or \"database\""
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    let config = match Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pg-tls-proxy: configuration error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match pg_tls_proxy::explain::explain(
        &config,
        &cert,
        user.as_deref(),
        database.as_deref(),
        replication,
    ) {
        Ok(report) => {
            {
                use std::io::Write;
                let _ = std::io::stdout().lock().write_all(report.text.as_bytes());
            }
            match report.allowed {
                Some(false) => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("pg-tls-proxy explain: {e}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn dev_certs(out: PathBuf, mut hosts: Vec<String>, clients: Vec<String>) -> ExitCode {
    if hosts.is_empty() {
        hosts = vec!["localhost".into(), "127.0.0.1".into()];
    }
    match pg_tls_proxy::devcerts::write(&out, &hosts, &clients) {
        Ok(written) => {
            out!("DEVELOPMENT ONLY: throwaway certificates, never use them in production.");
            for f in written.files {
                out!("  wrote {}", f.display());
            }
            out!("server names: {}", hosts.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pg-tls-proxy dev-certs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the subscriber; returns how to change its filter on reload.
fn init_tracing(c: &Config) -> app::LogReloader {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{reload, Layer};
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| c.log.level.clone());
    let filter = EnvFilter::try_new(&wanted).unwrap_or_else(|e| {
        eprintln!("pg-tls-proxy: log filter {wanted:?} is invalid ({e}); using \"info\"");
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match c.log.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json().with_filter(filter))
            .init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .init(),
    }
    Box::new(move |level: &str| {
        let next = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(next).map_err(|e| e.to_string())
    })
}

fn run(config: Option<PathBuf>) -> ExitCode {
    let registry = prometheus::Registry::new();
    let path = config.clone();
    let prepared = match load(config, &registry) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let log = init_tracing(&prepared.config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pg-tls-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let source = app::ReloadSource {
            path,
            log: Some(log),
        };
        let handle = match app::serve(prepared, &registry, source).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("pg-tls-proxy: {e}");
                return ExitCode::from(e.exit_code() as u8);
            }
        };
        let Some(mut signals) = Signals::new() else {
            tracing::error!("cannot install signal handlers");
            handle.abort().await;
            return ExitCode::FAILURE;
        };
        loop {
            match signals.next().await {
                Signal::Hangup => {
                    tracing::info!("SIGHUP: reloading");
                    let _ = handle.reload().await;
                }
                Signal::Terminate => {
                    tracing::info!("SIGTERM received");
                    handle.shutdown().await;
                    break;
                }
                Signal::Interrupt => {
                    tracing::info!("SIGINT: closing now");
                    handle.abort().await;
                    break;
                }
            }
        }
        ExitCode::SUCCESS
    })
}

enum Signal {
    Hangup,
    Terminate,
    Interrupt,
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(Signals {
            hup: signal(SignalKind::hangup()).ok()?,
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => Signal::Hangup,
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
        }
    }
}
