//! Hot reload: SIGHUP, `POST /reload` on the admin listener, or a poll of
//! the files (`reload.poll_interval`). Every reload reads the config file
//! again, builds a whole new [`Runtime`] (key matches certificate, chains
//! and CRLs parse, rules compile), and only then swaps it in atomically.
//! On any error the old state stays, the error is logged with the file and
//! reason, and `pgtls_config_reloads_total{result="failure"}` moves.
//!
//! Established sessions keep the TLS state and settings they started with
//! and are never dropped; new connections use the new state. Keys that
//! need a restart (listen and admin addresses, connection and handshake
//! limits, grace period) are reported and left as they were.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, SecretSource};
use crate::conn::context::Context;
use crate::runtime::Runtime;

/// Applies a new log filter; `Err` names what was wrong with it.
pub type LogReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where reloads read from, and how the log filter is changed.
#[derive(Default)]
pub struct ReloadSource {
    /// The config file; `None` reloads from defaults and environment only.
    pub path: Option<PathBuf>,
    pub log: Option<LogReloader>,
}

type Fingerprint = Vec<Option<(std::time::SystemTime, u64, u64)>>;

pub struct Reloader {
    shared: Arc<Context>,
    source: ReloadSource,
    /// The config in force; also serializes reloads.
    current: Mutex<Config>,
    /// The watched files as the running state was built from them; taken
    /// at start-up, so a change made before the poll task first runs is
    /// still seen.
    loaded: std::sync::Mutex<Fingerprint>,
}

impl Reloader {
    pub fn new(shared: Arc<Context>, config: Config, source: ReloadSource) -> Reloader {
        let loaded = fingerprint(source.path.as_ref(), &config);
        Reloader {
            shared,
            source,
            current: Mutex::new(config),
            loaded: std::sync::Mutex::new(loaded),
        }
    }

    /// Reloads now; `Err` says why the old state was kept.
    pub async fn reload(&self) -> Result<(), String> {
        let mut current = self.current.lock().await;
        // Reading files and building every route's TLS config takes time
        // (10,000 routes: about a second): off the async worker when the
        // runtime has others to keep serving.
        let result = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.try_reload(&current))
            }
            _ => self.try_reload(&current),
        };
        let metrics = &self.shared.metrics;
        match result {
            Ok((config, runtime, pending)) => {
                for key in pending {
                    warn!(
                        key,
                        "changed in the config file, but applies only after a restart"
                    );
                }
                metrics.set_certificates(&runtime.certificates);
                self.shared.runtime.store(Arc::new(runtime));
                *current = config;
                metrics.config_reloads.with_label_values(&["success"]).inc();
                info!("configuration reloaded: new connections use the new certificates and rules");
                Ok(())
            }
            Err(e) => {
                metrics.config_reloads.with_label_values(&["failure"]).inc();
                error!("reload failed, keeping the running configuration: {e}");
                Err(e)
            }
        }
    }

    fn try_reload(&self, current: &Config) -> Result<(Config, Runtime, Vec<&'static str>), String> {
        let mut config = Config::load(self.source.path.as_deref()).map_err(|e| e.to_string())?;
        let pending = restart_needed(current, &config);
        // Keep what only a restart can change, so the swapped state and the
        // running listeners agree.
        config.listen = current.listen.clone();
        config.admin = current.admin.clone();
        // A fleet keeps its identity (ids are in keys handed out); its
        // certificates reload like the others.
        config.fleet = match (&current.fleet, config.fleet.take()) {
            (Some(old), Some(new)) => Some(crate::config::Fleet {
                cert: new.cert,
                key: new.key,
                ca: new.ca,
                ..old.clone()
            }),
            (old, _) => old.clone(),
        };
        let runtime = Runtime::build(&config).map_err(|e| e.to_string())?;
        if let Some(apply) = &self.source.log {
            if std::env::var_os("RUST_LOG").is_none() {
                apply(&runtime.log_level).map_err(|e| format!("log.level: {e}"))?;
            }
        }
        Ok((config, runtime, pending))
    }

    /// Reloads whenever one of the watched files changes. Cancel-safe.
    pub async fn poll(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.current_fingerprint().await;
            let changed = self.loaded.lock().map(|l| *l != now).unwrap_or(true);
            if changed {
                // Debounce: writers often touch several files in a row.
                tokio::time::sleep(every.min(Duration::from_millis(500))).await;
                info!("a watched file changed: reloading");
                let before = self.current_fingerprint().await;
                let _ = self.reload().await;
                // A failed reload is not retried until a file changes again.
                if let Ok(mut loaded) = self.loaded.lock() {
                    *loaded = before;
                }
            }
        }
    }

    async fn current_fingerprint(&self) -> Fingerprint {
        let current = self.current.lock().await;
        fingerprint(self.source.path.as_ref(), &current)
    }
}

