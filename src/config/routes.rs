//! `[[routes]]` and `[routing]`: one listener in front of several
//! PostgreSQL servers, each route with its own server names, certificate,
//! backend and (optionally) client certificates and rules. The top-level
//! `[tls]`/`[backend]`/`[client_auth]`/`[[rules]]` are the route named
//! "default", so a configuration without routes means what it always did.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::backend::Backend;
use super::rules::RuleConfig;
use super::tls::{CertKey, ClientAuth};
use super::Check;

/// The top-level route's name.
pub const DEFAULT_ROUTE: &str = "default";

/// `[routing]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// Whether clients that select no route (no or an unknown server name,
    /// no `pgtls.route` option, no database pattern) reach the top-level
    /// `[backend]`. Off: they are refused (TLS alert `unrecognized_name`
    /// for an unknown server name, FATAL 08004 after the startup
    /// otherwise), and `[tls]` only serves clients without a server name
    /// their handshake.
    pub default: bool,
}

impl Default for Routing {
    fn default() -> Self {
        Routing { default: true }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Names the route in `pgtls.route`, metrics, logs (`[a-z0-9_-]`).
    pub name: String,
    /// Server names (SNI) that select it: exact, or `*.suffix` (one label).
    #[serde(default)]
    pub server_names: Vec<String>,
    /// For clients without a server name: database names that select it,
    /// exact or ending in `*` (a prefix).
    #[serde(default)]
    pub databases: Vec<String>,
    /// The certificate chain and key served for its server names: `cert`
    /// and `key`, or `cert_dir` holding `tls.crt` and `tls.key`
    /// (cert-manager's Secret layout).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub cert_dir: Option<PathBuf>,
    /// Its PostgreSQL server and link, in `[backend]`'s keys.
    pub backend: Backend,
    /// Its client certificates; the top-level `[client_auth]` when absent.
    /// A route with its own can only be selected by server name (the
    /// certificate is checked during the handshake).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// Its rules; the top-level `[[rules]]` when absent.
    #[serde(default)]
    pub rules: Option<Vec<RuleConfig>>,
}

impl RouteConfig {
    /// The certificate and key it serves.
    pub fn cert_key(&self) -> Option<CertKey> {
        match (&self.cert_dir, &self.cert, &self.key) {
            (Some(dir), None, None) => Some(CertKey {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
            }),
            (None, Some(cert), Some(key)) => Some(CertKey {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }

    fn check(&self) -> Check {
        let name = &self.name;
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        if name.is_empty() || !name.chars().all(valid) || name == DEFAULT_ROUTE {
            return Err((
                "routes.name",
                format!("{name:?}: a route name is [a-z0-9_-]+ and not \"{DEFAULT_ROUTE}\""),
            ));
        }
        if self.cert_key().is_none() {
            return Err((
                "routes.cert",
                format!("route {name}: give cert and key, or cert_dir (with tls.crt and tls.key)"),
            ));
        }
        for sni in &self.server_names {
            if sni.parse::<std::net::IpAddr>().is_ok() {
                return Err((
                    "routes.server_names",
                    format!("route {name}: {sni} is an address; clients send no server name for an address (use databases or pgtls.route for them)"),
                ));
            }
            if !server_name_ok(sni) {
                return Err((
                    "routes.server_names",
                    format!("route {name}: {sni:?} is not a lowercase DNS name or *.suffix"),
                ));
            }
        }
        for db in &self.databases {
            if db.is_empty() || db[..db.len() - 1].contains('*') {
                return Err((
                    "routes.databases",
                    format!("route {name}: {db:?}: a database name, or a prefix ending in *"),
                ));
            }
        }
        self.backend
            .check()
            .map_err(|(key, reason)| ("routes.backend", format!("route {name}: {key}: {reason}")))
    }
}

/// `db.example`, `*.tenants.example` (the wildcard covers one label).
fn server_name_ok(name: &str) -> bool {
    let labels = name.strip_prefix("*.").unwrap_or(name);
    !labels.is_empty()
        && labels.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

/// The routes together: names and server names unique.
pub(crate) fn check(routes: &[RouteConfig]) -> Check {
    let mut names = HashMap::new();
    let mut server_names: HashMap<&str, &str> = HashMap::new();
    let mut databases: HashMap<&str, &str> = HashMap::new();
    for r in routes {
        r.check()?;
        if names.insert(r.name.as_str(), ()).is_some() {
            return Err(("routes.name", format!("route {} is defined twice", r.name)));
        }
        for sni in &r.server_names {
            if let Some(other) = server_names.insert(sni, &r.name) {
                let why = if other == r.name {
                    format!("{sni} is listed twice in route {other}")
                } else {
                    format!("{sni} selects both route {other} and route {}", r.name)
                };
                return Err(("routes.server_names", why));
            }
        }
        for db in &r.databases {
            if let Some(other) = databases.insert(db, &r.name) {
                return Err((
                    "routes.databases",
                    format!(
                        "{db} is given for route {other} and route {} (the first would always win)",
                        r.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "[tls]\ncert='a'\nkey='b'\n";

    #[test]
    fn routes_parse_and_are_checked() {
        let c = Config::from_toml(&format!(
            "{BASE}[[routes]]\nname='t1'\nserver_names=['db1.example.test','*.tenants.example.test']\ncert_dir='/etc/t1'\n[routes.backend]\naddress='10.0.0.1:5432'\n"
        ))
        .expect("valid");
        assert_eq!(c.routes.len(), 1);
        let ck = c.routes[0].cert_key().expect("cert");
        assert_eq!(ck.cert, PathBuf::from("/etc/t1/tls.crt"));
        for (bad, key) in [
            ("name='default'", "routes.name"),
            ("name='T1'", "routes.name"),
            (
                "name='t1'\nserver_names=['DB.example']",
                "routes.server_names",
            ),
            ("name='t1'\nserver_names=['*']", "routes.server_names"),
            ("name='t1'\ndatabases=['a*b']", "routes.databases"),
            ("name='t1'\nserver_names=['127.0.0.1']", "is an address"),
            (
                "name='t1'\nserver_names=['a.test','a.test']",
                "listed twice in route t1",
            ),
        ] {
            let err = Config::from_toml(&format!(
                "{BASE}[[routes]]\n{bad}\ncert_dir='/x'\n[routes.backend]\naddress='h:1'\n"
            ))
            .expect_err(bad)
            .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        let err = Config::from_toml(&format!(
            "{BASE}[[routes]]\nname='a'\nserver_names=['x.test']\ncert_dir='/x'\n[routes.backend]\naddress='h:1'\n[[routes]]\nname='b'\nserver_names=['x.test']\ncert_dir='/y'\n[routes.backend]\naddress='h:2'\n"
        ))
        .expect_err("duplicate server name")
        .to_string();
        assert!(
            err.contains("x.test selects both route a and route b"),
            "{err}"
        );
        let err = Config::from_toml(&format!(
            "{BASE}[[routes]]\nname='a'\n[routes.backend]\naddress='h:1'\n"
        ))
        .expect_err("no certificate")
        .to_string();
        assert!(err.contains("cert_dir"), "{err}");
    }
}
