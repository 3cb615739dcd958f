//! The command line: `pg-tls-proxy [--config FILE]` runs the proxy;
//! `check`, `explain` and `dev-certs` are the offline tools. Exit status 64
//! (EX_USAGE) for configuration errors, before anything is bound.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{self, Prepared};
use crate::config::Config;

/// `println!` that does not panic when stdout is closed (`check | head`,
/// a full disk): reports are best effort, exit codes carry the verdict.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod check;
pub mod devcerts;
pub mod explain;

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
        /// A `[[routes]]` name: its rules and client_auth (the top level's
        /// where it has none).
        #[arg(long)]
        route: Option<String>,
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
        /// Fleet peer names (`[fleet]`): each gets peer-<name>.crt/.key,
        /// signed by a fleet CA of its own (fleet-ca.crt).
        #[arg(long = "peer")]
        peers: Vec<String>,
    },
}

const EX_USAGE: u8 = 64;

/// The binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::DevCerts {
            out,
            hosts,
            clients,
            peers,
        }) => devcerts::command(out, hosts, clients, peers),
        Some(Command::Check) => check::check(cli.config),
        Some(Command::Explain {
            cert,
            user,
            database,
            replication,
            route,
        }) => explain::command(cli.config, cert, user, database, replication, route),
        None => serve(cli.config),
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

fn serve(config: Option<PathBuf>) -> ExitCode {
    let registry = prometheus::Registry::new();
    let path = config.clone();
    let prepared = match load(config, &registry) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let log = app::logging::init(&prepared.config);
    // Listeners, admin, reloads and the fleet's peer link; sessions run
    // on their own threads (`sys::workers`).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pgtls-control")
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
        match app::signals::run(handle).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(()) => ExitCode::FAILURE,
        }
    })
}
