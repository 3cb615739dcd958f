//! Prometheus metrics on a [`Registry`] that is passed down, never global,
//! so that several proxies (tests) can run in one process.
//!
//! Every family has HELP text, base units (`_seconds`, `_bytes`) and
//! `_total` counters; label values come from closed sets in the code
//! (enums and fixed strings), never from peers. The only free-text label,
//! `subject` on certificate expiry, is bounded by the configuration.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Handshake and connect latencies: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Session lengths: 10 ms to a day.
const SESSION_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14_400.0, 86_400.0,
];

pub mod labels;

#[derive(Clone)]
pub struct Metrics {
    pub connections_accepted: IntCounter,
    pub connections_active: IntGauge,
    pub connections_closed: IntCounterVec,
    pub negotiations: IntCounterVec,
    pub tls_handshake_duration: HistogramVec,
    pub tls_handshake_failures: IntCounterVec,
    pub tls_sessions: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_handshakes_in_flight: IntGauge,
    pub cancel_requests: IntCounterVec,
    /// Sessions by route and how it was chosen (`[[routes]]`).
    pub route_sessions: IntCounterVec,
    /// Cancels between replicas (`[fleet]`): direction sent|received, result.
    pub cancel_peer: IntCounterVec,
    /// Answers to the fleet's "who is there" probes: peer, self, duplicate, failed.
    pub fleet_probes: IntCounterVec,
    /// Other replicas known (`[fleet]`).
    pub fleet_peers: IntGauge,
    /// 1, labelled with this replica's id (`[fleet]` only).
    pub fleet_info: IntGaugeVec,
    /// Sessions on each session thread (`listen.workers`): the balance.
    pub thread_sessions: IntGaugeVec,
    pub role_decisions: IntCounterVec,
    pub backend_connect_duration: HistogramVec,
    pub backend_connects: IntCounterVec,
    pub backend_logins: IntCounterVec,
    /// Password logins the proxy ran itself (`[scram] terminate`).
    pub client_logins: IntCounterVec,
    /// PROXY protocol v2 headers: ok, local, or why refused.
    pub proxy_protocol: IntCounterVec,
    /// `[scram.auth_query]` lookups: hit, miss (queried), error.
    pub auth_query: IntCounterVec,
    pub bytes_relayed: IntCounterVec,
    /// The two `bytes_relayed` children, resolved once for the relay.
    pub relay_progress: RelayProgress,
    pub session_duration: Histogram,
    pub certificate_not_after: GaugeVec,
    pub config_reloads: IntCounterVec,
    pub ready: IntGauge,
    pub fd_limit: IntGauge,
    pub fd_exhausted: IntCounterVec,
    pub admin_connections_refused: IntCounter,
    pub build_info: IntGaugeVec,
    pub start_time: Gauge,
}

struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        let c = IntCounter::with_opts(Opts::new(name, help))?;
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn gauges(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, prometheus::Error> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.0.register(Box::new(g.clone()))?;
        Ok(g)
    }

    fn histograms(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<HistogramVec, prometheus::Error> {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )?;
        self.0.register(Box::new(h.clone()))?;
        Ok(h)
    }
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let r = Reg(registry);
        let active = IntGauge::with_opts(Opts::new(
            "pgtls_connections_active",
            "Client connections currently open.",
        ))?;
        registry.register(Box::new(active.clone()))?;
        let ready = IntGauge::with_opts(Opts::new(
            "pgtls_ready",
            "1 when /ready answers 200: listening, certificates loaded, not draining, backend reachable.",
        ))?;
        registry.register(Box::new(ready.clone()))?;
        let certificate_not_after = GaugeVec::new(
            Opts::new(
                "pgtls_certificate_not_after_timestamp_seconds",
                "Expiry of each configured certificate (Unix time), by role and route; for role=crl, the CRL's next_update.",
            ),
            &["role", "route", "subject"],
        )?;
        registry.register(Box::new(certificate_not_after.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "pgtls_build_info",
                "Build information; the value is always 1.",
            ),
            &["version", "rustls_version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("BUILD_RUSTLS_VERSION")])
            .set(1);
        let start_time = Gauge::with_opts(Opts::new(
            "pgtls_start_time_seconds",
            "Unix time the proxy started.",
        ))?;
        registry.register(Box::new(start_time.clone()))?;
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let in_flight = IntGauge::with_opts(Opts::new(
            "pgtls_tls_handshakes_in_flight",
            "Client TLS handshakes holding an admission permit now (limits.max_handshakes_in_flight).",
        ))?;
        registry.register(Box::new(in_flight.clone()))?;
        let bytes_relayed = r.counters(
            "pgtls_relayed_bytes_total",
            "Bytes relayed after authentication, by direction; published every few seconds while sessions run.",
            &["direction"],
        )?;
        let relay_progress = RelayProgress {
            client_to_backend: bytes_relayed.with_label_values(&["client_to_backend"]),
            backend_to_client: bytes_relayed.with_label_values(&["backend_to_client"]),
        };
        let m = Metrics {
            tls_handshakes_in_flight: in_flight,
            cancel_requests: r.counters(
                "pgtls_cancel_requests_total",
                "CancelRequests received from clients, by result: forwarded (to this replica's backend), peer (sent on to the replica that issued the key), unknown, forged (a protocol 3.2 key without the fleet's MAC), rate_limited, failed.",
                &["result"],
            )?,
            route_sessions: r.counters(
                "pgtls_route_sessions_total",
                "Sessions by route (the configured names; \"default\" for the top level) and how the route was chosen: server_name, options, database, default.",
                &["route", "selected_by"],
            )?,
            cancel_peer: r.counters(
                "pgtls_cancel_peer_total",
                "CancelRequests between replicas, by direction (sent, received) and result (sent: delivered, no_peer, failed; received: forwarded, unknown, forged, rate_limited, failed, refused (TLS or protocol), busy (too many peer connections)).",
                &["direction", "result"],
            )?,
            fleet_probes: r.counters(
                "pgtls_fleet_probes_total",
                "Fleet directory probes, by answer: peer, self, duplicate (two replicas with one id), key_mismatch (a peer with another fleet.cancel_key), failed.",
                &["result"],
            )?,
            fleet_peers: {
                let g = IntGauge::with_opts(Opts::new(
                    "pgtls_fleet_peers",
                    "Other replicas this one knows the address of.",
                ))?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            fleet_info: r.gauges(
                "pgtls_fleet_info",
                "1, labelled with this replica's fleet id.",
                &["replica_id"],
            )?,
            thread_sessions: r.gauges(
                "pgtls_session_thread_sessions",
                "Sessions on each session thread (listen.workers), including those queued for it.",
                &["thread"],
            )?,
            connections_accepted: r.counter("pgtls_connections_accepted_total", "Client connections accepted.")?,
            connections_active: active,
            connections_closed: r.counters(
                "pgtls_connections_closed_total",
                "Client connections closed, by reason (client_eof, backend_eof, error, shutdown, limit).",
                &["reason"],
            )?,
            negotiations: r.counters(
                "pgtls_negotiations_total",
                "Pre-startup negotiation outcomes, by path.",
                &["path"],
            )?,
            tls_handshake_duration: r.histograms(
                "pgtls_tls_handshake_duration_seconds",
                "Duration of successful client TLS handshakes, from ClientHello to Finished.",
                &["path", "version"],
                LATENCY_BUCKETS,
            )?,
            tls_handshake_failures: r.counters(
                "pgtls_tls_handshake_failures_total",
                "Failed client TLS handshakes, by reason.",
                &["reason"],
            )?,
            tls_sessions: r.counters(
                "pgtls_tls_sessions_total",
                "Established client TLS sessions, by negotiated version and cipher suite.",
                &["version", "cipher"],
            )?,
            tls_handshakes: r.counters(
                "pgtls_tls_handshakes_total",
                "Successful client TLS handshakes, by whether the session was resumed.",
                &["resumed"],
            )?,
            role_decisions: r.counters(
                "pgtls_role_decisions_total",
                "Certificate-to-role decisions, by decision, reason and identity kind.",
                &["decision", "reason", "identity_kind"],
            )?,
            backend_connect_duration: r.histograms(
                "pgtls_backend_connect_duration_seconds",
                "Time to open a backend link (TCP, and TLS when configured), by sslmode.",
                &["sslmode"],
                LATENCY_BUCKETS,
            )?,
            backend_connects: r.counters(
                "pgtls_backend_connects_total",
                "Backend link attempts, by result (ok, or the failure reason) and sslmode.",
                &["result", "sslmode"],
            )?,
            backend_logins: r.counters(
                "pgtls_backend_logins_total",
                "Proxy-authenticated backend logins, by method and result.",
                &["method", "result"],
            )?,
            auth_query: r.counters(
                "pgtls_auth_query_total",
                "Verifier lookups of [scram.auth_query]: hit (cached), miss (queried) or error.",
                &["result"],
            )?,
            proxy_protocol: r.counters(
                "pgtls_proxy_protocol_total",
                "PROXY protocol v2 headers read: ok, local (health checks), or why refused (untrusted, invalid, oversized, truncated, timeout).",
                &["result"],
            )?,
            client_logins: r.counters(
                "pgtls_client_logins_total",
                "SCRAM logins terminated at the proxy, by the client's method and the result.",
                &["method", "result"],
            )?,
            bytes_relayed,
            relay_progress,
            session_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "pgtls_session_duration_seconds",
                        "Duration of relayed sessions, from ReadyForQuery to close.",
                    )
                    .buckets(SESSION_BUCKETS.to_vec()),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            certificate_not_after,
            config_reloads: r.counters(
                "pgtls_config_reloads_total",
                "Configuration reloads, by result (success, failure).",
                &["result"],
            )?,
            ready,
            fd_limit: {
                let g = IntGauge::with_opts(Opts::new(
                    "pgtls_fd_limit",
                    "RLIMIT_NOFILE (soft) in force, after the proxy raised it at start.",
                ))?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            fd_exhausted: r.counters(
                "pgtls_fd_exhausted_total",
                "Connections refused because the proxy ran out of file descriptors (its budget, or EMFILE/ENFILE), by stage (accept, backend).",
                &["stage"],
            )?,
            admin_connections_refused: r.counter(
                "pgtls_admin_connections_refused_total",
                "Admin HTTP connections closed at once because the admin listener's connection cap was reached.",
            )?,
            build_info,
            start_time,
        };
        // Pre-create closed label sets so dashboards see zeros, not gaps.
        for reason in labels::CLOSE_REASONS {
            m.connections_closed.with_label_values(&[reason]);
        }
        for path in labels::NEGOTIATION_PATHS {
            m.negotiations.with_label_values(&[path]);
        }
        for reason in labels::TLS_FAILURES {
            m.tls_handshake_failures.with_label_values(&[reason]);
        }
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        for stage in ["accept", "backend"] {
            m.fd_exhausted.with_label_values(&[stage]);
        }
        for result in ["forwarded", "peer", "unknown", "forged", "rate_limited", "failed"] {
            m.cancel_requests.with_label_values(&[result]);
        }
        for result in ["peer", "self", "duplicate", "key_mismatch", "failed"] {
            m.fleet_probes.with_label_values(&[result]);
        }
        for result in ["delivered", "no_peer", "failed"] {
            m.cancel_peer.with_label_values(&["sent", result]);
        }
        for result in ["forwarded", "unknown", "forged", "rate_limited", "failed", "refused", "busy"] {
            m.cancel_peer.with_label_values(&["received", result]);
        }
        Ok(m)
    }

    /// Publishes certificate expiries, replacing the previous set.
    pub fn set_certificates(&self, certs: &[(&'static str, String, String, i64)]) {
        self.certificate_not_after.reset();
        for (role, route, subject, not_after) in certs {
            self.certificate_not_after
                .with_label_values(&[*role, route.as_str(), subject.as_str()])
                .set(*not_after as f64);
        }
    }
}

/// Counters the relay adds its bytes to every [`RelayProgress::EVERY`] while
/// bytes move and once more when it ends, so that a long COPY or
/// replication stream shows up in monitoring while it runs. The timer is
/// set only when bytes moved since the last report (an idle session is
/// not woken for it) and is polled on wakes the relay has anyway: no work
/// per message.
#[derive(Clone)]
pub struct RelayProgress {
    pub client_to_backend: prometheus::IntCounter,
    pub backend_to_client: prometheus::IntCounter,
}

impl RelayProgress {
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    /// Adds what moved since `reported`, and remembers it.
    pub fn publish(&self, reported: &mut (u64, u64), up: u64, down: u64) {
        self.client_to_backend.inc_by(up - reported.0);
        self.backend_to_client.inc_by(down - reported.1);
        *reported = (up, down);
    }
}
