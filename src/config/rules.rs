//! `[[rules]]`: ordered certificate-identity → role rules, as written.
//! [`crate::policy::rolemap`] compiles and applies them.

use serde::{Deserialize, Serialize};

/// One `[[rules]]` entry; see [`crate::policy::rolemap`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub identity: IdentityKind,
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

/// The kinds of identity a rule can match, as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    Cn,
    Dn,
    Dns,
    Email,
    Uri,
    Ip,
}

impl IdentityKind {
    pub const ALL: [IdentityKind; 6] = [
        IdentityKind::Cn,
        IdentityKind::Dn,
        IdentityKind::Dns,
        IdentityKind::Email,
        IdentityKind::Uri,
        IdentityKind::Ip,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Cn => "cn",
            IdentityKind::Dn => "dn",
            IdentityKind::Dns => "dns",
            IdentityKind::Email => "email",
            IdentityKind::Uri => "uri",
            IdentityKind::Ip => "ip",
        }
    }
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
