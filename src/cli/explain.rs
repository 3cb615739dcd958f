//! `pg-tls-proxy explain`: answers "why was I refused?" for one client
//! certificate, offline, with the same code the proxy runs: identities,
//! chain verification against `[client_auth]`, each rule in order, and the
//! final decision.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rustls_pki_types::UnixTime;

use crate::config::{ClientAuthMode, Config};
use crate::policy::identity::Identity;
use crate::policy::rolemap::{Decision, RoleMap};
use crate::tls::client_auth;
use crate::tls::pem::{self, CertSummary, FileError};
use crate::wire::Replication;

use super::EX_USAGE;

/// The report, and whether the startup would be allowed.
pub struct Explained {
    pub text: String,
    pub allowed: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Rules(#[from] crate::policy::rolemap::RuleError),
}

pub fn explain(
    config: &Config,
    cert: &Path,
    user: Option<&str>,
    database: Option<&str>,
    replication: Replication,
) -> Result<Explained, ExplainError> {
    let chain = pem::certs("--cert", cert)?;
    let leaf = &chain[0];
    let summary = CertSummary::parse(leaf).map_err(|r| FileError::new("--cert", cert, r))?;
    let identity = Identity::from_der(leaf.as_ref())
        .map_err(|e| FileError::new("--cert", cert, e.to_string()))?;
    let rules = RoleMap::compile(&config.rules)?;
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "certificate {}", cert.display());
    let _ = writeln!(w, "  subject {}", summary.subject);
    let _ = writeln!(w, "  issuer  {}", summary.issuer);
    let _ = writeln!(
        w,
        "  expires in {} days",
        summary.days_left(pem::unix_now())
    );
    let _ = writeln!(w, "identities:");
    let _ = write!(w, "{identity}");

    let _ = write!(w, "chain: ");
    let mut chain_ok = true;
    match client_auth::build(&config.client_auth)? {
        None => {
            let _ = writeln!(
                w,
                "not checked: client_auth.mode is none (the proxy does not ask for certificates)"
            );
        }
        Some(setup) => {
            let mode = match config.client_auth.effective_mode() {
                ClientAuthMode::Required => "required",
                _ => "optional",
            };
            match setup
                .verifier
                .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            {
                Ok(_) => {
                    let _ = writeln!(
                        w,
                        "verified against client_auth.ca ({} CA certificate(s), {} CRL(s)); mode {mode}",
                        setup.cas.len(),
                        setup.crls.len()
                    );
                }
                Err(e) => {
                    chain_ok = false;
                    let _ = writeln!(
                        w,
                        "REJECTED: {e} (the TLS handshake would fail before any rule runs)"
                    );
                }
            }
            for crl in setup.crls.iter().filter(|c| c.is_stale(pem::unix_now())) {
                let _ = writeln!(
                    w,
                    "  warning: CRL {} is past its next_update",
                    crl.path.display()
                );
            }
        }
    }

    // A physical walsender is checked as database "replication", as the
    // proxy (and pg_hba) do.
    let database = match replication {
        Replication::Physical => Some("replication"),
        _ => database.or(user),
    };
    let _ = writeln!(
        w,
        "rules (user {}, database {}, replication {}):",
        user.map_or("(not given)".to_string(), |u| format!("\"{u}\"")),
        database.map_or("(not given)".to_string(), |d| format!("\"{d}\"")),
        replication.as_str()
    );
    let trace = rules.explain(
        &identity,
        user.unwrap_or(""),
        database.unwrap_or(""),
        replication,
    );
    for (t, rule) in trace.iter().zip(&config.rules) {
        let matcher = match (&rule.pattern, &rule.exact) {
            (Some(p), _) => format!("pattern '{p}'"),
            (_, Some(e)) => format!("exact \"{e}\""),
            _ => String::new(),
        };
        let _ = write!(w, "  [{}] {} {matcher}: ", t.index, t.kind.as_str());
        match &t.matched {
            None => {
                let _ = writeln!(w, "no match");
            }
            Some((value, roles)) => {
                let role_ok = user.is_some_and(|u| roles.iter().any(|r| r == u));
                let verdict = match (user, t.allows) {
                    (None, _) => "",
                    (Some(_), true) => " -> ALLOWS",
                    _ if !role_ok => " -> role not in this rule",
                    _ if !t.database_allowed => " -> database not allowed",
                    _ => " -> replication not allowed",
                };
                let _ = writeln!(
                    w,
                    "match \"{value}\", roles [{}]{verdict}",
                    roles.join(", ")
                );
            }
        }
    }
    if trace.is_empty() {
        let _ = writeln!(w, "  (no rules: every certificate is denied)");
    }
    // Without client certificates the proxy applies no rule: every client
    // is a password client, authenticated by the backend (or [scram]).
    if config.client_auth.effective_mode() == ClientAuthMode::None {
        let _ = writeln!(
            w,
            "decision: NOT DECIDED HERE: client_auth.mode is none, so no rule applies; the client logs in with its password"
        );
        return Ok(Explained {
            text: out,
            allowed: user.map(|_| true),
        });
    }
    let allowed =
        user.map(
            |u| match rules.decide(&identity, u, database.unwrap_or(u), replication) {
                _ if !chain_ok => {
                    let _ = writeln!(
                        w,
                        "decision: DENY: the certificate does not verify (see chain above)"
                    );
                    false
                }
                Decision::Allow {
                    rule, backend_auth, ..
                } => {
                    let auth = backend_auth.as_str();
                    let _ = writeln!(
                        w,
                        "decision: ALLOW by rule {rule} (backend_auth = \"{auth}\")"
                    );
                    true
                }
                Decision::Deny {
                    reason, identity, ..
                } => {
                    // Exactly what the client would be told.
                    let told = crate::conn::error::SessionError::RoleDenied {
                        identity,
                        user: u.to_string(),
                        database: database.unwrap_or(u).to_string(),
                        reason,
                    }
                    .client_error()
                    .map(|e| e.message)
                    .unwrap_or_default();
                    let _ = writeln!(w, "decision: DENY ({}): {told}", reason.as_str());
                    false
                }
            },
        );
    if allowed.is_none() {
        let _ = writeln!(w, "decision: give --user (and --database) to decide");
    }
    Ok(Explained { text: out, allowed })
}

/// `pg-tls-proxy explain`: the report on stdout; exit 1 when refused.
pub fn command(
    config: Option<PathBuf>,
    cert: PathBuf,
    user: Option<String>,
    database: Option<String>,
    replication: Option<String>,
    route: Option<String>,
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
    let mut config = match Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pg-tls-proxy: configuration error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // A route's own rules and client certificates, else the top level's.
    if let Some(name) = route
        .as_deref()
        .filter(|n| *n != crate::config::DEFAULT_ROUTE)
    {
        let Some(r) = config.routes.iter().find(|r| r.name == name).cloned() else {
            let known: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
            eprintln!(
                "pg-tls-proxy explain: --route: no route {name:?} (routes: default{}{})",
                if known.is_empty() { "" } else { ", " },
                known.join(", ")
            );
            return ExitCode::from(EX_USAGE);
        };
        if let Some(rules) = r.rules {
            config.rules = rules;
        }
        if let Some(client_auth) = r.client_auth {
            config.client_auth = client_auth;
        }
        out!("route {name}");
    }
    match explain(
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
