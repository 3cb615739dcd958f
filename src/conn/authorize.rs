//! The access decision for one startup: which client certificate (if any)
//! was verified, what the role rules say about it, and how the proxy will
//! log into the backend. Logged and counted here, once per session.
//!
//! Runs before any byte goes to the backend.

use tracing::{info, warn};

use crate::config::{BackendAuth, ClientAuthMode};
use crate::conn::error::SessionError;
use crate::metrics::Metrics;
use crate::policy::identity::Identity;
use crate::policy::rolemap::Decision;
use crate::runtime::Route;
use crate::wire::stream::ClientStream;
use crate::wire::Replication;

/// How the session may proceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No certificate: the backend's own authentication decides.
    Password,
    /// A verified certificate allowed by a rule.
    Certificate {
        identity: String,
        backend_auth: BackendAuth,
    },
}

pub fn authorize(
    rt: &Route,
    metrics: &Metrics,
    client: &ClientStream,
    user: &str,
    database: &str,
    replication: Replication,
) -> Result<Access, SessionError> {
    if rt.client_auth == ClientAuthMode::None {
        return Ok(Access::Password);
    }
    let Some(der) = client.peer_leaf() else {
        if rt.client_auth == ClientAuthMode::Required {
            // Only a plaintext client gets here: TLS already demanded one.
            return Err(SessionError::ClientCertRequired);
        }
        return Ok(Access::Password);
    };
    let identity =
        Identity::from_der(der).map_err(|e| SessionError::BadClientCertificate(e.to_string()))?;
    let decisions = &metrics.role_decisions;
    match rt.rolemap.decide(&identity, user, database, replication) {
        Decision::Allow {
            rule,
            kind,
            identity,
            backend_auth,
        } => {
            decisions
                .with_label_values(&["allowed", "allowed", kind.as_str()])
                .inc();
            info!(
                identity = %identity,
                identity_kind = kind.as_str(),
                role = user,
                database,
                replication = replication.as_str(),
                rule,
                backend_auth = ?backend_auth,
                "certificate allowed"
            );
            Ok(Access::Certificate {
                identity,
                backend_auth,
            })
        }
        Decision::Deny {
            reason,
            identity,
            kind,
        } => {
            let kind = kind.map_or("none", |k| k.as_str());
            decisions
                .with_label_values(&["denied", reason.as_str(), kind])
                .inc();
            warn!(
                identity = %identity,
                identity_kind = kind,
                role = user,
                database,
                replication = replication.as_str(),
                reason = reason.as_str(),
                "certificate denied"
            );
            Err(SessionError::RoleDenied {
                identity,
                user: user.to_string(),
                database: database.to_string(),
                reason,
            })
        }
    }
}
