//! Configuration: built-in defaults, then the TOML file given by `--config`,
//! then `PGTLS_` environment variables (`__` separates nesting levels).
//!
//! This module owns the shape of the configuration and its validation. It
//! never opens sockets; reading certificate files happens in [`crate::tls`]
//! and [`crate::backend`], which report errors against the key named here.
//! Unknown keys are errors: a typo must never silently fall back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Whole configuration. The top-level tables (`listen`, `tls`, `backend`)
/// describe one listener and one backend; later several can be added as
/// arrays of tables without renaming these keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: Listen,
    pub tls: Tls,
    pub backend: Backend,
    pub client_auth: ClientAuth,
    /// Ordered certificate-identity → role rules (`[[rules]]`).
    pub rules: Vec<RuleConfig>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub log: Log,
    pub admin: Admin,
    pub reload: Reload,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reload {
    /// Check the config file and every file it names this often and reload
    /// when one changed (mtime, size or inode). Off when absent.
    #[serde(with = "humantime_serde::option")]
    pub poll_interval: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Serve /metrics, /live and /ready.
    pub enabled: bool,
    /// Its own listener, never the data port.
    pub address: String,
    /// Exposing the admin listener beyond loopback is an explicit choice.
    pub allow_non_loopback: bool,
    /// /ready answers 503 after this many consecutive failed backend
    /// connects (0 = never).
    pub unready_after_backend_failures: u32,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            enabled: true,
            address: "127.0.0.1:9187".into(),
            allow_non_loopback: false,
            unready_after_backend_failures: 3,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientAuth {
    /// none | optional | required; unset with `ca` given means required.
    pub mode: Option<ClientAuthMode>,
    /// PEM bundles of CAs that sign client certificates (roots, optionally
    /// intermediates).
    #[serde(deserialize_with = "one_or_many")]
    pub ca: Vec<PathBuf>,
    /// PEM CRL files; revoked client certificates are refused.
    #[serde(deserialize_with = "one_or_many")]
    pub crl: Vec<PathBuf>,
    /// Which certificates need revocation status: "chain" (every issuer
    /// needs a CRL, as PostgreSQL's whole-chain check) or "leaf".
    pub crl_check: CrlCheck,
    /// A CRL past its next_update: "warn" (it still applies; logged and
    /// visible in metrics) or "deny" (refuse every certificate it covers,
    /// as PostgreSQL/OpenSSL do).
    pub crl_expired: CrlExpired,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrlExpired {
    #[default]
    Warn,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    None,
    Optional,
    Required,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrlCheck {
    #[default]
    Chain,
    Leaf,
}

impl ClientAuth {
    /// The effective mode: `ca` without `mode` means required.
    pub fn effective_mode(&self) -> ClientAuthMode {
        match self.mode {
            Some(m) => m,
            None if !self.ca.is_empty() => ClientAuthMode::Required,
            None => ClientAuthMode::None,
        }
    }
}

/// One `[[rules]]` entry; see [`crate::rolemap`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub identity: crate::identity::IdentityKind,
    /// Regex, anchored at both ends.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Exact, case-sensitive value.
    #[serde(default)]
    pub exact: Option<String>,
    /// Role templates; `\1`..`\9` are the pattern's capture groups.
    pub roles: Vec<String>,
    /// Allowed databases; absent means any.
    #[serde(default)]
    pub databases: Option<Vec<String>>,
    #[serde(default)]
    pub backend_auth: BackendAuth,
    /// Which walsender connections the rule allows; none by default.
    #[serde(default)]
    pub replication: ReplicationRule,
}

/// The `replication` key of a rule: which walsender connections
/// (startup parameter `replication`) it allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationRule {
    /// Ordinary sessions only.
    #[default]
    None,
    /// Physical walsenders (database "replication" in `databases`, if listed).
    Physical,
    /// Logical walsenders (`replication=database`) on the rule's databases.
    Logical,
    /// Both kinds.
    Any,
}

/// How the proxy logs into the backend for a certificate-authenticated client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendAuth {
    /// The backend's own authentication runs, relayed to the client.
    #[default]
    Passthrough,
    /// The certificate is the authentication: the proxy logs in as the
    /// role itself (backend mTLS or `[backend.credentials]`).
    Proxy,
}

