//! Prometheus metrics on a [`Registry`] that is passed down, never global,
//! so that several proxies (tests) can run in one process.
//!
//! Label values come from closed enums in the code, never from peers.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub connections_accepted: IntCounter,
    pub connections_active: IntGauge,
    pub connections_closed: IntCounterVec,
    pub negotiations: IntCounterVec,
    pub backend_connects: IntCounterVec,
    pub bytes_relayed: IntCounterVec,
    pub role_decisions: IntCounterVec,
    pub backend_logins: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(Opts::new(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let active = IntGauge::with_opts(Opts::new(
            "pgtls_connections_active",
            "Client connections currently open.",
        ))?;
        registry.register(Box::new(active.clone()))?;
        Ok(Metrics {
            connections_accepted: counter(
                "pgtls_connections_accepted_total",
                "Client connections accepted.",
            )?,
            connections_active: active,
            connections_closed: vec(
                "pgtls_connections_closed_total",
                "Client connections closed, by reason.",
                &["reason"],
            )?,
            negotiations: vec(
                "pgtls_negotiations_total",
                "Pre-startup negotiation outcomes, by path.",
                &["path"],
            )?,
            backend_connects: vec(
                "pgtls_backend_connects_total",
                "Backend connection attempts, by result.",
                &["result"],
            )?,
            bytes_relayed: vec(
                "pgtls_relayed_bytes_total",
                "Bytes relayed after authentication, by direction.",
                &["direction"],
            )?,
            role_decisions: vec(
                "pgtls_role_decisions_total",
                "Certificate-to-role decisions, by decision, reason and identity kind.",
                &["decision", "reason", "identity_kind"],
            )?,
            backend_logins: vec(
                "pgtls_backend_logins_total",
                "Proxy-authenticated backend logins, by method and result.",
                &["method", "result"],
            )?,
        })
    }
}
