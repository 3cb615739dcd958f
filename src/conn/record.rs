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
use crate::conn::context::Shared;
use crate::conn::negotiate::TlsInfo;

pub struct SessionRecord {
    shared: Arc<Shared>,
    /// The backend settings this connection uses (from its runtime).
    connector: Arc<Connector>,
    started: Instant,
    pub id: u64,
    pub peer: SocketAddr,
    pub path: &'static str,
    pub tls: Option<TlsInfo>,
    pub identity: Option<String>,
    pub user: Option<String>,
    pub database: Option<String>,
    /// The role the session runs as once allowed (the startup user).
    pub role: Option<String>,
    pub backend_auth: &'static str,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    pub relay_started: Option<Instant>,
    /// Closed set: client_eof, backend_eof, error, shutdown, limit. Starts
    /// as "shutdown": a record dropped without an outcome was cut off by a
    /// forced close.
    pub close_reason: &'static str,
    pub error: Option<&'static str>,
}

impl SessionRecord {
    pub fn new(
        shared: Arc<Shared>,
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
            path: "",
            tls: None,
            identity: None,
            user: None,
            database: None,
            role: None,
            backend_auth: "",
            bytes_client_to_backend: 0,
            bytes_backend_to_client: 0,
            relay_started: None,
            close_reason: "shutdown",
            error: None,
        }
    }
}

impl Drop for SessionRecord {
    fn drop(&mut self) {
        let m = &self.shared.metrics;
        m.connections_active.dec();
        m.connections_closed
            .with_label_values(&[self.close_reason])
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
            path = self.path,
            sni = tls.sni.as_deref().unwrap_or(""),
            tls_version = tls.version,
            cipher = tls.cipher,
            tls_resumed = tls.resumed,
            client_identity = self.identity.as_deref().unwrap_or(""),
            user = self.user.as_deref().unwrap_or(""),
            database = self.database.as_deref().unwrap_or(""),
            role = self.role.as_deref().unwrap_or(""),
            backend_auth = self.backend_auth,
            backend = backend.address(),
            backend_sslmode = backend.sslmode().as_str(),
            duration_ms = self.started.elapsed().as_millis() as u64,
            bytes_client_to_backend = self.bytes_client_to_backend,
            bytes_backend_to_client = self.bytes_backend_to_client,
            close_reason = self.close_reason,
            error = self.error.unwrap_or(""),
            "session ended"
        );
    }
}
