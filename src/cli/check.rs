//! `pg-tls-proxy check`: load the configuration and every file it names,
//! exactly as a start would, and print what the proxy would run with.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::tls::pem::unix_now;

use super::load;

pub fn check(config: Option<PathBuf>) -> ExitCode {
    let prepared = match load(config, &prometheus::Registry::new()) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let c = &prepared.config;
    let rt = prepared.runtime();
    out!("configuration OK");
    out!("listen.address      {}", c.listen.address);
    let d = &rt.default;
    match d.chain.first() {
        Some(leaf) => {
            out!("tls.cert subject    {}", leaf.subject);
            out!("tls.cert issuer     {}", leaf.issuer);
            out!("tls.cert SANs       {}", leaf.sans.join(", "));
            out!("tls.cert chain      {} certificate(s)", d.chain.len());
            out!("tls.cert expires in {} days", leaf.days_left(unix_now()));
        }
        None => out!("tls                 not configured (plaintext only)"),
    }
    out!("tls.min_version     {}", c.tls.min_version.as_str());
    out!("tls.allow_plaintext {}", c.tls.allow_plaintext);
    let mode = c.client_auth.effective_mode().as_str();
    out!("client_auth.mode    {mode}");
    let now = unix_now();
    for ca in &d.client_cas {
        out!(
            "client_auth.ca      {} (expires in {} days)",
            ca.subject,
            ca.days_left(now)
        );
    }
    for crl in &d.client_crls {
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
        crate::sys::listener::effective_backlog(c.listen.backlog)
    );
    out!(
        "listen.workers      {} session thread(s){}",
        crate::sys::workers::resolve(c.listen.workers),
        if c.listen.workers == 0 {
            " (0: one per CPU this process may use)"
        } else {
            ""
        }
    );
    let fds = &prepared.fd_limit;
    out!(
        "file descriptors    RLIMIT_NOFILE {} (hard {}{}); room for {} sessions (2 descriptors each, {} reserved)",
        fds.soft,
        fds.hard,
        fds.raised_from
            .map_or(String::new(), |from| format!(", raised from {from}")),
        fds.sessions(),
        fds.reserved
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
        if c.backend.client_cert.is_some() {
            "yes (mTLS)"
        } else {
            "no"
        }
    );
    if !rt.routes.is_empty() {
        out!(
            "routing.default     {} ({} routes besides \"default\")",
            rt.routing_default,
            rt.routes.len()
        );
    }
    for (route, r) in rt.routes.iter().zip(&c.routes) {
        let leaf = route.chain.first();
        out!(
            "route {:<13} server names {}; databases {}; backend {} ({}); certificate {} (expires in {} days){}",
            route.name,
            if r.server_names.is_empty() { "-".to_string() } else { r.server_names.join(", ") },
            if r.databases.is_empty() { "-".to_string() } else { r.databases.join(", ") },
            route.connector.address(),
            route.connector.sslmode().as_str(),
            leaf.map_or("-", |l| l.subject.as_str()),
            leaf.map_or(0, |l| l.days_left(now)),
            if route.own_client_auth { "; own client_auth" } else { "" }
        );
    }
    if let (Some(f), Some(fleet)) = (&c.fleet, &prepared.shared.fleet) {
        out!(
            "fleet               replica {} of up to {}; peers listener {}",
            fleet.me().replica,
            u16::from(crate::config::MAX_REPLICA_ID) + 1,
            f.listen
        );
        out!("fleet.peers         {}", f.peers.join(", "));
        if let Some(leaf) = rt.fleet_tls.as_ref().and_then(|t| t.chain.first()) {
            out!(
                "fleet.cert          {} (expires in {} days)",
                leaf.subject,
                leaf.days_left(now)
            );
        }
    }
    ExitCode::SUCCESS
}
