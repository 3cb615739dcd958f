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

use rustls::ServerConfig;
use zeroize::Zeroizing;

use crate::backend::login::Secret;
use crate::backend::auth_query::AuthQuery;
use crate::backend::Connector;
use crate::config::{CertKey, ClientAuthMode, Config, ConfigError, SecretSource};
use crate::policy::rolemap::RoleMap;
use crate::policy::scram::{userlist, Verifier};
use crate::tls;
use crate::tls::client_auth::CrlSummary;
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

pub struct Runtime {
    pub tls: Option<Arc<ServerConfig>>,
    pub allow_plaintext: bool,
    pub client_auth: ClientAuthMode,
    pub rolemap: RoleMap,
    pub credentials: HashMap<String, Secret>,
    pub connector: Arc<Connector>,
    pub handshake_timeout: Duration,
    pub auth_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// What was loaded, for `check` and the expiry metrics.
    pub server_chain: Vec<CertSummary>,
    pub client_cas: Vec<CertSummary>,
    pub client_crls: Vec<CrlSummary>,
    pub certificates: Vec<(&'static str, String, i64)>,
    pub log_level: String,
    /// tls-server-end-point of the certificate served (SCRAM-PLUS).
    pub server_end_point: Option<Vec<u8>>,
    /// SCRAM terminated at the proxy (`[scram]`), when on.
    pub scram: Option<ScramSetup>,
    /// `listen.proxy_protocol = "required"`: the trusted networks.
    pub proxy_trusted: Option<Vec<ipnet::IpNet>>,
    /// The peer link's TLS, both directions (`[fleet]`).
    pub fleet_tls: Option<PeerTls>,
}

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
        let server = tls::server::build(&config.tls, &config.client_auth)?;
        let connector = Arc::new(Connector::new(&config.backend)?);
        let rolemap = RoleMap::compile(&config.rules)?;
        let credentials = load_credentials(config)?;
        let scram = load_scram(config)?;
        let (tls, client_setup, server_chain, server_end_point) = match server {
            Some(s) => (Some(s.config), s.client_auth, s.chain, s.end_point),
            None => (None, None, Vec::new(), None),
        };
        let (client_cas, client_crls) = client_setup.map(|c| (c.cas, c.crls)).unwrap_or_default();
        let fleet_tls = config.fleet.as_ref().map(tls::peer::build).transpose()?;
        let mut certificates =
            certificate_expiries(config, &server_chain, &client_cas, &client_crls)?;
        certificates.extend(
            fleet_tls
                .iter()
                .flat_map(|t| &t.chain)
                .map(|c| ("fleet", c.subject.clone(), c.not_after)),
        );
        Ok(Runtime {
            tls,
            allow_plaintext: config.tls.allow_plaintext,
            client_auth: config.client_auth.effective_mode(),
            rolemap,
            credentials,
            connector,
            handshake_timeout: config.limits.handshake_timeout,
            auth_timeout: config.limits.auth_timeout,
            idle_timeout: config.limits.idle_timeout,
            server_chain,
            client_cas,
            client_crls,
            certificates,
            log_level: config.log.level.clone(),
            server_end_point,
            scram,
            proxy_trusted: (config.listen.proxy_protocol == crate::config::ProxyProtocol::Required)
                .then(|| config.listen.proxy_trusted.clone()),
            fleet_tls,
        })
    }
}

/// (role, subject, not-after) for every certificate and CRL the config names.
fn certificate_expiries(
    config: &Config,
    server_chain: &[CertSummary],
    client_cas: &[CertSummary],
    client_crls: &[CrlSummary],
) -> Result<Vec<(&'static str, String, i64)>, BuildError> {
    let mut out = Vec::new();
    out.extend(
        server_chain
            .iter()
            .map(|c| ("server", c.subject.clone(), c.not_after)),
    );
    out.extend(
        client_cas
            .iter()
            .map(|c| ("client_ca", c.subject.clone(), c.not_after)),
    );
    out.extend(
        client_crls
            .iter()
            .filter_map(|c| Some(("crl", c.issuer.clone(), c.next_update?))),
    );
    if let Some(CertKey { cert: path, .. }) = &config.backend.client_cert {
        for cert in tls::pem::certs("backend.sslcert", path)? {
            let c = CertSummary::parse(&cert)
                .map_err(|r| FileError::new("backend.sslcert", path, r))?;
            out.push(("backend_client", c.subject, c.not_after));
        }
    }
    Ok(out)
}

/// Reads `[backend.credentials]` secrets from their files or variables.
fn load_credentials(config: &Config) -> Result<HashMap<String, Secret>, BuildError> {
    let mut out = HashMap::new();
    for (role, source) in &config.backend.credentials {
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
