//! `[fleet]`: several replicas behind one load balancer. Each replica has
//! an id that its cancel keys carry; a CancelRequest that reaches the
//! wrong replica is sent on to the right one over an mTLS link between
//! replicas. Only a restart changes these keys (ids are in keys already
//! handed out); the certificates reload like the others.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::backend::SecretSource;
use super::{has_port, Check};

/// Replica ids a protocol 3.0 cancel key can carry (6 bits of its secret).
pub const MAX_REPLICA_ID: u8 = 63;

/// `[fleet]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fleet {
    /// 0..=63, or "ordinal": the number at the end of the host name
    /// (a StatefulSet pod `pg-tls-proxy-2` is replica 2).
    pub replica_id: ReplicaId,
    /// Where this replica accepts cancels from the others (mTLS).
    pub listen: String,
    /// The other replicas' peer listeners, `host:port`. A name that
    /// resolves to several addresses (a headless Service) stands for all
    /// of them; the list may include this replica (it is recognised).
    pub peers: Vec<String>,
    /// This replica's certificate chain and key, presented to peers in
    /// both directions.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA(s) that sign replica certificates; use one for the fleet
    /// alone: any certificate it signed may send cancels.
    #[serde(deserialize_with = "super::tls::one_or_many")]
    pub ca: Vec<PathBuf>,
    /// The name every peer's certificate must carry; the host of the
    /// `peers` entry when unset.
    pub server_name: Option<String>,
    /// The key shared by every replica that authenticates protocol 3.2
    /// cancel keys (`{ password_file = ".." }` or `{ password_env = ".." }`,
    /// at least 32 bytes).
    pub cancel_key: Option<SecretSource>,
    /// A second key whose protocol 3.2 keys are accepted, never used to
    /// issue: the next key before a rotation, the previous one after it
    /// (README "Fleets").
    pub accept_cancel_key: Option<SecretSource>,
    /// Connect, handshake and send to a peer, and a peer's whole request.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How often `peers` names are resolved again (new replicas, new
    /// addresses); an unknown replica id also triggers it.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            replica_id: ReplicaId::Fixed(0),
            listen: "0.0.0.0:6433".into(),
            peers: Vec::new(),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ca: Vec::new(),
            server_name: None,
            cancel_key: None,
            accept_cancel_key: None,
            timeout: Duration::from_secs(2),
            refresh_interval: Duration::from_secs(30),
        }
    }
}

/// A replica id as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplicaId {
    Fixed(u8),
    /// Only "ordinal" is valid.
    Named(String),
}

impl ReplicaId {
    /// The id, reading the host name for "ordinal".
    pub fn resolve(&self, hostname: &str) -> Result<u8, String> {
        let id = match self {
            ReplicaId::Fixed(id) => *id,
            ReplicaId::Named(_) => {
                let digits = hostname
                    .rsplit_once('-')
                    .map(|(_, n)| n)
                    .unwrap_or_default();
                digits.parse::<u8>().map_err(|_| {
                    format!("\"ordinal\": the host name {hostname:?} does not end in -<number> (a StatefulSet pod's name does)")
                })?
            }
        };
        if id > MAX_REPLICA_ID {
            return Err(format!(
                "replica id {id} is above {MAX_REPLICA_ID} (6 bits of a protocol 3.0 cancel key)"
            ));
        }
        Ok(id)
    }
}

impl Fleet {
    pub(crate) fn check(&self) -> Check {
        if let ReplicaId::Named(name) = &self.replica_id {
            if name != "ordinal" {
                return Err((
                    "fleet.replica_id",
                    format!("{name:?}: give a number (0..={MAX_REPLICA_ID}) or \"ordinal\""),
                ));
            }
        }
        if let ReplicaId::Fixed(id) = self.replica_id {
            if id > MAX_REPLICA_ID {
                return Err((
                    "fleet.replica_id",
                    format!("{id} is above {MAX_REPLICA_ID}"),
                ));
            }
        }
        if !has_port(&self.listen) {
            return Err((
                "fleet.listen",
                format!("{:?} must be host:port", self.listen),
            ));
        }
        if let Some(bad) = self.peers.iter().find(|p| !has_port(p)) {
            return Err((
                "fleet.peers",
                format!("{bad:?} must be host:port (a name may resolve to several replicas)"),
            ));
        }
        for (key, value) in [("fleet.cert", &self.cert), ("fleet.key", &self.key)] {
            if value.as_os_str().is_empty() {
                return Err((
                    key,
                    "is required: the replica's certificate for its peers".into(),
                ));
            }
        }
        if self.ca.is_empty() {
            return Err((
                "fleet.ca",
                "is required: the CA that signs the replicas' certificates".into(),
            ));
        }
        if self.cancel_key.is_none() {
            return Err((
                "fleet.cancel_key",
                "is required: a secret every replica shares ({ password_file = \"..\" })".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(("fleet.timeout", "must be greater than 0".into()));
        }
        if self.refresh_interval.is_zero() {
            return Err(("fleet.refresh_interval", "must be greater than 0".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals() {
        let ordinal = ReplicaId::Named("ordinal".into());
        assert_eq!(ordinal.resolve("pg-tls-proxy-2"), Ok(2));
        assert_eq!(ordinal.resolve("a-b-63"), Ok(63));
        assert!(ordinal.resolve("pg-tls-proxy-64").is_err());
        assert!(ordinal.resolve("pg-tls-proxy").is_err());
        assert!(ordinal.resolve("web-7f9c").is_err());
        assert_eq!(ReplicaId::Fixed(5).resolve("anything"), Ok(5));
    }
}
