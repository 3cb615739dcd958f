//! Configuration: built-in defaults, then the TOML file given by `--config`,
//! then `PGTLS_` environment variables (`__` separates nesting levels).
//!
//! This module owns the shape of the configuration and its validation. It
//! never opens sockets; reading certificate files happens in [`crate::tls`]
//! and [`crate::backend`], which report errors against the key named here.
//! Unknown keys are errors: a typo must never silently fall back to a default.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod backend;
mod fleet;
mod ops;
mod routes;
mod rules;
mod scram;
mod tls;

pub use backend::{Backend, SecretSource, SslCertScope, SslMode};
pub use fleet::{Fleet, ReplicaId, MAX_REPLICA_ID};
pub use ops::{Admin, Limits, Listen, Log, LogFormat, ProxyProtocol, Reload, Shutdown};
pub use routes::{RouteConfig, Routing, DEFAULT_ROUTE};
pub use rules::{BackendAuth, IdentityKind, ReplicationRule, RuleConfig};
pub use scram::{AuthQuery, Scram, DEFAULT_AUTH_QUERY};
pub use tls::{CertKey, ClientAuth, ClientAuthMode, CrlCheck, CrlExpired, Tls, TlsVersion};

/// A section's own check: the key at fault and why.
type Check = Result<(), (&'static str, String)>;

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
    pub scram: Scram,
    /// Replicas that send each other cancels (`[fleet]`); absent: a lone proxy.
    pub fleet: Option<Fleet>,
    /// More backends behind the same listener, chosen by server name
    /// (`[[routes]]`); the top-level tables are the route "default".
    pub routes: Vec<RouteConfig>,
    pub routing: Routing,
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
    #[error("{key}: {reason}{}", origin.as_ref().map(|o| format!(" ({o})")).unwrap_or_default())]
    Invalid {
        key: &'static str,
        reason: String,
        /// Where the value came from ("in FILE", "from environment
        /// variable PGTLS_…"), or where it may be set when it is set nowhere.
        origin: Option<String>,
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

/// The host part of `host:port` or `[v6]:port`.
pub fn host_of(address: &str) -> &str {
    match address.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => address,
    }
}

fn is_loopback(address: &str) -> bool {
    match address.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        Err(_) => address.starts_with("localhost:"),
    }
}

/// figment names keys under its profile ("default.backend.x"); operators
/// know them as "backend.x". Its unknown-field text quotes a list of quoted
/// names ("expected `one of `a`, `b``"): one level of quotes is enough.
fn parse_text(e: &figment::Error) -> String {
    e.to_string()
        .replace("key \"default.", "key \"")
        .replace("expected `one of `", "expected one of `")
        .replace("``", "`")
}

/// `PGTLS_*` variables (`__` between levels; `PGTLS_CONFIG` names the file
/// and is not a key), named in errors as the operator set them
/// (`PGTLS_LISTEN__WORKERS`), not as figment's keys (`LISTEN.WORKERS`).
struct EnvVars(Env);

impl EnvVars {
    const NAME: &'static str = "the environment";

    fn new() -> EnvVars {
        EnvVars(Env::prefixed("PGTLS_").split("__").ignore(&["config"]))
    }

