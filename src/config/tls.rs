//! `[tls]` (the client-facing certificate and protocol versions) and
//! `[client_auth]` (client certificates: CAs, CRLs, mode).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Check;

/// A certificate chain and its private key: two keys in the file, one
/// value here, so that one without the other cannot be represented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKey {
    /// PEM certificate chain: leaf first, then intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl CertKey {
    /// Pairs two optional keys; `names` are the keys as written, for the
    /// error.
    pub(crate) fn pair(
        names: (&str, &str),
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<CertKey>, String> {
        let (cert_name, key_name) = names;
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(CertKey { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(format!(
                "{key_name}: {cert_name} is set but {key_name} is not"
            )),
            (None, Some(_)) => Err(format!(
                "{cert_name}: {key_name} is set but {cert_name} is not"
            )),
        }
    }

    pub(crate) fn split(pair: Option<CertKey>) -> (Option<PathBuf>, Option<PathBuf>) {
        match pair {
            Some(p) => (Some(p.cert), Some(p.key)),
            None => (None, None),
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "TlsKeys", into = "TlsKeys")]
pub struct Tls {
    /// `tls.cert` and `tls.key`: the server's chain and key.
    pub server: Option<CertKey>,
    /// Lowest TLS version offered: "1.2" or "1.3".
    pub min_version: TlsVersion,
    /// Accept plaintext startups. Off by default: a security downgrade.
    pub allow_plaintext: bool,
    /// Refuse TLS 1.2 handshakes without the extended master secret
    /// extension (RFC 7627; RFC 9325 makes it a MUST). PostgreSQL does not
    /// require it.
    pub require_ems: bool,
}

/// `[tls]` as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TlsKeys {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    min_version: TlsVersion,
    allow_plaintext: bool,
    require_ems: bool,
}

impl Default for TlsKeys {
    fn default() -> Self {
        Tls::default().into()
    }
}

impl TryFrom<TlsKeys> for Tls {
    type Error = String;
    fn try_from(k: TlsKeys) -> Result<Tls, String> {
        Ok(Tls {
            server: CertKey::pair(("tls.cert", "tls.key"), k.cert, k.key)?,
            min_version: k.min_version,
            allow_plaintext: k.allow_plaintext,
            require_ems: k.require_ems,
        })
    }
}

impl From<Tls> for TlsKeys {
    fn from(t: Tls) -> TlsKeys {
        let (cert, key) = CertKey::split(t.server);
        TlsKeys {
            cert,
            key,
            min_version: t.min_version,
            allow_plaintext: t.allow_plaintext,
            require_ems: t.require_ems,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            server: None,
            min_version: TlsVersion::V1_2,
            allow_plaintext: false,
            require_ems: true,
        }
    }
}

impl Tls {
    pub(crate) fn check(&self) -> Check {
        if self.server.is_none() && !self.allow_plaintext {
            return Err((
                "tls.cert",
                "a server certificate and key are required (or set tls.allow_plaintext = true)"
                    .into(),
            ));
        }
        Ok(())
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

impl ClientAuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthMode::None => "none",
            ClientAuthMode::Optional => "optional",
            ClientAuthMode::Required => "required",
        }
    }
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

    pub(crate) fn check(&self) -> Check {
        match self.effective_mode() {
            ClientAuthMode::None if !self.crl.is_empty() => Err((
                "client_auth.crl",
                "is set but client_auth.mode is none".into(),
            )),
            ClientAuthMode::Optional | ClientAuthMode::Required if self.ca.is_empty() => Err((
                "client_auth.ca",
                "is required when client_auth.mode is optional or required".into(),
            )),
            _ => Ok(()),
        }
    }
}

pub(super) fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<PathBuf>, D::Error> {
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
