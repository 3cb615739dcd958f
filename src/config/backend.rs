//! `[backend]`: the PostgreSQL server, the link's TLS in libpq's sslmode
//! vocabulary, the proxy's own client certificate, and the secrets for
//! proxy logins.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::tls::CertKey;
use super::Check;

/// `[backend]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "BackendKeys", into = "BackendKeys")]
pub struct Backend {
    /// PostgreSQL server `host:port`.
    pub address: String,
    /// libpq vocabulary: disable, require, verify-ca, verify-full.
    pub sslmode: SslMode,
    /// CA bundle that signs the backend's certificate.
    pub sslrootcert: Option<PathBuf>,
    /// `sslcert` and `sslkey`: the proxy's own client certificate chain
    /// and key (backend mTLS).
    pub client_cert: Option<CertKey>,
    /// Which links present the client certificate: "proxy_logins"
    /// (sessions of `backend_auth = "proxy"` rules, and cancels) or "all".
    pub sslcert_scope: SslCertScope,
    /// Name checked against the backend certificate and sent as SNI;
    /// defaults to the host part of `address`.
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    /// Per-role secrets for `backend_auth = "proxy"` rules, by role name.
    pub credentials: BTreeMap<String, SecretSource>,
}

/// `[backend]` as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct BackendKeys {
    address: String,
    sslmode: SslMode,
    sslrootcert: Option<PathBuf>,
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
    sslcert_scope: SslCertScope,
    server_name: Option<String>,
    #[serde(with = "humantime_serde")]
    connect_timeout: Duration,
    credentials: BTreeMap<String, SecretSource>,
}

impl Default for BackendKeys {
    fn default() -> Self {
        Backend::default().into()
    }
}

impl TryFrom<BackendKeys> for Backend {
    type Error = String;
    fn try_from(k: BackendKeys) -> Result<Backend, String> {
        Ok(Backend {
            client_cert: CertKey::pair(("backend.sslcert", "backend.sslkey"), k.sslcert, k.sslkey)
                .map_err(|_| {
                    "backend.sslkey: backend.sslcert and backend.sslkey must be given together"
                        .to_string()
                })?,
            address: k.address,
            sslmode: k.sslmode,
            sslrootcert: k.sslrootcert,
            sslcert_scope: k.sslcert_scope,
            server_name: k.server_name,
            connect_timeout: k.connect_timeout,
            credentials: k.credentials,
        })
    }
}

impl From<Backend> for BackendKeys {
    fn from(b: Backend) -> BackendKeys {
        let (sslcert, sslkey) = CertKey::split(b.client_cert);
        BackendKeys {
            address: b.address,
            sslmode: b.sslmode,
            sslrootcert: b.sslrootcert,
            sslcert,
            sslkey,
            sslcert_scope: b.sslcert_scope,
            server_name: b.server_name,
            connect_timeout: b.connect_timeout,
            credentials: b.credentials,
        }
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            address: "127.0.0.1:5432".into(),
            sslmode: SslMode::Disable,
            sslrootcert: None,
            client_cert: None,
            sslcert_scope: SslCertScope::ProxyLogins,
            server_name: None,
            connect_timeout: Duration::from_secs(5),
            credentials: Default::default(),
        }
    }
}

impl Backend {
    pub(crate) fn check(&self) -> Check {
        if self.sslmode == SslMode::Disable
            && (self.sslrootcert.is_some() || self.client_cert.is_some())
        {
            return Err((
                "backend.sslmode",
                "is \"disable\" but backend.sslrootcert/sslcert/sslkey are set; choose require, verify-ca or verify-full".into(),
            ));
        }
        if matches!(self.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && self.sslrootcert.is_none()
        {
            return Err((
                "backend.sslrootcert",
                "is required when backend.sslmode is verify-ca or verify-full".into(),
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(("backend.connect_timeout", "must be greater than 0".into()));
        }
        Ok(())
    }
}

/// A secret read at start-up (and on reload), never written inline in
/// config: `password_file` or `password_env`, exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SecretKeys", into = "SecretKeys")]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// A secret as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretKeys {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password_env: Option<String>,
}

impl TryFrom<SecretKeys> for SecretSource {
    type Error = &'static str;
    fn try_from(k: SecretKeys) -> Result<SecretSource, &'static str> {
        match (k.password_file, k.password_env) {
            (Some(f), None) => Ok(SecretSource::File(f)),
            (None, Some(e)) => Ok(SecretSource::Env(e)),
            _ => Err("give exactly one of password_file or password_env"),
        }
    }
}

impl From<SecretSource> for SecretKeys {
    fn from(s: SecretSource) -> SecretKeys {
        match s {
            SecretSource::File(f) => SecretKeys {
                password_file: Some(f),
                password_env: None,
            },
            SecretSource::Env(e) => SecretKeys {
                password_file: None,
                password_env: Some(e),
            },
        }
    }
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
