//! `[scram]`: SCRAM-SHA-256(-PLUS) terminated at the proxy for password
//! logins, and where the verifiers come from.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::backend::SecretSource;
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
}

impl Scram {
    pub(crate) fn check(&self) -> Check {
        if self.terminate && self.auth_file.is_none() {
            return Err((
                "scram.auth_file",
                "is required when scram.terminate = true (the proxy needs the verifiers)".into(),
            ));
        }
        Ok(())
    }
}
