//! The reloadable part of the proxy's state, built from a [`Config`] in one
//! go and validated before anyone sees it: server certificate chain and
//! key, client CA bundle and CRLs, role rules, backend link settings
//! (including the proxy's client certificate), credentials, timeouts.
//!
//! A new `Runtime` always carries a new rustls `ServerConfig`, hence a
//! fresh session-ticket key and an empty session cache: a resumed TLS
//! session skips client-certificate verification, so after a CA or CRL
//! change no old session may be resumed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::backend::login::Secret;
use crate::backend::auth_query::AuthQuery;
use crate::backend::Connector;
use crate::config::{CertKey, ClientAuthMode, Config, ConfigError, SecretSource, DEFAULT_ROUTE};
use crate::policy::rolemap::RoleMap;
use crate::policy::scram::{userlist, Verifier};
use crate::tls;
use crate::tls::client_auth::ClientAuthSetup;
use crate::tls::server::{Keys, SESSION_CACHE_SIZE};
use crate::tls::peer::PeerTls;
use crate::tls::pem::{CertSummary, FileError};

/// Why a runtime could not be built: a key, a file, or a rule.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Rules(#[from] crate::policy::rolemap::RuleError),
}

mod routes;

pub use routes::{Route, Routes};

pub struct Runtime {
    /// The top-level `[tls]`, `[client_auth]`, `[[rules]]` and `[backend]`:
    /// the route named "default". Its certificate serves clients without
    /// a server name.
    pub default: Arc<Route>,
    /// `[[routes]]`.
    pub routes: Routes,
    /// `routing.default`: clients that select no route reach the default.
    pub routing_default: bool,
    pub allow_plaintext: bool,
    pub handshake_timeout: Duration,
    pub auth_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// Every certificate and CRL loaded, for the expiry metrics.
    pub certificates: Vec<CertExpiry>,
    pub log_level: String,
    /// SCRAM terminated at the proxy (`[scram]`), when on.
    pub scram: Option<ScramSetup>,
    /// `listen.proxy_protocol = "required"`: the trusted networks.
    pub proxy_trusted: Option<Vec<ipnet::IpNet>>,
    /// The peer link's TLS, both directions (`[fleet]`).
    pub fleet_tls: Option<PeerTls>,
}

