//! The record of one connection: filled in as the session advances, and
//! on drop (normal end, error, or a forced close at shutdown) it settles
//! the connection metrics and emits the one audit event, target
//! `pgtls::audit`, with every field an operator needs to answer "who
//! connected, as what, to where, for how long, and how did it end".
//!
//! Nothing secret is recorded: no passwords, no startup packet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use crate::backend::Connector;
use crate::config::BackendAuth;
use crate::conn::context::Context;
use crate::conn::negotiate::{Path, TlsInfo};

/// How a connection ended (`pgtls_connections_closed_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientEof,
    BackendEof,
    Error,
    /// The proxy's shutdown ended it (or cut it off).
    Shutdown,
    /// A limit: too many connections, or the idle timeout.
    Limit,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientEof => "client_eof",
            CloseReason::BackendEof => "backend_eof",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Limit => "limit",
        }
    }
}

/// What the connection turned out to be: the audit event's `path`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    /// Negotiation did not finish.
    #[default]
    Undecided,
    Session(Path),
    Cancel,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Undecided => "",
            Kind::Session(path) => path.as_str(),
            Kind::Cancel => "cancel",
        }
    }
}

pub struct SessionRecord {
    shared: Arc<Context>,
    /// The backend settings this connection uses (from its runtime).
    connector: Arc<Connector>,
    started: Instant,
    pub id: u64,
    pub peer: SocketAddr,
    pub kind: Kind,
    pub tls: Option<TlsInfo>,
    pub identity: Option<String>,
    pub user: Option<String>,
    pub database: Option<String>,
    /// The role the session runs as once allowed (the startup user).
    pub role: Option<String>,
    pub backend_auth: Option<BackendAuth>,
    /// The login the proxy ran with the client itself (SCRAM termination).
    pub client_auth: Option<&'static str>,
    /// The proxy's own login to the backend (proxy logins, SCRAM).
    pub backend_login: Option<&'static str>,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub relay_started: Option<Instant>,
    /// Starts as `Shutdown`: a record dropped without an outcome was cut
    /// off by a forced close.
    pub close_reason: CloseReason,
    pub error: Option<&'static str>,
    /// The protocol minor version the client speaks (3.x), once known.
    pub protocol_minor: Option<u16>,
    /// What became of a CancelRequest (`pgtls_cancel_requests_total`'s result).
    pub cancel: Option<&'static str>,
    /// The session's route, once chosen.
    pub route: Option<String>,
}

impl SessionRecord {
    /// The route chosen for the session: its backend is the one logged.
    pub fn set_route(&mut self, route: &crate::runtime::Route, selected_by: &'static str) {
        self.connector = route.connector.clone();
        self.route = Some(route.name.clone());
        self.shared
            .metrics
            .route_sessions
            .with_label_values(&[route.name.as_str(), selected_by])
            .inc();
    }

    pub fn new(
        shared: Arc<Context>,
        connector: Arc<Connector>,
        id: u64,
        peer: SocketAddr,
    ) -> SessionRecord {
        shared.metrics.connections_accepted.inc();
        shared.metrics.connections_active.inc();
        shared
            .connections_peak
            .raise(shared.metrics.connections_active.get());
        SessionRecord {
            shared,
            connector,
            started: Instant::now(),
            id,
            peer,
            kind: Kind::Undecided,
            tls: None,
            identity: None,
            user: None,
            database: None,
            role: None,
            backend_auth: None,
            client_auth: None,
            backend_login: None,
            bytes_client_to_backend: 0,
            bytes_backend_to_client: 0,
            relay_started: None,
            close_reason: CloseReason::Shutdown,
            error: None,
            protocol_minor: None,
            cancel: None,
            route: None,
        }
    }
}

/// `client -> backend` when the proxy ran a login on either leg, e.g.
/// `scram-sha-256-plus -> scram-sha-256-plus`; `relayed` otherwise.
struct AuthLegs(Option<&'static str>, Option<&'static str>);

impl std::fmt::Display for AuthLegs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0, self.1) {
            (None, None) => f.write_str("relayed"),
            (client, backend) => write!(
                f,
                "{} -> {}",
                client.unwrap_or("certificate"),
                backend.unwrap_or("relayed")
            ),
        }
    }
}

impl Drop for SessionRecord {
    fn drop(&mut self) {
        let m = &self.shared.metrics;
        m.connections_active.dec();
        m.connections_closed
            .with_label_values(&[self.close_reason.as_str()])
            .inc();
        // Relayed bytes were published by the relay itself, as they moved.
        if let Some(t) = self.relay_started {
            m.session_duration.observe(t.elapsed().as_secs_f64());
        }
        let tls = self.tls.clone().unwrap_or_default();
        let backend = &self.connector;
        info!(
            target: "pgtls::audit",
            event = "session_end",
            conn_id = self.id,
            peer = %self.peer,
            path = self.kind.as_str(),
            sni = tls.sni.as_deref().unwrap_or(""),
            route = self.route.as_deref().unwrap_or(""),
            protocol = %self.protocol_minor.map_or(String::new(), |m| format!("3.{m}")),
            cancel = self.cancel.unwrap_or(""),
            tls_version = tls.version,
            cipher = tls.cipher,
            tls_resumed = tls.resumed,
            client_identity = self.identity.as_deref().unwrap_or(""),
            user = self.user.as_deref().unwrap_or(""),
            database = self.database.as_deref().unwrap_or(""),
            role = self.role.as_deref().unwrap_or(""),
            backend_auth = self.backend_auth.map_or("", BackendAuth::as_str),
            auth = %AuthLegs(self.client_auth, self.backend_login),
            backend = backend.address(),
            backend_sslmode = backend.sslmode().as_str(),
            duration_ms = self.started.elapsed().as_millis() as u64,
            bytes_client_to_backend = self.bytes_client_to_backend,
            bytes_backend_to_client = self.bytes_backend_to_client,
            close_reason = self.close_reason.as_str(),
            error = self.error.unwrap_or(""),
            "session ended"
        );
    }
}
