//! How the proxy runs: `[listen]`, `[limits]`, `[shutdown]`, `[log]`,
//! `[admin]` and `[reload]`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Check;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Client-facing `host:port`.
    pub address: String,
    /// The listen(2) backlog: connections the kernel queues before the
    /// proxy accepts them. Linux caps it at `net.core.somaxconn`.
    pub backlog: u32,
    /// PROXY protocol v2 before everything else: "off" or "required"
    /// (never optional).
    pub proxy_protocol: ProxyProtocol,
    /// Networks a PROXY header is accepted from (the load balancers), as
    /// CIDR; connections from anywhere else are closed.
    pub proxy_trusted: Vec<ipnet::IpNet>,
    /// Threads that run sessions, each with its own event loop; a session
    /// stays on the thread that accepted it. 0: one per CPU.
    pub workers: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    Required,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: "127.0.0.1:6432".into(),
            backlog: 1024,
            proxy_protocol: ProxyProtocol::Off,
            proxy_trusted: Vec::new(),
            workers: 0,
        }
    }
}

/// More session threads than this only cost descriptors and memory.
pub const MAX_WORKERS: usize = 256;

impl Listen {
    pub(crate) fn check(&self) -> Check {
        if self.backlog == 0 {
            return Err(("listen.backlog", "must be greater than 0".into()));
        }
        if self.workers > MAX_WORKERS {
            return Err((
                "listen.workers",
                format!("must be at most {MAX_WORKERS} (0: one per CPU)"),
            ));
        }
        if self.proxy_protocol == ProxyProtocol::Required && self.proxy_trusted.is_empty() {
            return Err((
                "listen.proxy_trusted",
                "is required with listen.proxy_protocol = \"required\" (the load balancers' networks, e.g. [\"10.0.0.0/8\"])".into(),
            ));
        }
        Ok(())
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

impl Limits {
    pub(crate) fn check(&self) -> Check {
        if self.max_handshakes_in_flight == 0 {
            return Err((
                "limits.max_handshakes_in_flight",
                "must be at least 1".into(),
            ));
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err((
                "limits.idle_timeout",
                "must be greater than 0 (omit it to turn it off)".into(),
            ));
        }
        if self.auth_timeout.is_zero() {
            return Err(("limits.auth_timeout", "must be greater than 0".into()));
        }
        if self.handshake_timeout.is_zero() {
            return Err(("limits.handshake_timeout", "must be greater than 0".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// How long SIGTERM waits for sessions to end on their own.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace_period: Duration::from_secs(30),
        }
    }
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

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
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

impl Admin {
    pub(crate) fn check(&self) -> Check {
        if self.enabled && !self.allow_non_loopback && !super::is_loopback(&self.address) {
            return Err((
                "admin.address",
                "is not a loopback address; set admin.allow_non_loopback = true to expose metrics and readiness beyond this host".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reload {
    /// Check the config file and every file it names this often and reload
    /// when one changed (mtime, size or inode). Off when absent.
    #[serde(with = "humantime_serde::option")]
    pub poll_interval: Option<Duration>,
}