impl BackendAuth {
    /// The key's value, also the audit event's `backend_auth`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendAuth::Passthrough => "passthrough",
            BackendAuth::Proxy => "proxy",
        }
    }
}

/// A secret for proxy-authenticated backend logins: read from a file or
/// an environment variable at start-up, never written inline in config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Client-facing `host:port`.
    pub address: String,
    /// The listen(2) backlog: connections the kernel queues before the
    /// proxy accepts them. Linux caps it at `net.core.somaxconn`.
    pub backlog: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain: leaf first, then intermediates.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Lowest TLS version offered: "1.2" or "1.3".
    pub min_version: TlsVersion,
    /// Accept plaintext startups. Off by default: a security downgrade.
    pub allow_plaintext: bool,
    /// Refuse TLS 1.2 handshakes without the extended master secret
    /// extension (RFC 7627; RFC 9325 makes it a MUST). PostgreSQL does not
    /// require it.
    pub require_ems: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backend {
    /// PostgreSQL server `host:port`.
    pub address: String,
    /// libpq vocabulary: disable, require, verify-ca, verify-full.
    pub sslmode: SslMode,
    /// CA bundle that signs the backend's certificate.
    pub sslrootcert: Option<PathBuf>,
    /// The proxy's own client certificate chain (backend mTLS).
    pub sslcert: Option<PathBuf>,
    /// Key for `sslcert`.
    pub sslkey: Option<PathBuf>,
    /// Which links present `sslcert`: "proxy_logins" (sessions of
    /// `backend_auth = "proxy"` rules, and cancels) or "all".
    pub sslcert_scope: SslCertScope,
    /// Name checked against the backend certificate and sent as SNI;
    /// defaults to the host part of `address`.
    pub server_name: Option<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Per-role secrets for `backend_auth = "proxy"` rules, by role name.
    pub credentials: std::collections::BTreeMap<String, Credential>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SslCertScope {
    #[default]
    ProxyLogins,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// One deadline from accept until the backend has been reached:
    /// negotiation, TLS handshake, startup packet and backend connect.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// The whole login after the backend was reached (relayed or the
    /// proxy's own), as PostgreSQL's authentication_timeout.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Client connections held at once; 0 means no limit.
    pub max_connections: usize,
    /// Full TLS handshakes in progress at once; further clients wait (under
    /// their handshake deadline). Bounds the CPU a handshake flood takes.
    pub max_handshakes_in_flight: usize,
    /// Close relayed sessions idle (no bytes either way) this long, with
    /// FATAL 57P05. Off when absent.
    #[serde(with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// How long SIGTERM waits for sessions to end on their own.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// tracing filter, e.g. "info" or "pg_tls_proxy=debug"; RUST_LOG wins.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: "127.0.0.1:6432".into(),
            backlog: 1024,
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: None,
            key: None,
            min_version: TlsVersion::V1_2,
            allow_plaintext: false,
            require_ems: true,
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            address: "127.0.0.1:5432".into(),
            sslmode: SslMode::Disable,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            sslcert_scope: SslCertScope::ProxyLogins,
            server_name: None,
            connect_timeout: Duration::from_secs(5),
            credentials: Default::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_handshakes_in_flight: 256,
            idle_timeout: None,
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace_period: Duration::from_secs(30),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// A configuration error: always names the key, and the file when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}", parse_text(.0))]
    Parse(Box<figment::Error>),
    #[error("config file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: {reason}{}", origin.as_ref().map(|p| format!(" (in {})", p.display())).unwrap_or_default())]
    Invalid {
        key: &'static str,
        reason: String,
        origin: Option<PathBuf>,
    },
}

/// `host:port` or `[v6]:port`, with a numeric port.
fn has_port(address: &str) -> bool {
    match address.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok()
                && (!host.contains(':') || host.starts_with('['))
        }
        None => false,
    }
}

fn is_loopback(address: &str) -> bool {
    match address.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => address.starts_with("localhost:"),
    }
}