fn fingerprint(config_path: Option<&PathBuf>, config: &Config) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    watched_files(config_path, config)
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

fn watched_files(config_path: Option<&PathBuf>, c: &Config) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = config_path.into_iter().cloned().collect();
    files.extend(c.scram.auth_file.iter().cloned());
    let auth_query_password = c
        .scram
        .auth_query
        .as_ref()
        .and_then(|q| q.password.as_ref());
    for source in c.scram.mock_secret.iter().chain(auth_query_password) {
        if let SecretSource::File(path) = source {
            files.push(path.clone());
        }
    }
    for pair in c.tls.server.iter().chain(&c.backend.client_cert) {
        files.extend([pair.cert.clone(), pair.key.clone()]);
    }
    files.extend(c.client_auth.ca.iter().cloned());
    for r in &c.routes {
        if let Some(pair) = r.cert_key() {
            files.extend([pair.cert, pair.key]);
        }
        if let Some(pair) = &r.backend.client_cert {
            files.extend([pair.cert.clone(), pair.key.clone()]);
        }
        files.extend(r.backend.sslrootcert.iter().cloned());
        if let Some(ca) = &r.client_auth {
            files.extend(ca.ca.iter().chain(&ca.crl).cloned());
        }
    }
    if let Some(f) = &c.fleet {
        files.extend([f.cert.clone(), f.key.clone()]);
        files.extend(f.ca.iter().cloned());
    }
    files.extend(c.client_auth.crl.iter().cloned());
    files.extend(c.backend.sslrootcert.iter().cloned());
    files.extend(c.backend.credentials.values().filter_map(|c| match c {
        SecretSource::File(path) => Some(path.clone()),
        SecretSource::Env(_) => None,
    }));
    files
}

fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.listen, &new.listen);
    let changed = [
        ("listen.address", o.address != n.address),
        ("listen.workers", o.workers != n.workers),
        ("listen.backlog", o.backlog != n.backlog),
        (
            "listen.proxy_protocol",
            o.proxy_protocol != n.proxy_protocol,
        ),
        ("listen.proxy_trusted", o.proxy_trusted != n.proxy_trusted),
        (
            "admin.address",
            old.admin.address != new.admin.address || old.admin.enabled != new.admin.enabled,
        ),
        (
            "limits.max_connections",
            old.limits.max_connections != new.limits.max_connections,
        ),
        (
            "limits.max_handshakes_in_flight",
            old.limits.max_handshakes_in_flight != new.limits.max_handshakes_in_flight,
        ),
        (
            "shutdown.grace_period",
            old.shutdown.grace_period != new.shutdown.grace_period,
        ),
        (
            "reload.poll_interval",
            old.reload.poll_interval != new.reload.poll_interval,
        ),
    ];
    let mut keys: Vec<&'static str> = changed
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect();
    let identity = |f: &Option<crate::config::Fleet>| {
        f.as_ref().map(|f| {
            (
                f.replica_id.clone(),
                f.listen.clone(),
                f.peers.clone(),
                f.server_name.clone(),
                f.cancel_key.clone(),
                f.accept_cancel_key.clone(),
                f.timeout,
                f.refresh_interval,
            )
        })
    };
    if identity(&old.fleet) != identity(&new.fleet) {
        keys.push("fleet");
    }
    keys
}

impl super::admin::Reload for Arc<Reloader> {
    async fn reload(&self) -> Result<(), String> {
        Reloader::reload(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `[listen]` key is restart-only, and a reload says which.
    #[test]
    fn restart_only_keys_are_named() {
        let base = "[tls]\ncert='a'\nkey='b'\n";
        let old = Config::from_toml(base).expect("valid");
        let new = Config::from_toml(&format!(
            "{base}[listen]\nbacklog = 50\nworkers = 1\nproxy_protocol = 'required'\nproxy_trusted = ['10.0.0.0/8']\n"
        ))
        .expect("valid");
        assert_eq!(
            restart_needed(&old, &new),
            [
                "listen.workers",
                "listen.backlog",
                "listen.proxy_protocol",
                "listen.proxy_trusted"
            ]
        );
        assert!(restart_needed(&old, &old).is_empty());
    }
}