    /// The variable that sets `key` ("listen.workers"). A key that names
    /// a table (figment reports an unknown one, `PGTLS_BOGUS__KEY`, by its
    /// first level) is named by the variables set under it.
    fn var(key: &str) -> String {
        let name = format!("PGTLS_{}", key.replace('.', "__").to_ascii_uppercase());
        if std::env::var_os(&name).is_some() {
            return name;
        }
        let table = format!("{name}__");
        let mut under: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.to_ascii_uppercase().starts_with(&table))
            .collect();
        under.sort();
        if under.is_empty() {
            name
        } else {
            under.join(", ")
        }
    }
}

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(Self::NAME)
            .interpolater(|_, keys: &[&str]| EnvVars::var(&keys.join(".")))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.0.data()
    }

    fn profile(&self) -> Option<figment::Profile> {
        figment::Provider::profile(&self.0)
    }
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
        fig = fig.merge(EnvVars::new());
        let config: Config = fig.extract().map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate(file).map_err(|e| match e {
            ConfigError::Invalid { key, reason, .. } => {
                let origin = Some(Self::origin(&fig, key, file));
                ConfigError::Invalid {
                    key,
                    reason,
                    origin,
                }
            }
            e => e,
        })?;
        Ok(config)
    }

    /// Where `key`'s value came from, for an error about it: the file, the
    /// environment variable (not the file's fault), or nowhere (a key
    /// another one requires: where it may be set).
    fn origin(fig: &Figment, key: &str, file: Option<&Path>) -> String {
        let meta = fig.find_metadata(key);
        if meta.is_some_and(|m| m.name == EnvVars::NAME) {
            return format!("from environment variable {}", EnvVars::var(key));
        }
        // The one file merged is `file`.
        let from_file = meta.is_some_and(|m| matches!(&m.source, Some(figment::Source::File(_))));
        let place = file.map_or("the config file".into(), |p| p.display().to_string());
        if from_file {
            format!("in {place}")
        } else {
            format!("not set: set it in {place} or as {}", EnvVars::var(key))
        }
    }

    /// Parses a TOML string only (tests and `explain`-style tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let fig = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text));
        let config: Config = fig.extract().map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate(None)?;
        Ok(config)
    }

    /// Checks what serde cannot: each section's own rules, then the
    /// rules that span sections. Files are read later.
    pub fn validate(&self, origin: Option<&Path>) -> Result<(), ConfigError> {
        let invalid = |(key, reason): (&'static str, String)| ConfigError::Invalid {
            key,
            reason,
            origin: origin.map(|p| format!("in {}", p.display())),
        };
        for (key, address) in [
            ("listen.address", &self.listen.address),
            ("backend.address", &self.backend.address),
            ("admin.address", &self.admin.address),
        ] {
            if !has_port(address) {
                return Err(invalid((
                    key,
                    format!("{address:?} must be host:port (e.g. 127.0.0.1:5432, [::1]:5432)"),
                )));
            }
        }
        self.listen.check().map_err(invalid)?;
        self.tls.check().map_err(invalid)?;
        self.backend.check().map_err(invalid)?;
        self.admin.check().map_err(invalid)?;
        self.limits.check().map_err(invalid)?;
        self.scram.check().map_err(invalid)?;
        routes::check(&self.routes).map_err(invalid)?;
        if !self.routes.is_empty() && self.tls.server.is_none() {
            return Err(invalid((
                "tls.cert",
                "[[routes]] need TLS: set tls.cert and tls.key (served to clients without a server name)".into(),
            )));
        }
        if let Some(fleet) = &self.fleet {
            fleet.check().map_err(invalid)?;
            if fleet.listen == self.listen.address {
                return Err(invalid((
                    "fleet.listen",
                    "must differ from listen.address: peers have their own listener".into(),
                )));
            }
        }
        // Across sections.
        let mode = self.client_auth.effective_mode();
        if mode == ClientAuthMode::None && !self.rules.is_empty() {
            return Err(invalid((
                "client_auth.mode",
                "[[rules]] are given but client certificates are not requested; set client_auth.mode and client_auth.ca".into(),
            )));
        }
        self.client_auth.check().map_err(invalid)?;
        if mode != ClientAuthMode::None && self.tls.server.is_none() {
            return Err(invalid((
                "tls.cert",
                "client certificates need TLS: set tls.cert and tls.key".into(),
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    fn session_threads_are_bounded() {
        let base = "[tls]\ncert='a'\nkey='b'\n[listen]\n";
        let c = Config::from_toml(&format!("{base}workers = 256\n")).expect("valid");
        assert_eq!(c.listen.workers, 256);
        let err = Config::from_toml(&format!("{base}workers = 9990\n"))
            .expect_err("too many")
            .to_string();
        assert!(err.contains("listen.workers: must be at most 256"), "{err}");
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

    /// Pairs are one value: half a pair is an error that names the
    /// missing key, wherever it was written.
    #[test]
    fn pairs_are_whole() {
        let err = Config::from_toml("[tls]\ncert='a'\n")
            .expect_err("key missing")
            .to_string();
        assert!(
            err.contains("tls.key: tls.cert is set but tls.key is not"),
            "{err}"
        );
        let err = Config::from_toml("[tls]\nallow_plaintext=true\nkey='b'\n")
            .expect_err("cert missing")
            .to_string();
        assert!(
            err.contains("tls.cert: tls.key is set but tls.cert is not"),
            "{err}"
        );
        let base = "[tls]\ncert='a'\nkey='b'\n";
        let err = Config::from_toml(&format!(
            "{base}[backend]\nsslmode='require'\nsslcert='c'\n"
        ))
        .expect_err("sslkey missing")
        .to_string();
        assert!(err.contains("backend.sslkey"), "{err}");
        let c = Config::from_toml(&format!(
            "{base}[backend]\nsslmode='require'\nsslcert='c'\nsslkey='d'\n"
        ))
        .expect("valid");
        assert_eq!(
            c.backend.client_cert,
            Some(CertKey {
                cert: "c".into(),
                key: "d".into()
            })
        );
        for bad in ["password_file='/x'\npassword_env='Y'", ""] {
            let err = Config::from_toml(&format!("{base}[backend.credentials.web]\n{bad}\n"))
                .expect_err("one source exactly")
                .to_string();
            assert!(
                err.contains("exactly one of password_file or password_env"),
                "{err}"
            );
            assert!(err.contains("backend.credentials.web"), "{err}");
        }
        let c = Config::from_toml(&format!(
            "{base}[backend.credentials.web]\npassword_env='WEB_PW'\n"
        ))
        .expect("valid");
        assert_eq!(
            c.backend.credentials.get("web"),
            Some(&SecretSource::Env("WEB_PW".into()))
        );
    }
}