/// figment names keys under its profile ("default.backend.x"); operators
/// know them as "backend.x".
fn parse_text(e: &figment::Error) -> String {
    e.to_string().replace("key \"default.", "key \"")
}

impl Config {
    /// Loads defaults, then `file` (which must exist), then `PGTLS_*`.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // `Toml::file` would silently ignore a missing file.
            std::fs::metadata(path).map_err(|source| ConfigError::File {
                path: path.to_path_buf(),
                source,
            })?;
            fig = fig.merge(Toml::file_exact(path));
        }
        // `PGTLS_CONFIG` names the file; it is not a key.
        fig = fig.merge(Env::prefixed("PGTLS_").split("__").ignore(&["config"]));
        let config: Config = fig.extract().map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate(file)?;
        Ok(config)
    }

    /// Parses a TOML string only (tests and `explain`-style tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
        let config: Config = fig.extract().map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate(None)?;
        Ok(config)
    }

    /// Checks what serde cannot: combinations of keys. Files are read later.
    pub fn validate(&self, origin: Option<&Path>) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.to_string(),
            origin: origin.map(Path::to_path_buf),
        };
        for (key, address) in [
            ("listen.address", &self.listen.address),
            ("backend.address", &self.backend.address),
            ("admin.address", &self.admin.address),
        ] {
            if !has_port(address) {
                return Err(invalid(
                    key,
                    &format!("{address:?} must be host:port (e.g. 127.0.0.1:5432, [::1]:5432)"),
                ));
            }
        }
        match (&self.tls.cert, &self.tls.key) {
            (None, None) if !self.tls.allow_plaintext => {
                return Err(invalid(
                    "tls.cert",
                    "a server certificate and key are required (or set tls.allow_plaintext = true)",
                ))
            }
            (Some(_), None) => {
                return Err(invalid("tls.key", "tls.cert is set but tls.key is not"))
            }
            (None, Some(_)) => {
                return Err(invalid("tls.cert", "tls.key is set but tls.cert is not"))
            }
            _ => {}
        }
        if self.backend.address.trim().is_empty() {
            return Err(invalid("backend.address", "must be host:port"));
        }
        let b = &self.backend;
        if b.sslmode == SslMode::Disable
            && (b.sslrootcert.is_some() || b.sslcert.is_some() || b.sslkey.is_some())
        {
            return Err(invalid(
                "backend.sslmode",
                "is \"disable\" but backend.sslrootcert/sslcert/sslkey are set; choose require, verify-ca or verify-full",
            ));
        }
        if matches!(b.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && b.sslrootcert.is_none() {
            return Err(invalid(
                "backend.sslrootcert",
                "is required when backend.sslmode is verify-ca or verify-full",
            ));
        }
        if b.sslcert.is_some() != b.sslkey.is_some() {
            return Err(invalid(
                "backend.sslkey",
                "backend.sslcert and backend.sslkey must be given together",
            ));
        }
        let ca = &self.client_auth;
        match ca.effective_mode() {
            ClientAuthMode::None if !self.rules.is_empty() => {
                return Err(invalid(
                    "client_auth.mode",
                    "[[rules]] are given but client certificates are not requested; set client_auth.mode and client_auth.ca",
                ))
            }
            ClientAuthMode::None if !ca.crl.is_empty() => {
                return Err(invalid("client_auth.crl", "is set but client_auth.mode is none"))
            }
            ClientAuthMode::Optional | ClientAuthMode::Required if ca.ca.is_empty() => {
                return Err(invalid(
                    "client_auth.ca",
                    "is required when client_auth.mode is optional or required",
                ))
            }
            _ => {}
        }
        if (ca.effective_mode() != ClientAuthMode::None) && self.tls.cert.is_none() {
            return Err(invalid(
                "tls.cert",
                "client certificates need TLS: set tls.cert and tls.key",
            ));
        }
        for (role, c) in &b.credentials {
            if c.password_file.is_some() == c.password_env.is_some() {
                return Err(ConfigError::Invalid {
                    key: "backend.credentials",
                    reason: format!("{role}: give exactly one of password_file or password_env"),
                    origin: origin.map(Path::to_path_buf),
                });
            }
        }
        if self.admin.enabled && !self.admin.allow_non_loopback && !is_loopback(&self.admin.address)
        {
            return Err(invalid(
                "admin.address",
                "is not a loopback address; set admin.allow_non_loopback = true to expose metrics and readiness beyond this host",
            ));
        }
        if self.listen.backlog == 0 {
            return Err(invalid("listen.backlog", "must be greater than 0"));
        }
        if self.limits.max_handshakes_in_flight == 0 {
            return Err(invalid(
                "limits.max_handshakes_in_flight",
                "must be at least 1",
            ));
        }
        if self.limits.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(invalid(
                "limits.idle_timeout",
                "must be greater than 0 (omit it to turn it off)",
            ));
        }
        if self.limits.auth_timeout.is_zero() {
            return Err(invalid("limits.auth_timeout", "must be greater than 0"));
        }
        if self.limits.handshake_timeout.is_zero() {
            return Err(invalid(
                "limits.handshake_timeout",
                "must be greater than 0",
            ));
        }
        if b.connect_timeout.is_zero() {
            return Err(invalid("backend.connect_timeout", "must be greater than 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_certificate() {
        let err = Config::from_toml("").expect_err("must fail").to_string();
        assert!(err.contains("tls.cert"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[backend]\nadress = \"x:1\"\n")
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("adress"), "{err}");
    }

    #[test]
    fn durations_and_modes_parse() {
        let c = Config::from_toml(
            "[tls]\ncert='a'\nkey='b'\n[backend]\nsslmode='verify-full'\nsslrootcert='c'\n[limits]\nhandshake_timeout='3s'\n",
        )
        .expect("valid");
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(3));
        assert_eq!(c.backend.sslmode, SslMode::VerifyFull);
    }

    #[test]
    fn reference_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pg-tls-proxy.toml");
        let c = Config::load(Some(&path)).expect("the reference config is valid");
        assert_eq!(c.listen.address, "127.0.0.1:6432");
    }

    #[test]
    fn client_auth_modes() {
        let base = "[tls]\ncert='a'\nkey='b'\n";
        let c = Config::from_toml(&format!("{base}[client_auth]\nca='ca.pem'\n")).expect("valid");
        assert_eq!(c.client_auth.effective_mode(), ClientAuthMode::Required);
        assert_eq!(c.client_auth.ca, vec![PathBuf::from("ca.pem")]);
        let c = Config::from_toml(&format!(
            "{base}[client_auth]\nmode='optional'\nca=['a.pem','b.pem']\n"
        ))
        .expect("valid");
        assert_eq!(c.client_auth.ca.len(), 2);
        let err = Config::from_toml(&format!("{base}[client_auth]\nmode='required'\n"))
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("client_auth.ca"), "{err}");
        let err = Config::from_toml(&format!(
            "{base}[[rules]]\nidentity='cn'\nexact='a'\nroles=['a']\n"
        ))
        .expect_err("must fail")
        .to_string();
        assert!(err.contains("client_auth.mode"), "{err}");
    }

    #[test]
    fn addresses_need_a_port() {
        let base = "[tls]\ncert='a'\nkey='b'\n";
        let err = Config::from_toml(&format!("{base}[backend]\naddress='127.0.0.1'\n"))
            .expect_err("no port")
            .to_string();
        assert!(err.contains("backend.address"), "{err}");
        assert!(Config::from_toml(&format!("{base}[backend]\naddress='[::1]:5432'\n")).is_ok());
        assert!(
            Config::from_toml(&format!("{base}[backend]\naddress='db.internal:5432'\n")).is_ok()
        );
        assert!(Config::from_toml(&format!("{base}[backend]\naddress='::1'\n")).is_err());
    }

    #[test]
    fn verify_full_requires_root() {
        let err =
            Config::from_toml("[tls]\nallow_plaintext=true\n[backend]\nsslmode='verify-full'\n")
                .expect_err("must fail")
                .to_string();
        assert!(err.contains("backend.sslrootcert"), "{err}");
    }
}