/// One certificate's (or CRL's) expiry: role (server, client_ca, crl,
/// backend_client, fleet), route, subject, Unix time.
pub type CertExpiry = (&'static str, String, String, i64);

/// What SCRAM termination needs: the verifiers (from `scram.auth_file`)
/// and the secret the mock exchange derives salts from.
pub struct ScramSetup {
    pub verifiers: HashMap<String, Verifier>,
    /// For users the auth_file does not list.
    pub auth_query: Option<AuthQuery>,
    pub mock_secret: Zeroizing<Vec<u8>>,
}

impl Runtime {
    /// Reads every file the config names and checks it. Binds nothing.
    pub fn build(config: &Config) -> Result<Runtime, BuildError> {
        let top_client_auth = tls::client_auth::build(&config.client_auth)?;
        let default = build_route(
            DEFAULT_ROUTE,
            config.tls.server.as_ref(),
            Keys::TOP,
            config,
            (config.client_auth.effective_mode(), top_client_auth.clone(), false),
            &config.rules,
            &config.backend,
            SESSION_CACHE_SIZE,
        )?;
        let mut routes = Routes::default();
        for r in &config.routes {
            let client = match &r.client_auth {
                Some(own) => (own.effective_mode(), tls::client_auth::build(own)?, true),
                None => (
                    config.client_auth.effective_mode(),
                    top_client_auth.clone(),
                    false,
                ),
            };
            let route = build_route(
                &r.name,
                r.cert_key().as_ref(),
                Keys::ROUTE,
                config,
                client,
                r.rules.as_deref().unwrap_or(&config.rules),
                &r.backend,
                0,
            )
            .map_err(|e| match e {
                BuildError::File(f) => BuildError::File(FileError {
                    reason: format!("route {}: {}", r.name, f.reason),
                    ..f
                }),
                other => other,
            })?;
            covers(&route, r)?;
            routes.add(&r.name, route, &r.server_names, &r.databases);
        }
        let scram = load_scram(config)?;
        let fleet_tls = config.fleet.as_ref().map(tls::peer::build).transpose()?;
        let mut certificates = Vec::new();
        certificate_expiries(&default, &config.backend, &mut certificates)?;
        for (route, r) in routes.iter().zip(&config.routes) {
            certificate_expiries(route, &r.backend, &mut certificates)?;
        }
        certificates.extend(
            fleet_tls
                .iter()
                .flat_map(|t| &t.chain)
                .map(|c| ("fleet", String::new(), c.subject.clone(), c.not_after)),
        );
        Ok(Runtime {
            default: Arc::new(default),
            routes,
            routing_default: config.routing.default,
            allow_plaintext: config.tls.allow_plaintext,
            handshake_timeout: config.limits.handshake_timeout,
            auth_timeout: config.limits.auth_timeout,
            idle_timeout: config.limits.idle_timeout,
            certificates,
            log_level: config.log.level.clone(),
            scram,
            proxy_trusted: (config.listen.proxy_protocol == crate::config::ProxyProtocol::Required)
                .then(|| config.listen.proxy_trusted.clone()),
            fleet_tls,
        })
    }
}

/// One route from its pieces; `client`: mode, built verifier, own.
#[allow(clippy::too_many_arguments)]
fn build_route(
    name: &str,
    cert: Option<&CertKey>,
    keys: Keys,
    config: &Config,
    client: (ClientAuthMode, Option<ClientAuthSetup>, bool),
    rules: &[crate::config::RuleConfig],
    backend: &crate::config::Backend,
    session_cache: usize,
) -> Result<Route, BuildError> {
    let (client_auth, setup, own_client_auth) = client;
    let server = cert
        .map(|pair| tls::server::build_for(pair, keys, &config.tls, setup.clone(), session_cache))
        .transpose()?;
    let (client_cas, client_crls) = setup.map(|c| (c.cas, c.crls)).unwrap_or_default();
    let (tls, chain, end_point) = match server {
        Some(s) => (Some(s.config), s.chain, s.end_point),
        None => (None, Vec::new(), None),
    };
    Ok(Route {
        name: name.to_string(),
        tls,
        end_point,
        client_auth,
        own_client_auth,
        rolemap: RoleMap::compile(rules)?,
        credentials: load_credentials(backend)?,
        connector: Arc::new(Connector::new(backend)?),
        chain,
        client_cas,
        client_crls,
    })
}

/// A route's certificate must be valid for each of its server names, or
/// verify-full clients would be refused on every connection.
fn covers(route: &Route, r: &crate::config::RouteConfig) -> Result<(), BuildError> {
    let Some(leaf) = route.chain.first() else {
        return Ok(());
    };
    let dns: Vec<String> = leaf
        .sans
        .iter()
        .filter_map(|s| s.strip_prefix("DNS:"))
        .map(str::to_ascii_lowercase)
        .collect();
    for sni in &r.server_names {
        let parent_wildcard = sni
            .split_once('.')
            .filter(|_| !sni.starts_with("*."))
            .map(|(_, parent)| format!("*.{parent}"));
        let ok = dns
            .iter()
            .any(|d| d == sni || Some(d) == parent_wildcard.as_ref());
        if !ok {
            let path = r.cert_key().map(|p| p.cert).unwrap_or_default();
            return Err(FileError::new(
                "routes.cert",
                &path,
                format!(
                    "route {}: the certificate ({}) is not valid for {sni}; its names: {}",
                    r.name,
                    leaf.subject,
                    if dns.is_empty() { "none".to_string() } else { dns.join(", ") }
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// (role, route, subject, not-after) for every certificate and CRL a
/// route uses.
fn certificate_expiries(
    route: &Route,
    backend: &crate::config::Backend,
    out: &mut Vec<CertExpiry>,
) -> Result<(), BuildError> {
    let name = || route.name.clone();
    out.extend(
        route
            .chain
            .iter()
            .map(|c| ("server", name(), c.subject.clone(), c.not_after)),
    );
    out.extend(
        route
            .client_cas
            .iter()
            .map(|c| ("client_ca", name(), c.subject.clone(), c.not_after)),
    );
    out.extend(
        route
            .client_crls
            .iter()
            .filter_map(|c| Some(("crl", name(), c.issuer.clone(), c.next_update?))),
    );
    if let Some(CertKey { cert: path, .. }) = &backend.client_cert {
        for cert in tls::pem::certs("backend.sslcert", path)? {
            let c = CertSummary::parse(&cert)
                .map_err(|r| FileError::new("backend.sslcert", path, r))?;
            out.push(("backend_client", name(), c.subject, c.not_after));
        }
    }
    Ok(())
}

/// Reads `[backend.credentials]` secrets from their files or variables.
fn load_credentials(
    backend: &crate::config::Backend,
) -> Result<HashMap<String, Secret>, BuildError> {
    let mut out = HashMap::new();
    for (role, source) in &backend.credentials {
        let value = read_secret(source, "backend.credentials", role)?;
        out.insert(role.clone(), Secret::new(value));
    }
    Ok(out)
}

/// A secret from its file (without the trailing newline) or variable;
/// errors name the key and `what` (a role), never the value.
pub fn read_secret(
    source: &SecretSource,
    key: &'static str,
    what: &str,
) -> Result<String, BuildError> {
    match source {
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| FileError::new(key, path, format!("{what}: cannot read: {e}")).into()),
        SecretSource::Env(var) => std::env::var(var).map_err(|_| {
            BuildError::Config(ConfigError::Invalid {
                key,
                reason: format!("{what}: environment variable {var} is not set"),
                origin: None,
            })
        }),
    }
}

/// `[scram]`: the auth_file's verifiers and the mock secret. Without a
/// configured secret, one random secret serves the whole process (so
/// reloads keep what unknown users see).
fn load_scram(config: &Config) -> Result<Option<ScramSetup>, BuildError> {
    let s = &config.scram;
    if !s.terminate {
        return Ok(None);
    }
    let verifiers = match &s.auth_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| FileError::new("scram.auth_file", path, format!("cannot read: {e}")))?;
            userlist::parse(&text).map_err(|e| FileError::new("scram.auth_file", path, e.to_string()))?
        }
        None => HashMap::new(),
    };
    let auth_query = match &s.auth_query {
        Some(q) => {
            let secret = match &q.password {
                Some(source) => Some(Secret::new(read_secret(source, "scram.auth_query.password", &q.user)?)),
                None => None,
            };
            Some(AuthQuery::new(q, &config.backend, secret)?)
        }
        None => None,
    };
    let mock_secret = match &s.mock_secret {
        Some(source) => read_secret(source, "scram.mock_secret", "the mock secret")?.into_bytes(),
        None => {
            static PROCESS_SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
            PROCESS_SECRET.get_or_init(rand::random).to_vec()
        }
    };
    Ok(Some(ScramSetup {
        verifiers,
        auth_query,
        mock_secret: Zeroizing::new(mock_secret),
    }))
}
