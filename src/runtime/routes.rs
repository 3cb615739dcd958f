//! Routes as the proxy runs them: for each, the certificate it serves
//! (a rustls `ServerConfig`, its channel-binding hash), its client
//! certificate rules, role rules, backend link and credentials; and the
//! indexes that select one from a server name, a `pgtls.route` option or
//! a database name. Built with the rest of the [`super::Runtime`], so a
//! reload swaps every route at once and a connection keeps the routes it
//! started with.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::ServerConfig;

use crate::backend::login::Secret;
use crate::backend::Connector;
use crate::config::ClientAuthMode;
use crate::policy::rolemap::RoleMap;
use crate::tls::client_auth::CrlSummary;
use crate::tls::pem::CertSummary;

/// One route, ready to serve.
pub struct Route {
    /// As configured; "default" for the top level. Metrics and logs use
    /// it, never the raw server name.
    pub name: String,
    /// The certificate served to clients that selected it by server name
    /// (the default route's also serves clients without one).
    pub tls: Option<Arc<ServerConfig>>,
    /// tls-server-end-point of that certificate (SCRAM-PLUS).
    pub end_point: Option<Vec<u8>>,
    pub client_auth: ClientAuthMode,
    /// Whether the route checks client certificates its own way: then only
    /// a handshake for one of its server names may select it.
    pub own_client_auth: bool,
    pub rolemap: RoleMap,
    pub credentials: HashMap<String, Secret>,
    pub connector: Arc<Connector>,
    /// What was loaded, for `check` and the expiry metrics.
    pub chain: Vec<CertSummary>,
    pub client_cas: Vec<CertSummary>,
    pub client_crls: Vec<CrlSummary>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Route({})", self.name)
    }
}

/// The configured `[[routes]]` and how each is found (generic so that
/// selection can be measured and tested without building routes).
pub struct Routes<R = Route> {
    all: Vec<Arc<R>>,
    by_name: HashMap<String, usize>,
    exact: HashMap<String, usize>,
    /// `*.suffix` under its suffix.
    wildcard: HashMap<String, usize>,
    /// (name or prefix, is a prefix, route).
    databases: Vec<(String, bool, usize)>,
}

impl<R> Default for Routes<R> {
    fn default() -> Self {
        Routes {
            all: Vec::new(),
            by_name: HashMap::new(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            databases: Vec::new(),
        }
    }
}

impl<R> Routes<R> {
    /// Adds route `name` with its server names and database patterns
    /// (checked unique by the config).
    pub fn add(&mut self, name: &str, route: R, server_names: &[String], databases: &[String]) {
        let at = self.all.len();
        self.by_name.insert(name.to_string(), at);
        for sni in server_names {
            match sni.strip_prefix("*.") {
                Some(suffix) => self.wildcard.insert(suffix.to_string(), at),
                None => self.exact.insert(sni.clone(), at),
            };
        }
        for db in databases {
            match db.strip_suffix('*') {
                Some(prefix) => self.databases.push((prefix.to_string(), true, at)),
                None => self.databases.push((db.clone(), false, at)),
            }
        }
        self.all.push(Arc::new(route));
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<R>> {
        self.all.iter()
    }

    /// The route a server name selects: an exact name, else a wildcard
    /// for its parent domain (`*.example.test` covers `a.example.test`,
    /// not `a.b.example.test`). Case-insensitive, as DNS.
    pub fn for_server_name(&self, sni: &str) -> Option<&Arc<R>> {
        let lower;
        let sni = if sni.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = sni.to_ascii_lowercase();
            lower.as_str()
        } else {
            sni
        };
        let sni = sni.strip_suffix('.').unwrap_or(sni);
        self.exact
            .get(sni)
            .or_else(|| self.wildcard.get(sni.split_once('.')?.1))
            .map(|&i| &self.all[i])
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<R>> {
        self.by_name.get(name).map(|&i| &self.all[i])
    }

    /// The first route whose database patterns (in configuration order)
    /// match.
    pub fn for_database(&self, database: &str) -> Option<&Arc<R>> {
        self.databases
            .iter()
            .find(|(p, prefix, _)| {
                if *prefix {
                    database.starts_with(p.as_str())
                } else {
                    database == p
                }
            })
            .map(|&(_, _, i)| &self.all[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes<&'static str> {
        let mut r = Routes::default();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        r.add("one", "one", &s(&["db1.example.test"]), &s(&["shard1"]));
        r.add("two", "two", &s(&["*.tenants.example.test"]), &s(&["shard2_*"]));
        r.add("three", "three", &s(&["a.tenants.example.test"]), &[]);
        r
    }

    #[test]
    fn exact_before_wildcard_one_label() {
        let r = routes();
        let name = |sni| r.for_server_name(sni).map(|x| **x);
        assert_eq!(name("db1.example.test"), Some("one"));
        assert_eq!(name("DB1.Example.Test."), Some("one"), "case and a final dot");
        assert_eq!(name("b.tenants.example.test"), Some("two"));
        assert_eq!(name("a.tenants.example.test"), Some("three"), "exact first");
        assert_eq!(name("x.b.tenants.example.test"), None, "one label only");
        assert_eq!(name("tenants.example.test"), None);
        assert_eq!(name("other.test"), None);
    }

    #[test]
    fn names_and_databases() {
        let r = routes();
        assert_eq!(r.by_name("two").map(|x| **x), Some("two"));
        assert!(r.by_name("default").is_none());
        assert_eq!(r.for_database("shard1").map(|x| **x), Some("one"));
        assert_eq!(r.for_database("shard10"), None, "exact means exact");
        assert_eq!(r.for_database("shard2_eu").map(|x| **x), Some("two"));
        assert_eq!(r.len(), 3);
    }
}
