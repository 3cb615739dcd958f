//! `[scram]`: SCRAM-SHA-256(-PLUS) terminated at the proxy for password
//! logins, and where the verifiers come from.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::backend::{Backend, SecretSource};
use super::Check;

/// `[scram]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scram {
    /// Run SCRAM with password clients at the proxy (verifying them against
    /// a stored verifier) and then with the backend, from the key the
    /// client proved. Off: the backend's authentication is relayed.
    pub terminate: bool,
    /// Verifiers in PgBouncer's userlist.txt format:
    /// `"user" "SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>"`.
    pub auth_file: Option<PathBuf>,
    /// The secret that derives the salts of the mock exchange for unknown
    /// users: `{ password_file = ".." }` or `{ password_env = ".." }`. Give
    /// every replica the same one; without it a random per-process secret
    /// is used (and a restart changes what unknown users see).
    pub mock_secret: Option<SecretSource>,
    /// Verifiers looked up in the backend for users the auth_file does not
    /// list (`[scram.auth_query]`).
    pub auth_query: Option<AuthQuery>,
}

/// `[scram.auth_query]`: a query run on a dedicated backend link, as a
/// low-privilege role, with the user name as its only parameter.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthQuery {
    /// The role the lookup logs in as.
    pub user: String,
    /// Its password, when the backend asks for one.
    pub password: Option<SecretSource>,
    pub database: String,
    /// Returns (name, verifier) for `$1`; a NULL verifier or no row means
    /// no such user. The default honours NOLOGIN and VALID UNTIL; the
    /// SECURITY DEFINER function in README is the recommended one.
    pub query: String,
    /// How long a verifier found is reused.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long "no such user" is remembered.
    #[serde(with = "humantime_serde")]
    pub miss_ttl: Duration,
    /// Users cached at once (hits and misses).
    pub max_cached: usize,
    /// The link's own settings, in `[backend]`'s keys; `[backend]`'s when
    /// absent.
    pub link: Option<Backend>,
}

/// PgBouncer 1.24.1's safe default, schema-qualified: no verifier for a
/// NOLOGIN role or one past VALID UNTIL.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname::text, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword END FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin";

impl Default for AuthQuery {
    fn default() -> Self {
        AuthQuery {
            user: String::new(),
            password: None,
            database: "postgres".into(),
            query: DEFAULT_AUTH_QUERY.into(),
            cache_ttl: Duration::from_secs(60),
            miss_ttl: Duration::from_secs(10),
            max_cached: 10_000,
            link: None,
        }
    }
}

impl Scram {
    pub(crate) fn check(&self) -> Check {
        if self.terminate && self.auth_file.is_none() && self.auth_query.is_none() {
            return Err((
                "scram.auth_file",
                "scram.terminate = true needs verifiers: set scram.auth_file or [scram.auth_query]"
                    .into(),
            ));
        }
        if let Some(q) = &self.auth_query {
            if q.user.is_empty() {
                return Err(("scram.auth_query.user", "is required".into()));
            }
            if !q.query.contains("$1") {
                return Err((
                    "scram.auth_query.query",
                    "must take the user name as $1 (never paste it into the text)".into(),
                ));
            }
            if q.max_cached == 0 || q.cache_ttl.is_zero() {
                return Err((
                    "scram.auth_query.cache_ttl",
                    "cache_ttl and max_cached must be greater than 0".into(),
                ));
            }
        }
        Ok(())
    }
}
